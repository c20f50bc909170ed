"""Name maps and reshaping functions: pure, offline round trips over TP/PP layouts."""
from __future__ import annotations

import pytest
import torch

from megatron_copsd.checkpoint import hf_maps
from megatron_copsd.checkpoint.convert import hf_to_megatron, megatron_names, megatron_to_hf
from megatron_copsd.megatron.model_provider import padded_vocab_size
from megatron_copsd.testing.tiny import make_tiny_hf_model


@pytest.mark.parametrize("vocab,tp,expected", [(301, 1, 384), (301, 2, 512), (128, 1, 128), (129, 4, 512), (513, 4, 1024)])
def test_padded_vocab_size(vocab, tp, expected):
    assert padded_vocab_size(vocab, tp) == expected
    assert expected % (128 * tp) == 0


@pytest.mark.parametrize("num_heads,num_groups,tp", [(4, 2, 1), (4, 2, 2), (8, 8, 4), (6, 1, 1), (8, 4, 4)])
def test_qkv_roundtrip_and_group_layout(num_heads, num_groups, tp):
    hd, H = 3, 5
    q = torch.randn(num_heads * hd, H)
    k, v = torch.randn(num_groups * hd, H), torch.randn(num_groups * hd, H)
    shards = [hf_maps.qkv_to_megatron(q, k, v, num_heads=num_heads, num_groups=num_groups, head_dim=hd,
                                      tp_rank=r, tp_size=tp) for r in range(tp)]
    q2, k2, v2 = hf_maps.qkv_to_hf(shards, num_heads=num_heads, num_groups=num_groups, head_dim=hd)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)
    # Megatron's layout: group g holds its query heads, then its k head, then its v head.
    hpg = num_heads // num_groups
    fused = torch.cat(shards)
    block = (hpg + 2) * hd
    g = num_groups - 1
    assert torch.equal(fused[g * block: g * block + hpg * hd], q[g * hpg * hd:(g + 1) * hpg * hd])
    assert torch.equal(fused[g * block + hpg * hd: g * block + (hpg + 1) * hd], k[g * hd:(g + 1) * hd])


def test_qkv_bias_roundtrip():
    q, k, v = torch.randn(8), torch.randn(4), torch.randn(4)
    shards = [hf_maps.qkv_to_megatron(q, k, v, num_heads=4, num_groups=2, head_dim=2, tp_rank=r, tp_size=2)
              for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), hf_maps.qkv_to_hf(shards, num_heads=4, num_groups=2, head_dim=2)))


def test_gate_up_shards_are_gate_then_up():
    gate, up = torch.randn(6, 3), torch.randn(6, 3)
    shards = [hf_maps.gate_up_to_megatron(gate, up, tp_rank=r, tp_size=2) for r in range(2)]
    assert torch.equal(shards[1][:3], gate[3:]) and torch.equal(shards[1][3:], up[3:])
    g2, u2 = hf_maps.gate_up_to_hf(shards)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


def test_vocab_padding_is_zero_and_dropped():
    w = torch.randn(301, 4)
    shards = [hf_maps.vocab_to_megatron(w, 512, tp_rank=r, tp_size=2) for r in range(2)]
    assert shards[1].shape == (256, 4) and torch.count_nonzero(shards[1][301 - 256:]) == 0
    assert torch.equal(hf_maps.vocab_to_hf(shards, 301), w)


@pytest.mark.parametrize("family,tied", [("qwen3", False), ("llama", True), ("qwen2", False)])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_offline_roundtrip_bit_exact(family, tied, tp, pp):
    model = make_tiny_hf_model(None, family, tie_word_embeddings=tied)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if tied:
        state.pop("lm_head.weight", None)
    cfg = model.config
    states = [[hf_to_megatron(state, cfg, tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp) for t in range(tp)]
              for p in range(pp)]
    for p in range(pp):
        assert sorted(states[p][0]) == sorted(megatron_names(cfg, pp_rank=p, pp_size=pp))
    back = megatron_to_hf(states, cfg)
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_te_names_alias_local_names():
    assert hf_maps.te_to_local_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == \
        "decoder.layers.3.input_layernorm.weight"
    assert hf_maps.te_to_local_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.0.pre_mlp_layernorm.weight"


def test_layer_index_offset_for_pipeline_stage():
    cfg = make_tiny_hf_model(None, "qwen3", num_layers=4).config
    names, layout = hf_maps.hf_names_for("decoder.layers.1.mlp.linear_fc2.weight", cfg, pp_layer_offset=2)
    assert names == ("model.layers.3.mlp.down_proj.weight",) and layout == "row"
