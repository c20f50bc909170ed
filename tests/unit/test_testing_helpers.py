"""The shared test helpers themselves: tiny models load back, multi-process runs report errors."""
import pytest
import torch

from megatron_copsd.testing.multiproc import run_distributed
from megatron_copsd.testing.tiny import make_tiny_hf_model


def _allreduce(rank, world_size):
    import torch.distributed as dist

    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return t.item()


def _boom(rank, world_size):
    if rank == 1:
        raise ValueError("rank one fails")
    return rank


def test_run_distributed_gloo_allreduce():
    assert run_distributed(_allreduce, 2, timeout=120) == [3.0, 3.0]


def test_run_distributed_reports_child_traceback():
    with pytest.raises(RuntimeError, match="rank one fails"):
        run_distributed(_boom, 2, timeout=120)


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2"])
def test_tiny_model_roundtrip(tmp_path, family):
    import transformers

    model = make_tiny_hf_model(tmp_path, family)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[2, 5, 7, 11]])
    assert torch.equal(model(ids).logits, again(ids).logits)
    assert model.config.vocab_size == 301


def _tensor_result(rank, world_size):
    return {"rank": rank, "t": torch.full((3,), float(rank))}


def test_run_distributed_returns_tensors():
    out = run_distributed(_tensor_result, 2, timeout=120)
    assert [o["rank"] for o in out] == [0, 1]
    assert torch.equal(out[1]["t"], torch.ones(3))
