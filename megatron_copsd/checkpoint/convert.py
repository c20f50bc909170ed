"""HF safetensors <-> Megatron per-rank state dicts, and loading/gathering live models.

    hf = load_hf_state_dict("hf_dir")                                   # safetensors (sharded + index)
    mg = hf_to_megatron(hf, cfg, tp_rank=0, tp_size=2, pp_rank=0, pp_size=1)
    hf_again = megatron_to_hf([[mg_tp0, mg_tp1]], cfg)                 # states_by_pp_tp[pp][tp]
    load_hf_into_model(model, "hf_dir", cfg)                            # this rank's shard, checked
    full = gather_hf_state_dict(model, cfg)                             # on every rank (or only_first_rank=True)
    save_hf_checkpoint(full, cfg, "out_dir", tokenizer_dir="hf_dir")    # atomic

Every direction validates names and shapes against the HF config and raises `ValueError` naming the
tensor (or file); nothing is loaded partially and nothing is half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from megatron_copsd.checkpoint import hf_maps
from megatron_copsd.megatron.model_provider import (check_supported, head_dim, load_hf_config, num_kv_heads,
                                                    padded_vocab_size)

SAFE_INDEX = "model.safetensors.index.json"
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------------- HF files

def _load_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise ValueError(f"cannot read safetensors file {path}: {exc}") from exc


def _load_safetensors_names(path: Path, names) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {n: f.get_tensor(n) for n in names if n in set(f.keys())}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise ValueError(f"cannot read safetensors file {path}: {exc}") from exc


def load_hf_state_dict(hf_dir: str | os.PathLike, names=None) -> dict[str, torch.Tensor]:
    """Tensors of a HF checkpoint dir: sharded safetensors with index, one safetensors file, or a
    `pytorch_model.bin` read with `weights_only=True`. `names`: read only these (safetensors reads just
    their bytes; shards holding none of them are not opened); default all."""
    if names is not None:
        names = sorted(set(names))
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ValueError(f"HF checkpoint directory {hf_dir} does not exist")
    index = hf_dir / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"bad safetensors index {index}: {exc}") from exc
        state: dict[str, torch.Tensor] = {}
        wanted = set(weight_map) if names is None else set(names)
        for fname in sorted({weight_map[n] for n in wanted if n in weight_map}):
            path = hf_dir / fname
            if not path.is_file():
                raise ValueError(f"{index} lists shard {fname}, which does not exist")
            if names is None:
                state.update(_load_safetensors_file(path))
            else:
                state.update(_load_safetensors_names(path, [n for n in names if weight_map.get(n) == fname]))
        missing = sorted((set(weight_map) if names is None else set(names) & set(weight_map)) - set(state))
        if missing:
            raise ValueError(f"tensor {missing[0]} is listed in {index} but absent from its shard")
        return state
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return _load_safetensors_file(single) if names is None else _load_safetensors_names(single, names)
    binary = hf_dir / "pytorch_model.bin"
    if binary.is_file():
        try:
            state = torch.load(str(binary), map_location="cpu", weights_only=True)
            return state if names is None else {n: state[n] for n in names if n in state}
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"cannot read {binary} with weights_only=True: {exc}") from exc
    raise ValueError(f"no model.safetensors, {SAFE_INDEX} or pytorch_model.bin in {hf_dir}")


def expected_hf_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF checkpoint of this config must hold, with its shape."""
    check_supported(hf_config)
    H, V, F_ = hf_config.hidden_size, hf_config.vocab_size, hf_config.intermediate_size
    hd, nh, ng = head_dim(hf_config), hf_config.num_attention_heads, num_kv_heads(hf_config)
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not getattr(hf_config, "tie_word_embeddings", False):
        shapes["lm_head.weight"] = (V, H)
    per_layer = {
        "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (nh * hd, H), "self_attn.k_proj.weight": (ng * hd, H),
        "self_attn.v_proj.weight": (ng * hd, H), "self_attn.o_proj.weight": (H, nh * hd),
        "mlp.gate_proj.weight": (F_, H), "mlp.up_proj.weight": (F_, H), "mlp.down_proj.weight": (H, F_),
    }
    if hf_config.model_type == "qwen3":
        per_layer.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
    if hf_config.model_type == "qwen2":
        per_layer.update({"self_attn.q_proj.bias": (nh * hd,), "self_attn.k_proj.bias": (ng * hd,),
                          "self_attn.v_proj.bias": (ng * hd,)})
    for i in range(hf_config.num_hidden_layers):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{i}.{name}"] = shape
    return shapes


