"""Start-up on the GPU path, checked without one: each pipeline stage reads only its HF tensors, and the
non-TE attention's [b, heads, s, s] scores are refused clearly when they cannot fit.

What CPU cannot prove: the actual peak memory of the attention on a GPU (the estimate counts the saved
fp32 softmax output and the params-dtype probabilities per layer).
"""
from __future__ import annotations

import types

import pytest
import torch

from megatron_copsd.checkpoint.convert import hf_to_megatron, load_hf_state_dict, stage_hf_names
from megatron_copsd.config import config_from_dict
from megatron_copsd.run_setup import check_attention_memory, local_attention_bytes
from megatron_copsd.testing.tiny import make_tiny_hf_model


@pytest.mark.parametrize("tied", [False, True])
def test_each_stage_reads_only_its_tensors(tmp_path, tied):
    hf = make_tiny_hf_model(tmp_path, family="llama" if tied else "qwen3", num_layers=4, tie_word_embeddings=tied)
    full = load_hf_state_dict(tmp_path)
    first = load_hf_state_dict(tmp_path, names=stage_hf_names(hf.config, pp_rank=0, pp_size=2))
    last = load_hf_state_dict(tmp_path, names=stage_hf_names(hf.config, pp_rank=1, pp_size=2))
    assert "model.layers.0.mlp.up_proj.weight" in first and "model.layers.3.mlp.up_proj.weight" not in first
    assert "model.layers.3.mlp.up_proj.weight" in last and "model.layers.0.mlp.up_proj.weight" not in last
    assert "model.norm.weight" in last and "model.norm.weight" not in first
    # the last stage's LM head: lm_head.weight, or the embedding when tied
    assert ("model.embed_tokens.weight" in last) == tied and ("lm_head.weight" in last) == (not tied)
    assert len(first) + len(last) < len(full) + 2  # nothing read twice except a tied embedding
    for pp_rank, part in ((0, first), (1, last)):
        sub = hf_to_megatron(part, hf.config, pp_rank=pp_rank, pp_size=2, tp_rank=1, tp_size=2)
        ref = hf_to_megatron(full, hf.config, pp_rank=pp_rank, pp_size=2, tp_rank=1, tp_size=2)
        assert sub.keys() == ref.keys() and all(torch.equal(sub[k], ref[k]) for k in ref)
    del last["model.norm.weight"]
    with pytest.raises(ValueError, match="missing tensor model.norm.weight"):
        hf_to_megatron(last, hf.config, pp_rank=1, pp_size=2)


def _qwen3_8b_shape():
    return types.SimpleNamespace(num_hidden_layers=36, num_attention_heads=32)


def _cfg(**parallel):
    return config_from_dict({"parallel": {"tp": 4, **parallel}, "data": {"max_prompt_tokens": 1024},
                             "rollout": {"max_new_tokens": 7168}, "train": {"micro_batch_tokens": 8192}})


def test_local_attention_estimate_and_refusal():
    h100 = 80 * 2**30
    need = local_attention_bytes(_cfg(), _qwen3_8b_shape())
    assert need == 8192 * 8192 * (32 // 4) * 6 * 36  # b*s <= 8192, s = 8192: 116 GiB of scores
    with pytest.raises(ValueError, match=r"parallel.recompute=selective"):
        check_attention_memory(_cfg(), _qwen3_8b_shape(), use_te=False, device_bytes=h100)
    check_attention_memory(_cfg(recompute="selective"), _qwen3_8b_shape(), use_te=False, device_bytes=h100)  # 3.2 GiB
    check_attention_memory(_cfg(), _qwen3_8b_shape(), use_te=True, device_bytes=h100)  # TE: flash / fused attention
    check_attention_memory(_cfg(), _qwen3_8b_shape(), use_te=False, device_bytes=None)  # CPU: no device budget
