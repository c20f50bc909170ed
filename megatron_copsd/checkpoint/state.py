"""Training-state checkpoints: atomic, per-rank, keep-last-N, resumable.

    save_training_state(root, step, state, keep_last=2)       # every rank calls it (collective)
    path = resolve_resume("auto", root)                        # latest complete checkpoint or None
    state = load_training_state(path)                          # this rank's dict

Layout: `<root>/step_<N>/rank_<r>.pt` (one file per global rank: the model shard, optimizer, scheduler,
RNG states, data position, step ...) plus `meta.json` written last by rank 0. Every rank writes into
`<root>/step_<N>.tmp/`; after a barrier rank 0 writes `meta.json` and renames the folder to `step_<N>`.
A crash at any point before the rename leaves only a `.tmp` folder, which `latest_checkpoint` ignores
(and the next save of that step replaces), so the previous checkpoint stays intact. Old checkpoints
beyond `keep_last` are deleted after the rename.

RNG helpers capture / restore python, numpy and torch (CPU and, when present, CUDA) generators.
Collectives use the default torch.distributed group when it is initialised.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

_STEP_RE = re.compile(r"^step_(\d+)$")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def capture_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed folders holding meta.json), sorted by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "meta.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(resume: str, root: str | Path) -> Optional[Path]:
    """`auto` -> latest complete checkpoint under root (or None); `none` -> None; else that folder."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise ValueError(f"checkpoint.resume={resume!r}: not a complete checkpoint folder (no meta.json)")
    return path


def save_training_state(root: str | Path, step: int, state: dict, *, keep_last: int = 2,
                        meta: Optional[dict] = None) -> Path:
    """Writes this rank's `state` for `step`; collective over the default group. Returns the final folder."""
    rank, world = _rank_world()
    root = Path(root)
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # leftover of a crash during an earlier save of this step
        tmp.mkdir(parents=True)
    _barrier()
    part = tmp / f"rank_{rank:05d}.pt.part"
    torch.save(state, part)
    os.replace(part, tmp / f"rank_{rank:05d}.pt")
    _barrier()
    if rank == 0:
        missing = [r for r in range(world) if not (tmp / f"rank_{r:05d}.pt").is_file()]
        if missing:
            raise RuntimeError(f"checkpoint {tmp}: ranks {missing} did not write their state")
        info = {"step": step, "world_size": world, "time": time.time(), **(meta or {})}
        (tmp / "meta.json").write_text(json.dumps(info, indent=1))
        if final.exists():
            shutil.rmtree(final)  # re-saving the same step (e.g. final save right after a periodic one)
        os.replace(tmp, final)
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_training_state(path: str | Path, *, map_location: str = "cpu") -> dict:
    """This rank's state from a checkpoint folder; checks the world size matches the one that saved it."""
    rank, world = _rank_world()
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("world_size") != world:
        raise ValueError(f"checkpoint {path} was written by {meta.get('world_size')} ranks, this run has {world}; "
                         "resume with the same layout (or export to HF and restart)")
    return torch.load(path / f"rank_{rank:05d}.pt", map_location=map_location, weights_only=False)


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "meta.json").read_text())