def validate_hf_state(hf_state: dict, hf_config, *, where: str = "HF checkpoint") -> None:
    """ValueError naming the first missing / unexpected / wrongly shaped tensor."""
    expected = expected_hf_shapes(hf_config)
    tied = getattr(hf_config, "tie_word_embeddings", False)
    for name, shape in expected.items():
        if name not in hf_state:
            raise ValueError(f"{where}: missing tensor {name}")
        if tuple(hf_state[name].shape) != shape:
            raise ValueError(f"{where}: tensor {name} has shape {tuple(hf_state[name].shape)}, "
                             f"config expects {shape}")
    for name in hf_state:
        if name in expected or name.endswith(IGNORED_HF_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        raise ValueError(f"{where}: unexpected tensor {name} (not part of a {hf_config.model_type} model "
                         f"with this config)")


# ----------------------------------------------------------------------------------- pure conversion

def _layer_offset(hf_config, pp_rank: int, pp_size: int) -> tuple[int, int]:
    L = hf_config.num_hidden_layers
    if L % pp_size:
        raise ValueError(f"num_hidden_layers={L} is not divisible by pp_size={pp_size}")
    per_stage = L // pp_size
    return pp_rank * per_stage, per_stage


def megatron_names(hf_config, *, pp_rank: int, pp_size: int) -> list[str]:
    """Megatron (local layer spec) parameter names held by one pipeline stage."""
    _, per_stage = _layer_offset(hf_config, pp_rank, pp_size)
    tied = getattr(hf_config, "tie_word_embeddings", False)
    names = []
    if pp_rank == 0:
        names += list(hf_maps.EMBEDDING)
    layer = hf_maps.layer_map(hf_config)
    names += [f"decoder.layers.{i}.{k}" for i in range(per_stage) for k in layer]
    if pp_rank == pp_size - 1:
        names.append("decoder.final_layernorm.weight")
        if not tied or pp_size > 1:  # tied at PP>1: the last stage keeps its own copy of the embedding
            names.append("output_layer.weight")
    return names


def stage_hf_names(hf_config, *, pp_rank: int = 0, pp_size: int = 1) -> list[str]:
    """HF tensor names one pipeline stage reads when loading (a tied LM head reads the embedding)."""
    offset, _ = _layer_offset(hf_config, pp_rank, pp_size)
    names: set[str] = set()
    for name in megatron_names(hf_config, pp_rank=pp_rank, pp_size=pp_size):
        names.update(hf_maps.hf_names_for(name, hf_config, offset)[0])
    return sorted(names)


def _validate_stage_subset(hf_state: dict, hf_config, pp_rank: int, pp_size: int) -> None:
    expected = expected_hf_shapes(hf_config)
    for name in stage_hf_names(hf_config, pp_rank=pp_rank, pp_size=pp_size):
        if name not in hf_state:
            raise ValueError(f"HF checkpoint: missing tensor {name}")
        if tuple(hf_state[name].shape) != expected[name]:
            raise ValueError(f"HF checkpoint: tensor {name} has shape {tuple(hf_state[name].shape)}, "
                             f"config expects {expected[name]}")


def hf_to_megatron(hf_state: dict, hf_config, *, tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0,
                   pp_size: int = 1) -> dict[str, torch.Tensor]:
    """This (TP, PP) rank's Megatron state dict (local-spec names, local layer indices)."""
    hf_config = load_hf_config(hf_config)
    if set(expected_hf_shapes(hf_config)) <= set(hf_state):
        validate_hf_state(hf_state, hf_config)
    else:  # only this stage's tensors were read (load_hf_state_dict(names=stage_hf_names(...)))
        _validate_stage_subset(hf_state, hf_config, pp_rank, pp_size)
    offset, _ = _layer_offset(hf_config, pp_rank, pp_size)
    nh, ng, hd = hf_config.num_attention_heads, num_kv_heads(hf_config), head_dim(hf_config)
    if ng % tp_size or nh % tp_size:
        raise ValueError(f"num_key_value_heads={ng} / num_attention_heads={nh} not divisible by tp_size={tp_size}")
    padded = padded_vocab_size(hf_config.vocab_size, tp_size)
    out = {}
    for name in megatron_names(hf_config, pp_rank=pp_rank, pp_size=pp_size):
        hf_names, layout = hf_maps.hf_names_for(name, hf_config, offset)
        src = [hf_state[n] for n in hf_names]
        if layout == "replicated":
            out[name] = src[0].clone()
        elif layout == "row":
            out[name] = src[0].chunk(tp_size, dim=1)[tp_rank].contiguous()
        elif layout == "column":
            out[name] = src[0].chunk(tp_size, dim=0)[tp_rank].contiguous()
        elif layout == "vocab":
            out[name] = hf_maps.vocab_to_megatron(src[0], padded, tp_rank=tp_rank, tp_size=tp_size)
        elif layout == "qkv":
            out[name] = hf_maps.qkv_to_megatron(*src, num_heads=nh, num_groups=ng, head_dim=hd,
                                                tp_rank=tp_rank, tp_size=tp_size)
        elif layout == "gate_up":
            out[name] = hf_maps.gate_up_to_megatron(*src, tp_rank=tp_rank, tp_size=tp_size)
        else:  # pragma: no cover - the maps only use the layouts above
            raise AssertionError(layout)
    return out


def _stage_to_hf(tp_states: list[dict], hf_config, pp_rank: int, pp_size: int) -> dict[str, torch.Tensor]:
    offset, _ = _layer_offset(hf_config, pp_rank, pp_size)
    tied = getattr(hf_config, "tie_word_embeddings", False)
    expected = set(megatron_names(hf_config, pp_rank=pp_rank, pp_size=pp_size))
    out = {}
    for tp_rank, state in enumerate(tp_states):
        names = {hf_maps.te_to_local_name(k) for k in state if not k.endswith("_extra_state")}
        if names != expected:
            extra, missing = sorted(names - expected), sorted(expected - names)
            what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
            raise ValueError(f"Megatron state of pp_rank={pp_rank} tp_rank={tp_rank}: {what}")
    local = [{hf_maps.te_to_local_name(k): v for k, v in s.items() if not k.endswith("_extra_state")}
             for s in tp_states]
    for name in sorted(expected):
        if tied and name == "output_layer.weight":
            continue  # a replica of the embedding (exported from stage 0)
        out.update(_name_to_hf(name, [s[name].detach().cpu() for s in local], hf_config, offset))
    return out


def _name_to_hf(name: str, shards: list, hf_config, offset: int) -> dict[str, torch.Tensor]:
    """HF tensor(s) of one Megatron parameter from its TP shards (in TP-rank order)."""
    nh, ng, hd = hf_config.num_attention_heads, num_kv_heads(hf_config), head_dim(hf_config)
    hf_names, layout = hf_maps.hf_names_for(name, hf_config, offset)
    if layout == "replicated":
        tensors = (shards[0].clone(),)
    elif layout == "row":
        tensors = (torch.cat(shards, dim=1),)
    elif layout == "column":
        tensors = (torch.cat(shards, dim=0),)
    elif layout == "vocab":
        tensors = (hf_maps.vocab_to_hf(shards, hf_config.vocab_size),)
    elif layout == "qkv":
        tensors = hf_maps.qkv_to_hf(shards, num_heads=nh, num_groups=ng, head_dim=hd)
    elif layout == "gate_up":
        tensors = hf_maps.gate_up_to_hf(shards)
    else:  # pragma: no cover
        raise AssertionError(layout)
    return dict(zip(hf_names, tensors))


def megatron_to_hf(states_by_pp_tp: list[list[dict]], hf_config) -> dict[str, torch.Tensor]:
    """Full HF state dict from every rank's Megatron state (`states_by_pp_tp[pp_rank][tp_rank]`)."""
    hf_config = load_hf_config(hf_config)
    check_supported(hf_config)
    pp_size = len(states_by_pp_tp)
    out = {}
    for pp_rank, tp_states in enumerate(states_by_pp_tp):
        out.update(_stage_to_hf(tp_states, hf_config, pp_rank, pp_size))
    validate_hf_state(out, hf_config, where="converted Megatron checkpoint")
    return out


# ----------------------------------------------------------------------------------- live models

def _model_layer_offset(inner) -> int:
    layers = getattr(inner.decoder, "layers", [])
    return int(layers[0].layer_number) - 1 if len(layers) else 0


def load_hf_into_model(model, hf_dir_or_state, hf_config) -> None:
    """Copies this rank's shard of a HF checkpoint into a built model; every parameter must be covered."""
    from megatron.core import parallel_state

    from megatron_copsd.megatron.model_provider import unwrap_model

    hf_config = load_hf_config(hf_config)
    tp_rank, tp_size = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    pp_rank, pp_size = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_world_size()
    hf_state = hf_dir_or_state if isinstance(hf_dir_or_state, dict) else load_hf_state_dict(
        hf_dir_or_state, names=stage_hf_names(hf_config, pp_rank=pp_rank, pp_size=pp_size))
    inner = unwrap_model(model)
    expected_offset, _ = _layer_offset(hf_config, pp_rank, pp_size)
    if _model_layer_offset(inner) != expected_offset:
        raise ValueError(f"model's first layer is {_model_layer_offset(inner)}, expected {expected_offset} "
                         f"(only an even layer split over pipeline stages is supported)")
    mg = hf_to_megatron(hf_state, hf_config, tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp_rank, pp_size=pp_size)
    targets = {hf_maps.te_to_local_name(k): v for k, v in inner.state_dict(keep_vars=True).items()
               if not k.endswith("_extra_state")}
    if set(targets) != set(mg):
        extra, missing = sorted(set(targets) - set(mg)), sorted(set(mg) - set(targets))
        raise ValueError(f"model and converted checkpoint disagree: model-only {extra[:3]}, checkpoint-only {missing[:3]}")
    for name, src in mg.items():
        if tuple(targets[name].shape) != tuple(src.shape):
            raise ValueError(f"tensor {name}: model shape {tuple(targets[name].shape)} != converted {tuple(src.shape)}")
    with torch.no_grad():
        for name, src in mg.items():
            targets[name].copy_(src.to(dtype=targets[name].dtype))


def _stage_hf_shapes(hf_config, pp_rank: int, pp_size: int) -> dict[str, tuple[int, ...]]:
    """HF names (sorted) and shapes that `_stage_to_hf` produces for one pipeline stage."""
    offset, _ = _layer_offset(hf_config, pp_rank, pp_size)
    tied = getattr(hf_config, "tie_word_embeddings", False)
    shapes = expected_hf_shapes(hf_config)
    names = []
    for name in megatron_names(hf_config, pp_rank=pp_rank, pp_size=pp_size):
        if tied and name == "output_layer.weight":
            continue
        names += hf_maps.hf_names_for(name, hf_config, offset)[0]
    return {n: shapes[n] for n in sorted(names)}


_WIRE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _pp_transfer(buf, src_stage, pp_rank, pp_ranks, pp_group, only_first_rank) -> None:
    """`buf` from stage `src_stage` to stage 0 (send/recv) or to every stage (broadcast), in place."""
    import torch.distributed as dist

    if not only_first_rank:
        dist.broadcast(buf, src=pp_ranks[src_stage], group=pp_group)
    elif pp_rank == src_stage:
        dist.send(buf, dst=pp_ranks[0], group=pp_group)
    elif pp_rank == 0:
        dist.recv(buf, src=pp_ranks[src_stage], group=pp_group)


def gather_to_hf(local: dict[str, torch.Tensor], hf_config, *, where: str = "gathered model state",
                 only_first_rank: bool = False) -> dict | None:
    """HF-named full tensors from this rank's Megatron-named tensors (parameters, or their gradients),
    assembled over the TP and PP groups. Collective over the model-parallel group, tensor collectives only
    (on the tensors' own device: NCCL needs device tensors). Padding rows are dropped; a tied LM head is
    taken from the embedding (stage 0).

    `only_first_rank=True`: the result (CPU tensors) is built only on the group's first rank (TP rank 0 of
    pipeline stage 0); TP shards are gathered to TP rank 0 of each stage and each later stage sends its
    converted tensors to stage 0, one tensor at a time. Every other rank returns None and never holds
    more than its own shard plus one tensor in flight. Default: every rank gets the result."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    hf_config = load_hf_config(hf_config)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    pp_rank, pp_size = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_world_size()
    holds_stage = not only_first_rank or tp_rank == 0
    tp_states: list[dict] = [dict() for _ in range(tp_size)]
    device = torch.device("cpu")
    for name in sorted(local):  # same order on every rank: the collectives pair up
        t = local[name].detach().contiguous()
        device = t.device
        if tp_size == 1:
            parts = [t]
        elif only_first_rank:
            parts = [torch.empty_like(t) for _ in range(tp_size)] if tp_rank == 0 else None
            dist.gather(t, parts, dst=dist.get_process_group_ranks(tp_group)[0], group=tp_group)
        else:
            parts = [torch.empty_like(t) for _ in range(tp_size)]
            dist.all_gather(parts, t, group=tp_group)
        if holds_stage:
            for r in range(tp_size):
                tp_states[r][name] = parts[r].cpu()
        del parts
    if not holds_stage:
        return None
    stage = _stage_to_hf(tp_states, hf_config, pp_rank, pp_size)
    del tp_states
    if pp_size > 1:
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        pp_ranks = dist.get_process_group_ranks(pp_group)  # global ranks in stage order
        full = dict(stage) if (pp_rank == 0 or not only_first_rank) else {}
        for src_stage in range(1, pp_size) if only_first_rank else range(pp_size):
            shapes = _stage_hf_shapes(hf_config, src_stage, pp_size)
            # Names and shapes follow from the config; dtypes may differ per tensor (torch norms stay fp32).
            codes = torch.tensor([_WIRE_DTYPES.index(stage[n].dtype) for n in shapes] if pp_rank == src_stage
                                 else [0] * len(shapes), dtype=torch.int64, device=device)
            _pp_transfer(codes, src_stage, pp_rank, pp_ranks, pp_group, only_first_rank)
            for (name, shape), code in zip(shapes.items(), codes.tolist()):
                if pp_rank == src_stage:
                    buf = stage[name].to(device)
                elif pp_rank == 0 or not only_first_rank:
                    buf = torch.empty(shape, dtype=_WIRE_DTYPES[code], device=device)
                else:
                    continue
                _pp_transfer(buf, src_stage, pp_rank, pp_ranks, pp_group, only_first_rank)
                if pp_rank != src_stage:
                    full[name] = buf.cpu()
        if only_first_rank and pp_rank != 0:
            return None
        stage = full
    validate_hf_state(stage, hf_config, where=where)
    return stage


def gather_hf_state_dict(model, hf_config, *, only_first_rank: bool = False) -> dict[str, torch.Tensor] | None:
    """The full HF state dict (CPU tensors, padding dropped), assembled over the TP and PP groups: on every
    rank, or with `only_first_rank` only on the model-parallel group's first rank (None elsewhere).
    Collective: every rank of the model-parallel group must call it."""
    from megatron_copsd.megatron.model_provider import unwrap_model

    local = {k: v for k, v in unwrap_model(model).state_dict().items() if not k.endswith("_extra_state")}
    return gather_to_hf(local, hf_config, only_first_rank=only_first_rank)


# ----------------------------------------------------------------------------------- saving

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json",
                   "added_tokens.json")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def publish_hf_dir(tmp: Path, out_dir: Path, weight_map: dict, total_size: int, hf_config, tokenizer_dir,
                   *, num_files: int) -> None:
    """Completes a HF folder whose safetensors files are already in `tmp` (the index when there are several
    files, config.json, the tokenizer files) and moves it to `out_dir` in one rename."""
    if num_files > 1:
        (tmp / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total_size},
                                                  "weight_map": weight_map}, indent=2))
    hf_config.save_pretrained(str(tmp))
    if tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / fname
            if src.is_file():
                shutil.copy2(src, tmp / fname)
    _replace_dir(tmp, out_dir)


def save_hf_checkpoint(hf_state: dict, hf_config, out_dir: str | os.PathLike, *, tokenizer_dir=None,
                       max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Writes config.json + safetensors shards (+ index when >1 shard) + tokenizer files, atomically:
    everything goes to a temp dir beside `out_dir`, renamed into place at the end."""
    from safetensors.torch import save_file

    hf_config = load_hf_config(hf_config)
    validate_hf_state(hf_state, hf_config, where="state to save")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tied = getattr(hf_config, "tie_word_embeddings", False)
        names = [n for n in hf_state if not (tied and n == "lm_head.weight")]
        shards: list[list[str]] = [[]]
        size = 0
        for name in names:
            nbytes = hf_state[name].numel() * hf_state[name].element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: hf_state[n].detach().cpu().contiguous().clone() for n in shard}, str(tmp / fname),
                      metadata={"format": "pt"})
            weight_map.update({n: fname for n in shard})
        total = sum(t.numel() * t.element_size() for t in hf_state.values())
        publish_hf_dir(tmp, out_dir, weight_map, total, hf_config, tokenizer_dir, num_files=len(shards))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
