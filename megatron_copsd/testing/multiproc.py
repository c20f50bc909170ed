"""Run a function in N real processes joined by a gloo process group (tests, benchmarks).

    results = run_distributed(fn, world_size=2, args=(x,))   # fn(rank, world_size, *args) -> picklable

Each child sets MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK, initialises the default gloo group,
calls fn, destroys the group and sends back its return value. A child failure raises RuntimeError with
that child's traceback; a hang past `timeout` kills every child and raises TimeoutError.
"""
from __future__ import annotations

import io
import os
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, init_pg: bool) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        if init_pg:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        # Serialise here: a tensor put on an mp queue travels as a file descriptor that vanishes when this
        # child exits, so the parent could not read it.
        buf = io.BytesIO()
        torch.save(out, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if init_pg and dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    timeout: float = 300.0,
    init_process_group: bool = True,
) -> list[Any]:
    """Runs `fn(rank, world_size, *args)` in `world_size` spawned processes; returns results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(r, world_size, port, fn, args, queue, init_process_group), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"distributed run of {getattr(fn, '__name__', fn)} timed out after {timeout}s")
            try:
                rank, ok, payload = queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and not errors:
                    # A child died without reporting (segfault, os._exit): give the others a moment, then fail.
                    time.sleep(2.0)
                    if queue.empty():
                        raise RuntimeError(
                            f"rank(s) {[procs.index(p) for p in dead]} exited with "
                            f"{[p.exitcode for p in dead]} without reporting"
                        )
                continue
            if ok:
                import torch

                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)  # our own child's bytes
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break
        if errors:
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world_size)]
