"""HF config -> Megatron TransformerConfig mapping, and refusals for what the converter can't express."""
from __future__ import annotations

import pytest
import torch

from megatron_copsd.megatron.model_provider import check_supported, load_hf_config, transformer_config_from_hf
from megatron_copsd.testing.tiny import make_tiny_hf_model, tiny_hf_config


@pytest.mark.parametrize("family,qk_norm,qkv_bias", [("qwen3", True, False), ("llama", False, False),
                                                     ("qwen2", False, True)])
def test_transformer_config_fields(family, qk_norm, qkv_bias):
    hf = tiny_hf_config(family, num_heads=4, num_kv_heads=2, rope_theta=500000.0)
    cfg = transformer_config_from_hf(hf, tp_size=2, pp_size=2)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (2, 64, 112)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels) == (4, 2, 16)
    assert cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and not cfg.add_bias_linear
    assert cfg.qk_layernorm == qk_norm and cfg.add_qkv_bias == qkv_bias
    assert cfg.layernorm_epsilon == 1e-6 and cfg.attention_dropout == 0.0
    assert cfg.activation_func is torch.nn.functional.silu
    assert cfg.tensor_model_parallel_size == 2 and cfg.pipeline_model_parallel_size == 2


def test_config_from_dir(tmp_path):
    make_tiny_hf_model(tmp_path, "qwen3")
    assert load_hf_config(tmp_path).model_type == "qwen3"
    assert load_hf_config(tmp_path / "config.json").model_type == "qwen3"
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_config(tmp_path / "nowhere")


def test_parallel_sizes_must_divide():
    hf = tiny_hf_config("qwen3", num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="tp_size=4"):
        transformer_config_from_hf(hf, tp_size=4, pp_size=1)
    with pytest.raises(ValueError, match="pp_size=3"):
        transformer_config_from_hf(hf, tp_size=1, pp_size=3)


@pytest.mark.parametrize("field,value,match", [
    ("hidden_act", "gelu", "hidden_act"),
    ("mlp_bias", True, "mlp_bias"),
    ("attention_bias", True, "attention_bias"),
])
def test_refuses_unsupported_llama_variants(field, value, match):
    hf = tiny_hf_config("llama")
    setattr(hf, field, value)
    with pytest.raises(ValueError, match=match):
        check_supported(hf)


def test_refuses_unknown_rope_and_model_type():
    hf = tiny_hf_config("llama")
    hf.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        check_supported(hf)
    import transformers

    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        check_supported(transformers.GPT2Config())
