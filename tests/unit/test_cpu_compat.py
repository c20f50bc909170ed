"""The CPU compatibility layer, exercised in a spawned child so the test process's torch stays pristine."""
from __future__ import annotations

import pytest
import torch

from megatron_copsd.testing.multiproc import run_distributed


def _compat_child(rank, world_size, hf_dir, work_dir):
    import torch

    from megatron_copsd.megatron import cpu_compat

    out = {}
    before = torch.zeros(2).type()
    assert cpu_compat.enable_cpu_compat() is True
    assert cpu_compat.enable_cpu_compat() is True  # idempotent
    out["type_before"] = before
    t = torch.zeros(2, device="cuda")
    out["factory_device"] = str(t.device)
    out["cuda_call"] = str(torch.ones(3).cuda().device)
    out["to_cuda"] = str(torch.ones(3).to("cuda:0").device) + str(torch.ones(3).to(torch.device("cuda")).device)
    out["to_index"] = str(torch.ones(3).to(torch.cuda.current_device()).device)
    out["to_dtype_kept"] = str(torch.ones(3).to(torch.float64).dtype)
    torch.cuda.synchronize()
    out["type_names"] = (torch.zeros(1).type(), torch.zeros(1, dtype=torch.bfloat16).type(),
                         torch.zeros(1, dtype=torch.long).type())
    out["type_cast"] = torch.zeros(1).type(torch.float64).dtype == torch.float64 and \
        torch.zeros(1).type("torch.cuda.HalfTensor").dtype == torch.float16

    # The model-parallel RNG: registered, forks a separate CPU stream and restores the default one.
    from megatron.core import tensor_parallel

    from megatron_copsd.megatron.dist import destroy_distributed, init_distributed

    init_distributed(1, 1, seed=7)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    out["rng_registered"] = "model-parallel-rng" in tracker.get_states()
    state = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    out["default_untouched"] = torch.equal(state, torch.get_rng_state())
    with tracker.fork():
        b = torch.rand(4)
    out["fork_advances"] = not torch.equal(a, b)
    init_distributed(1, 1, seed=7)
    with tracker.fork():
        out["fork_reproducible"] = torch.equal(torch.rand(4), a)

    # dist checkpoint CLI round trip (needs the live group; runs single-process).
    from megatron_copsd.checkpoint.cli import main
    from megatron_copsd.checkpoint.convert import load_hf_state_dict

    destroy_distributed()
    assert main(["hf-to-dist", "--hf-dir", hf_dir, "--out", f"{work_dir}/dcp", "--no-progress"]) == 0
    assert main(["dist-to-hf", "--dist-dir", f"{work_dir}/dcp", "--hf-config", hf_dir, "--out",
                 f"{work_dir}/back", "--no-progress"]) == 0
    a_state, b_state = load_hf_state_dict(hf_dir), load_hf_state_dict(f"{work_dir}/back")
    out["dcp_cli_roundtrip"] = sorted(a_state) == sorted(b_state) and all(torch.equal(a_state[k], b_state[k]) for k in a_state)

    cpu_compat.disable_cpu_compat()
    out["type_after_disable"] = torch.zeros(1).type()
    out["inactive"] = not cpu_compat.is_active()
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is a no-op with CUDA")
def test_cpu_compat_layer(tmp_path):
    from megatron_copsd.testing.tiny import make_tiny_hf_model

    hf_dir = tmp_path / "hf"
    make_tiny_hf_model(hf_dir, "llama", tie_word_embeddings=True)
    (r,) = run_distributed(_compat_child, 1, args=(str(hf_dir), str(tmp_path)), timeout=300)
    assert r["type_before"] == "torch.FloatTensor"
    assert r["factory_device"] == "cpu" and r["cuda_call"] == "cpu" and r["to_cuda"] == "cpucpu"
    assert r["to_index"] == "cpu" and r["to_dtype_kept"] == "torch.float64"
    assert r["type_names"] == ("torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor", "torch.cuda.LongTensor")
    assert r["type_cast"]
    assert r["rng_registered"] and r["default_untouched"] and r["fork_advances"] and r["fork_reproducible"]
    assert r["dcp_cli_roundtrip"]
    assert r["type_after_disable"] == "torch.FloatTensor" and r["inactive"]
