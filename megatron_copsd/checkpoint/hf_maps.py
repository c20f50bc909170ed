"""HF <-> Megatron parameter name maps (data) and the reshaping functions for fused tensors.

One map serves both directions. Each entry: Megatron name -> (HF name(s), how the tensor is laid out):

- "replicated": the same tensor on every TP rank (norms);
- "row": split along dim 1 over TP (RowParallelLinear: o_proj, down_proj);
- "column": split along dim 0 over TP;
- "vocab": split along dim 0 over TP after padding the vocab to a multiple of tp*128 (embedding, LM head);
- "qkv": Megatron's fused `linear_qkv`, per query group [q heads of the group, k, v], groups split over TP;
- "gate_up": Megatron's fused `linear_fc1`, each TP shard is [gate shard; up shard].

Layer names are local to a pipeline stage in Megatron (`decoder.layers.{i}`) and global in HF
(`model.layers.{offset+i}`). The Transformer Engine layer spec fuses the pre-norms into the linears;
`TE_ALIASES` renames those so the same map works for both specs.
"""
from __future__ import annotations

import torch

LAYER_MAP_COMMON = {
    "input_layernorm.weight": ("model.layers.{i}.input_layernorm.weight", "replicated"),
    "self_attention.linear_qkv.weight": (
        ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
         "model.layers.{i}.self_attn.v_proj.weight"), "qkv"),
    "self_attention.linear_proj.weight": ("model.layers.{i}.self_attn.o_proj.weight", "row"),
    "pre_mlp_layernorm.weight": ("model.layers.{i}.post_attention_layernorm.weight", "replicated"),
    "mlp.linear_fc1.weight": (
        ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), "gate_up"),
    "mlp.linear_fc2.weight": ("model.layers.{i}.mlp.down_proj.weight", "row"),
}
QK_NORM = {
    "self_attention.q_layernorm.weight": ("model.layers.{i}.self_attn.q_norm.weight", "replicated"),
    "self_attention.k_layernorm.weight": ("model.layers.{i}.self_attn.k_norm.weight", "replicated"),
}
QKV_BIAS = {
    "self_attention.linear_qkv.bias": (
        ("model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
         "model.layers.{i}.self_attn.v_proj.bias"), "qkv"),
}
LAYER_MAPS = {
    "llama": LAYER_MAP_COMMON,
    "qwen2": {**LAYER_MAP_COMMON, **QKV_BIAS},
    "qwen3": {**LAYER_MAP_COMMON, **QK_NORM},
}
EMBEDDING = {"embedding.word_embeddings.weight": ("model.embed_tokens.weight", "vocab")}
FINAL = {
    "decoder.final_layernorm.weight": ("model.norm.weight", "replicated"),
    "output_layer.weight": ("lm_head.weight", "vocab"),
}
TE_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def layer_map(hf_config) -> dict:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in LAYER_MAPS:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(LAYER_MAPS)}")
    layer = dict(LAYER_MAPS[model_type])
    if model_type == "llama" and getattr(hf_config, "attention_bias", False):
        raise ValueError("attention_bias=True is unsupported for llama")
    return layer


def hf_names_for(mg_name: str, hf_config, pp_layer_offset: int = 0) -> tuple[tuple[str, ...], str]:
    """(HF names, layout) for one Megatron parameter name of a pipeline stage."""
    for table in (EMBEDDING, FINAL):
        if mg_name in table:
            names, layout = table[mg_name]
            if mg_name == "output_layer.weight" and getattr(hf_config, "tie_word_embeddings", False):
                names = "model.embed_tokens.weight"
            return (names,) if isinstance(names, str) else names, layout
    prefix = "decoder.layers."
    if not mg_name.startswith(prefix):
        raise KeyError(mg_name)
    idx, rest = mg_name[len(prefix):].split(".", 1)
    table = layer_map(hf_config)
    if rest not in table:
        raise KeyError(mg_name)
    names, layout = table[rest]
    names = (names,) if isinstance(names, str) else names
    return tuple(n.format(i=int(idx) + pp_layer_offset) for n in names), layout


def te_to_local_name(name: str) -> str:
    for local, te in TE_ALIASES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


# ----------------------------------------------------------------------------------- reshaping

def qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_heads: int, num_groups: int,
                    head_dim: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """HF q/k/v ([heads*hd, ...]) -> this TP rank's fused QKV, interleaved per query group."""
    rest = q.shape[1:]
    heads_per_group = num_heads // num_groups
    q = q.reshape(num_groups, heads_per_group * head_dim, *rest)
    k = k.reshape(num_groups, head_dim, *rest)
    v = v.reshape(num_groups, head_dim, *rest)
    fused = torch.cat([q, k, v], dim=1)  # [groups, (hpg + 2) * hd, ...]
    groups_per_rank = num_groups // tp_size
    shard = fused[tp_rank * groups_per_rank:(tp_rank + 1) * groups_per_rank]
    return shard.reshape(-1, *rest).contiguous()


def qkv_to_hf(shards: list[torch.Tensor], *, num_heads: int, num_groups: int, head_dim: int):
    """Inverse of `qkv_to_megatron` over all TP shards -> (q, k, v)."""
    heads_per_group = num_heads // num_groups
    rest = shards[0].shape[1:]
    fused = torch.cat(shards, dim=0).reshape(num_groups, (heads_per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(fused, [heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())


def gate_up_to_megatron(gate: torch.Tensor, up: torch.Tensor, *, tp_rank: int, tp_size: int) -> torch.Tensor:
    return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0).contiguous()


def gate_up_to_hf(shards: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
    return torch.cat(gates, dim=0).contiguous(), torch.cat(ups, dim=0).contiguous()


def vocab_to_megatron(weight: torch.Tensor, padded_vocab: int, *, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Pads rows with zeros up to `padded_vocab`, returns this rank's contiguous slice."""
    if padded_vocab > weight.shape[0]:
        pad = weight.new_zeros(padded_vocab - weight.shape[0], *weight.shape[1:])
        weight = torch.cat([weight, pad], dim=0)
    return weight.chunk(tp_size, dim=0)[tp_rank].contiguous()


def vocab_to_hf(shards: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Concatenates TP shards and drops the padding rows (they never reach HF)."""
    return torch.cat(shards, dim=0)[:vocab_size].contiguous()
