"""Hugging Face export of a live TP / PP-sharded model, streamed shard by shard.

    export_hf_streaming(model, hf_config, out_dir, tokenizer_dir=...)   # collective over one model replica

No rank ever holds the whole model: parameter by parameter, the TP shards are gathered to the stage's TP
rank 0, converted to HF names / layouts and appended to the current safetensors shard, which is written
and freed at `max_shard_bytes`. Every pipeline stage writes its own shards in parallel. Peak extra memory
per writer: one shard plus one gathered parameter. Then rank 0 names the files in the usual
`model-0000i-of-0000N.safetensors` pattern, writes the index, config.json and tokenizer files, checks every
expected HF tensor was written with its shape, and renames the temp folder into place (atomic: on error
nothing is left at `out_dir`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_copsd.checkpoint import hf_maps
from megatron_copsd.checkpoint.convert import (
    _layer_offset,
    _name_to_hf,
    expected_hf_shapes,
    load_hf_config,
    megatron_names,
    publish_hf_dir,
)


def export_hf_streaming(model, hf_config, out_dir: str | os.PathLike, *, tokenizer_dir=None,
                        max_shard_bytes: int = 2 * 1024**3) -> Optional[Path]:
    """Collective over the model-parallel group of one replica (call on the DP-rank-0 ranks only).
    Returns `out_dir` on global rank 0, None elsewhere."""
    from safetensors.torch import save_file

    from megatron.core import parallel_state

    from megatron_copsd.megatron.model_provider import unwrap_model

    hf_config = load_hf_config(hf_config)
    mp_group = parallel_state.get_model_parallel_group()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    pp_size, pp_rank = parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_rank()
    root = dist.get_rank() == 0
    out_dir = Path(out_dir)
    box = [None]
    if root:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        box[0] = tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent)
    dist.broadcast_object_list(box, src=0, group=mp_group)
    tmp = Path(box[0])
    offset, _ = _layer_offset(hf_config, pp_rank, pp_size)
    tied = getattr(hf_config, "tie_word_embeddings", False)
    local = {hf_maps.te_to_local_name(k): v for k, v in unwrap_model(model).state_dict().items()
             if not k.endswith("_extra_state")}
    expected = set(megatron_names(hf_config, pp_rank=pp_rank, pp_size=pp_size))
    if set(local) != expected:
        raise ValueError(f"model state of pp_rank={pp_rank}: names differ from the HF map "
                         f"(model-only {sorted(set(local) - expected)[:3]}, map-only {sorted(expected - set(local))[:3]})")
    written: list[tuple[str, dict[str, tuple]]] = []  # (file, {hf name: shape}) of this rank
    buf: dict[str, torch.Tensor] = {}
    size = 0

    def flush():
        nonlocal buf, size
        if buf:
            fname = f"part-pp{pp_rank:03d}-{len(written):05d}.safetensors"
            save_file(buf, str(tmp / fname), metadata={"format": "pt"})
            written.append((fname, {k: tuple(v.shape) for k, v in buf.items()}))
        buf, size = {}, 0

    try:
        for name in sorted(expected):  # same order on every TP rank: the gathers pair up
            t = local[name].detach().contiguous()
            parts = [torch.empty_like(t) for _ in range(tp_size)] if tp_size > 1 else [t]
            if tp_size > 1:
                dist.all_gather(parts, t, group=tp_group)
            if tp_rank != 0 or (tied and name == "output_layer.weight"):
                continue  # one writer per stage; a tied head is the embedding (written by stage 0)
            for hf_name, tensor in _name_to_hf(name, [p.cpu() for p in parts], hf_config, offset).items():
                nbytes = tensor.numel() * tensor.element_size()
                if buf and size + nbytes > max_shard_bytes:
                    flush()
                buf[hf_name] = tensor.contiguous()
                size += nbytes
        flush()
        everyone: list = [None] * dist.get_world_size(mp_group)
        dist.all_gather_object(everyone, (pp_rank, written), group=mp_group)
        if root:
            _finish(everyone, hf_config, tmp, out_dir, tokenizer_dir)
    except BaseException:
        if root:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier(group=mp_group)
    return out_dir if root else None


def _finish(everyone: list, hf_config, tmp: Path, out_dir: Path, tokenizer_dir) -> None:
    files = [f for _, written in sorted(everyone, key=lambda x: x[0]) for f in written]
    shapes = {}
    for _, names in files:
        shapes.update(names)
    want = expected_hf_shapes(hf_config)
    if getattr(hf_config, "tie_word_embeddings", False):
        want.pop("lm_head.weight", None)
    if set(shapes) != set(want):
        raise ValueError(f"HF export: missing {sorted(set(want) - set(shapes))[:3]}, "
                         f"unexpected {sorted(set(shapes) - set(want))[:3]}")
    for name, shape in want.items():
        if tuple(shapes[name]) != tuple(shape):
            raise ValueError(f"HF export: {name} has shape {shapes[name]}, expected {tuple(shape)}")
    weight_map, total = {}, 0
    for i, (fname, names) in enumerate(files):
        final = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(tmp / fname, tmp / final)
        weight_map.update({n: final for n in names})
        total += (tmp / final).stat().st_size
    publish_hf_dir(tmp, out_dir, weight_map, total, hf_config, tokenizer_dir, num_files=len(files))
