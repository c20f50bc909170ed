"""Megatron checkpoints on disk: per-rank state files and megatron-core distributed checkpoints.

Per-rank layout (what `copsd convert hf-to-megatron --format torch` writes; no process group needed):

    out_dir/copsd_megatron.json                     {"tp_size", "pp_size", "hf_config": {...}}
    out_dir/mp_rank_{tp:02d}_{pp:03d}/model.pt      this rank's local-spec state dict (torch.save)

Distributed checkpoints (`--format dist`) are megatron-core `dist_checkpointing` (torch_dist) folders
written from `model.sharded_state_dict()`, so they reshard on load; they need a live process group.
Loading uses `weights_only=True` throughout.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

META = "copsd_megatron.json"


def rank_dir(root: str | os.PathLike, tp_rank: int, pp_rank: int) -> Path:
    return Path(root) / f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def save_megatron_states(states_by_pp_tp: list[list[dict]], hf_config, out_dir: str | os.PathLike) -> Path:
    """Writes every rank's state (`states_by_pp_tp[pp][tp]`) atomically (temp dir, then rename)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        pp_size, tp_size = len(states_by_pp_tp), len(states_by_pp_tp[0])
        for pp_rank, row in enumerate(states_by_pp_tp):
            for tp_rank, state in enumerate(row):
                d = rank_dir(tmp, tp_rank, pp_rank)
                d.mkdir(parents=True)
                torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, d / "model.pt")
        meta = {"tp_size": tp_size, "pp_size": pp_size, "hf_config": hf_config.to_dict()}
        (tmp / META).write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            raise ValueError(f"output directory {out_dir} already exists; refusing to overwrite")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_megatron_meta(root: str | os.PathLike) -> dict:
    path = Path(root) / META
    if not path.is_file():
        raise ValueError(f"{root} is not a per-rank Megatron checkpoint written by copsd (no {META})")
    return json.loads(path.read_text())


def hf_config_from_meta(meta: dict):
    import transformers

    cfg = dict(meta["hf_config"])
    model_type = cfg.pop("model_type", None)
    try:
        return transformers.AutoConfig.for_model(model_type, **cfg)
    except ValueError as exc:
        raise ValueError(f"unsupported model_type {model_type!r} in {META}: {exc}") from exc


def load_megatron_states(root: str | os.PathLike) -> tuple[list[list[dict]], dict]:
    """(states_by_pp_tp, meta) from a per-rank checkpoint; missing rank files are named in the error."""
    meta = read_megatron_meta(root)
    states = []
    for pp_rank in range(meta["pp_size"]):
        row = []
        for tp_rank in range(meta["tp_size"]):
            path = rank_dir(root, tp_rank, pp_rank) / "model.pt"
            if not path.is_file():
                raise ValueError(f"missing rank file {path}")
            try:
                row.append(torch.load(str(path), map_location="cpu", weights_only=True))
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"cannot read {path} with weights_only=True: {exc}") from exc
        states.append(row)
    return states, meta


def save_dist_checkpoint(model, ckpt_dir: str | os.PathLike) -> None:
    """megatron-core distributed checkpoint of the model (collective over all ranks). On CPU the
    writer forks workers that need `psutil` (without it the save hangs silently)."""
    import psutil  # noqa: F401 - fail loudly instead of hanging (see docs/platform.md)
    from megatron.core import dist_checkpointing

    from megatron_copsd.megatron.model_provider import unwrap_model

    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(unwrap_model(model).sharded_state_dict(), str(ckpt_dir))


def load_dist_checkpoint(model, ckpt_dir: str | os.PathLike) -> None:
    """Loads a megatron-core distributed checkpoint into the (possibly differently sharded) model."""
    from megatron.core import dist_checkpointing

    from megatron_copsd.megatron.model_provider import unwrap_model

    if not Path(ckpt_dir).is_dir():
        raise ValueError(f"distributed checkpoint directory {ckpt_dir} does not exist")
    inner = unwrap_model(model)
    state = dist_checkpointing.load(inner.sharded_state_dict(), str(ckpt_dir))
    inner.load_state_dict(state, strict=True)
