"""Weight export for the rollout engine / HF checkpoint: only the rank that needs the full weights holds them.

Real megatron-core models on gloo, 2 processes: TP=2 (untied Qwen3), then PP=2 (tied Llama). With
`only_first_rank=True` the model-parallel group's first rank gets exactly the HF checkpoint's tensors and
the other rank gets None; the default (every rank) path agrees. Neither path may use object collectives
(`all_gather_object` pickles whole state dicts through the host). What gloo cannot show: NCCL accepting
the device tensors (the dry run's collective check covers that).
"""
from __future__ import annotations

import pytest
import torch

from megatron_copsd.testing.multiproc import run_distributed
from megatron_copsd.testing.tiny import make_tiny_hf_model

pytestmark = pytest.mark.distributed


def gather_worker(rank, world_size, cases):
    import torch.distributed as dist

    from megatron_copsd.checkpoint.convert import gather_hf_state_dict, load_hf_into_model, load_hf_state_dict
    from megatron_copsd.megatron.dist import destroy_distributed, init_distributed
    from megatron_copsd.megatron.model_provider import build_gpt_model, load_hf_config

    def refuse(*a, **k):
        raise AssertionError("object collective used for weights")

    dist.all_gather_object = dist.broadcast_object_list = dist.gather_object = refuse
    torch.set_num_threads(1)
    out = {}
    layouts = {"qwen3": (2, 1), "llama_tied": (1, 2)}  # TP gather; PP send/recv incl. the tied head
    for name, hf_dir in cases.items():
        cfg = load_hf_config(hf_dir)
        ref = load_hf_state_dict(hf_dir)
        for tp, pp in (layouts[name],):
            init_distributed(tp, pp)
            model = build_gpt_model(cfg)
            load_hf_into_model(model, hf_dir, cfg)
            first = gather_hf_state_dict(model, cfg, only_first_rank=True)
            every = gather_hf_state_dict(model, cfg)
            out[(name, tp, pp)] = dict(
                first=None if first is None else all(torch.equal(first[k], ref[k]) for k in ref) and set(first) == set(ref),
                every=set(every) == set(ref) and all(torch.equal(every[k], ref[k]) for k in ref))
            destroy_distributed()
    return out


def test_only_the_first_rank_holds_gathered_weights(tmp_path):
    make_tiny_hf_model(tmp_path / "q", family="qwen3", num_layers=2)
    make_tiny_hf_model(tmp_path / "l", family="llama", num_layers=2, tie_word_embeddings=True)
    cases = {"qwen3": str(tmp_path / "q"), "llama_tied": str(tmp_path / "l")}
    results = run_distributed(gather_worker, 2, (cases,), timeout=300)
    for key in results[0]:
        assert results[0][key]["first"] is True, key  # rank 0: tp 0 of stage 0, the exact HF tensors
        assert results[1][key]["first"] is None, key  # the other TP rank / pipeline stage holds nothing
        assert results[0][key]["every"] and results[1][key]["every"], key
