"""Training checkpoints in megatron-core's distributed format (`torch_dist`): sharded, reshardable, async.

    writer = CheckpointWriter(root, keep_last=2, async_save=True)
    writer.save(step, sharded_state_dict, rng_state, meta={...})   # collective; returns once the write started
    writer.poll()                                                    # collective, once per step: finalizes done saves
    writer.wait()                                                    # collective: the pending save completes
    path = resolve_resume("auto", root)                              # latest complete checkpoint or None
    state = load_sharded(path, sharded_state_dict)                   # collective; reshards to this run's layout

Layout of one checkpoint `<root>/step_<N>/`:
    metadata.json, .metadata, common.pt, __*.distcp   megatron-core `dist_checkpointing` (torch_dist): every
                                                      tensor shard written once, by the rank owning its main
                                                      replica; plain values (scheduler, data position) in common.pt
    rng/rank_<r>.pt                                   the RNG states of global rank r (and its TP/PP/DP position)
    copsd_checkpoint.json                             completion marker, written last: step, layout, the name and
                                                      byte size of every file, save timings
Every rank writes into `<root>/step_<N>.tmp/`. Finalisation (after the writers of *all* ranks finished:
megatron-core's finalize barrier) lets rank 0 write the marker and rename the folder to `step_<N>`; only
then are checkpoints beyond `keep_last` deleted. A crash or SIGKILL before the rename leaves a `.tmp`
folder that `list_checkpoints` ignores (the next save of that step replaces it): the previous checkpoint
stays intact and `resume=auto` picks it.

Asynchronous save: the tensor write runs in a forked process (megatron-core's `AsyncCallsQueue`; the fork
is a copy-on-write snapshot, so training may change the weights meanwhile). The next `save`, `wait` or
`close` waits for it. On CPU the writer's worker processes need `psutil` (otherwise the save hangs).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

MARKER = "copsd_checkpoint.json"
_STEP_RE = re.compile(r"^step_(\d+)$")
# Written by megatron-core's dist_checkpointing: the loader needs all of them (plus the .distcp shards
# that `.metadata` lists).
_DIST_FILES = ("metadata.json", ".metadata", "common.pt")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generators, as types `torch.load(weights_only=True)` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- folders
def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed `step_<N>` folders holding the completion marker), sorted by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(resume: str, root: str | Path) -> Optional[Path]:
    """`auto` -> latest complete checkpoint under root (or None); `none` -> None; else that folder (checked)."""
    if resume == "none":
        return None
    if resume == "auto":
        path = latest_checkpoint(root)
    else:
        path = Path(resume)
        if not path.is_dir():
            raise ValueError(f"checkpoint.resume={resume!r}: no such checkpoint folder")
    if path is not None:
        validate_checkpoint(path)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    marker = Path(path) / MARKER
    try:
        return json.loads(marker.read_text())
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} is incomplete: missing {marker} (the save did not finish)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint {path}: bad completion marker {marker}: {exc}") from None


def validate_checkpoint(path: str | Path) -> dict:
    """The marker's contents; ValueError naming the first missing, truncated or unreadable file."""
    path = Path(path)
    meta = read_meta(path)
    files = meta.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"checkpoint {path}: bad completion marker {path / MARKER} (no file list)")
    for name in _DIST_FILES:
        if name not in files:
            raise ValueError(f"checkpoint {path}: completion marker does not list {name}")
    for name, size in sorted(files.items()):
        f = path / name
        if not f.is_file():
            raise ValueError(f"checkpoint {path} is damaged: missing file {f}")
        if f.stat().st_size != size:
            raise ValueError(f"checkpoint {path} is damaged: {f} has {f.stat().st_size} bytes, "
                             f"the save wrote {size}")
    for r in range(meta["world_size"]):
        if f"rng/rank_{r:05d}.pt" not in files:
            raise ValueError(f"checkpoint {path}: missing file {path / 'rng' / f'rank_{r:05d}.pt'}")
    try:
        json.loads((path / "metadata.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint {path} is damaged: bad file {path / 'metadata.json'}: {exc}") from None
    return meta


def _folder_files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- save
class CheckpointWriter:
    """Saves sharded state dicts into atomic step folders, optionally asynchronously (see module doc).

    `on_complete(record)` is called on rank 0 for each finalised checkpoint with its timings and size:
    `blocking_s` (time the training loop was stopped for it), `write_s` (from the start of the save to
    the newest file's modification time: the write itself, including any overlap with training),
    `bytes`, `mb_per_s` (bytes / write_s).
    """

    def __init__(self, root: str | Path, *, keep_last: int = 2, async_save: bool = False,
                 on_complete: Optional[Callable[[dict], None]] = None) -> None:
        self.root, self.keep_last, self.async_save = Path(root), keep_last, async_save
        self.on_complete = on_complete
        self._queue = None
        self.pending: Optional[int] = None  # step being written asynchronously
        # megatron-core's writer starts a multiprocessing Manager (a spawned interpreter) on its first save:
        # seconds, which would otherwise stall the first checkpoint. Started now, in the background.
        self._warm = threading.Thread(target=_start_writer_manager, daemon=True)
        self._warm.start()
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()

    def save(self, step: int, sharded_state_dict: dict, rng_state: dict, *, meta: Optional[dict] = None) -> None:
        """Collective. Waits for the previous save, then writes `step` (returns once started if async)."""
        import psutil  # noqa: F401 - the writer's workers need it; fail loudly instead of hanging
        from megatron.core import dist_checkpointing

        self.wait()
        rank, world = _rank_world()
        t0 = time.time()
        self._warm.join()
        tmp = self.root / f"step_{step}.tmp"
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # leftover of a crash during an earlier save of this step
            tmp.mkdir(parents=True)
        _barrier()
        request = dist_checkpointing.save(sharded_state_dict, str(tmp), sharded_strategy=_save_strategy(),
                                          async_sharded_save=self.async_save)
        (tmp / "rng").mkdir(exist_ok=True)  # after megatron-core's check that the folder starts empty
        part = tmp / "rng" / f"rank_{rank:05d}.pt.part"
        torch.save(rng_state, part)
        os.replace(part, tmp / "rng" / f"rank_{rank:05d}.pt")
        info = {"step": step, "world_size": world, "time": t0, **(meta or {})}
        if request is None:
            self._finalize(tmp, step, info, t0, time.time() - t0)
            return
        blocking = time.time() - t0
        request.add_finalize_fn(lambda: self._finalize(tmp, step, info, t0, blocking))
        self._queue.schedule_async_request(request)
        self.pending = step

    def poll(self) -> None:
        """Collective: finalises an asynchronous save whose writers all finished (non-blocking)."""
        if self._queue is not None and self._queue.get_num_unfinalized_calls():
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Collective: blocks until the pending asynchronous save is written and finalised."""
        if self._queue is not None and self._queue.get_num_unfinalized_calls():
            self._queue.maybe_finalize_async_calls(blocking=True)

    def close(self) -> None:
        self.wait()

    def _finalize(self, tmp: Path, step: int, info: dict, t0: float, blocking: float) -> None:
        """Runs on every rank after every rank's writer finished (megatron-core's finalize barrier)."""
        rank, world = _rank_world()
        final = self.root / f"step_{step}"
        _barrier()
        if rank == 0:
            missing = [r for r in range(world) if not (tmp / "rng" / f"rank_{r:05d}.pt").is_file()]
            if missing:
                raise RuntimeError(f"checkpoint {tmp}: ranks {missing} did not write their RNG state")
            files = _folder_files(tmp)
            newest = max((tmp / name).stat().st_mtime for name in files)
            write_s = max(newest - t0, blocking, 1e-6)
            nbytes = sum(files.values())
            record = {"step": step, "bytes": nbytes, "blocking_s": blocking, "write_s": write_s,
                      "mb_per_s": nbytes / 1e6 / write_s, "async": self.async_save}
            marker = {**info, "files": files, "save": record}
            (tmp / (MARKER + ".part")).write_text(json.dumps(marker, indent=1))
            os.replace(tmp / (MARKER + ".part"), tmp / MARKER)
            if final.exists():
                shutil.rmtree(final)  # re-saving the same step (e.g. final save right after a periodic one)
            os.replace(tmp, final)
            for _, old in list_checkpoints(self.root)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            if self.on_complete is not None:
                self.on_complete(record)
        self.pending = None
        _barrier()


_MANAGER: dict = {}


def _writer_manager_init() -> None:
    """Runs in megatron-core's results-queue Manager process. Slurm signals every process of the job step:
    with the default action SIGUSR1 (the pre-time-limit signal) or SIGTERM would kill the Manager, and the
    trainer's final save would then fail in finalisation. The Manager ignores them and exits when its parent
    is gone (checked every second; PR_SET_PDEATHSIG would fire when the starting *thread* ends)."""
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _start_writer_manager() -> None:
    """Starts the Manager megatron-core's async writer reports through (its own would start lazily, with
    default signal handling) and installs its queue where megatron-core looks for it."""
    try:
        import multiprocessing as mp
        from multiprocessing.managers import SyncManager

        from megatron.core.dist_checkpointing.strategies import filesystem_async

        if filesystem_async._results_queue is None:
            manager = SyncManager(ctx=mp.get_context("spawn"))
            manager.start(initializer=_writer_manager_init)
            _MANAGER["manager"] = manager
            filesystem_async._results_queue = manager.Queue()
    except Exception:  # noqa: BLE001 - only a warm-up: megatron-core starts its own on the first save
        pass


def _save_strategy():
    """torch_dist, with the writes of DP-replicated tensors split across the DP ranks (each byte once)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    base = get_default_save_sharded_strategy()
    if not parallel_state.model_parallel_is_initialized() or parallel_state.get_data_parallel_world_size() == 1:
        return base
    return FullyParallelSaveStrategyWrapper(base, parallel_state.get_data_parallel_group(with_context_parallel=True))


# ---------------------------------------------------------------------------------------------- load
def load_sharded(path: str | Path, sharded_state_dict: dict) -> dict:
    """Loads (and reshards into) `sharded_state_dict`'s layout from a validated checkpoint. Collective."""
    from megatron.core import dist_checkpointing

    validate_checkpoint(path)
    try:
        return dist_checkpointing.load(sharded_state_dict, str(path))
    except Exception as exc:  # noqa: BLE001 - name the folder; megatron-core's message names the key
        raise ValueError(f"checkpoint {path}: cannot load the sharded state: {exc}") from exc


def load_rng(path: str | Path, rank: int) -> tuple[dict, bool]:
    """(RNG record for `rank`, exact): the state saved by the same global rank, or rank 0's when this run
    has more ranks than the saving one (exact=False)."""
    path = Path(path)
    world = read_meta(path)["world_size"]
    exact = rank < world
    f = path / "rng" / f"rank_{rank if exact else 0:05d}.pt"
    try:
        return torch.load(f, map_location="cpu", weights_only=True), exact
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"checkpoint {path} is damaged: cannot read {f}: {exc}") from exc
