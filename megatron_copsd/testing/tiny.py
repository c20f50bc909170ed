"""Tiny random Hugging Face models, saved to a folder, for tests and the embedded default.

No weights can be downloaded here, so every model-level test starts from one of these.
"""
from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("qwen3", "llama", "qwen2")


def tiny_hf_config(
    family: str = "qwen3",
    *,
    vocab_size: int = 301,
    hidden_size: int = 64,
    intermediate_size: int = 112,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    eos_token_id: int = 1,
    pad_token_id: int = 0,
    bos_token_id: int | None = None,
):
    """A transformers config of the given family; odd vocab on purpose (exercises padding)."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-6,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
    )
    if family == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=hidden_size // num_heads, **common)
    elif family == "llama":
        cfg = transformers.LlamaConfig(**common)
    else:
        cfg = transformers.Qwen2Config(**common)
    _set_rope_theta(cfg, rope_theta)
    return cfg


def _set_rope_theta(cfg, theta: float) -> None:
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict):
        rp["rope_theta"] = theta
    if hasattr(cfg, "rope_theta") or rp is None:
        cfg.rope_theta = theta


def make_tiny_hf_model(out_dir: str | Path | None = None, family: str = "qwen3", *, seed: int = 0, **kwargs):
    """Builds a random fp32 causal LM; saves it (safetensors) to `out_dir` when given. Returns the model."""
    import transformers

    cfg = tiny_hf_config(family, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    # Random init uses std 0.02; make the distribution less flat so sampling tests see structure.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.eval()
    if out_dir is not None:
        model.save_pretrained(str(out_dir), safe_serialization=True)
    return model
