"""Distributed initialisation: torchrun, Slurm or a single process -> torch.distributed + Megatron groups.

    info = init_distributed(tp_size=2, pp_size=1)   # reads RANK/WORLD_SIZE/... or SLURM_* from the env
    ...
    destroy_distributed()

Backend: gloo on CPU, NCCL on GPU (override with `backend=`). Megatron's `parallel_state` is built with
the given TP and PP sizes; DP is what remains of the world. The model-parallel RNG tracker is seeded
(`model-parallel-rng` is what attention dropout forks).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from megatron_copsd.megatron.cpu_compat import enable_cpu_compat
from megatron_copsd.megatron.device import check_gpu_allocation, local_device_index

_CREATED_PROCESS_GROUP = {"value": False}


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as told by the launcher."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single"


@dataclass(frozen=True)
class ParallelInfo:
    rank: int
    world_size: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int


def _split_top_level(text: str) -> list[str]:
    """Splits on commas that are not inside [...]."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"SLURM_JOB_NODELIST: unbalanced brackets in {text!r}")
    parts.append("".join(cur))
    return [p for p in (s.strip() for s in parts) if p]


def _expand_host(pattern: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", pattern)
    if m is None:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end():]
    hosts = []
    for item in m.group(1).split(","):
        item = item.strip()
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"SLURM_JOB_NODELIST: bad range {item!r} in {pattern!r}")
            width = len(lo)  # zero padding is kept: node[01-03] -> node01, node02, node03
            values = [str(v).zfill(width) for v in range(int(lo), int(hi) + 1)]
        elif item:
            values = [item]
        else:
            raise ValueError(f"SLURM_JOB_NODELIST: empty item in {pattern!r}")
        for v in values:
            hosts.extend(_expand_host(head + v + tail))  # later bracket groups, e.g. r[1-2]n[1-2]
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Expands Slurm's compressed host list, e.g. 'node[01-03,07],gpu5' -> node01..node03, node07, gpu5."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        hosts.extend(_expand_host(part))
    if not hosts:
        raise ValueError(f"SLURM_JOB_NODELIST is empty: {nodelist!r}")
    return hosts


def _int_env(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={environ[key]!r} is not an integer") from None


def detect_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Reads torchrun's variables first (RANK/WORLD_SIZE), then Slurm's (SLURM_PROCID/...), else single."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=_int_env(env, "RANK"),
            world_size=_int_env(env, "WORLD_SIZE"),
            local_rank=_int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif "SLURM_JOB_NODELIST" in env or "SLURM_NODELIST" in env:
            addr = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])[0]
        else:
            raise ValueError("Slurm environment without SLURM_JOB_NODELIST or MASTER_ADDR: cannot find the master")
        if "MASTER_PORT" in env:
            port = _int_env(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            # Same on every task of the job, and distinct jobs sharing a node rarely collide.
            port = 15000 + _int_env(env, "SLURM_JOB_ID") % 20000
        else:
            port = 29500
        return DistEnv(
            rank=_int_env(env, "SLURM_PROCID"),
            world_size=_int_env(env, "SLURM_NTASKS"),
            local_rank=_int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=addr,
            master_port=port,
            source="slurm",
        )
    # No port by default: a one-process group rendezvouses through an in-memory store (see init_distributed),
    # so two single-process runs on one machine never compete for a port.
    return DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                   master_port=_int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 0, source="single")


def check_parallel_sizes(world_size: int, tp_size: int, pp_size: int) -> int:
    """Returns the data-parallel size; ValueError when the world does not factor into tp*pp*dp."""
    if tp_size < 1 or pp_size < 1:
        raise ValueError(f"tp_size and pp_size must be >= 1, got tp_size={tp_size}, pp_size={pp_size}")
    if world_size % (tp_size * pp_size) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tp_size*pp_size = {tp_size}*{pp_size} = "
            f"{tp_size * pp_size}; choose sizes with tp*pp*dp == world size"
        )
    return world_size // (tp_size * pp_size)


def init_distributed(tp_size: int = 1, pp_size: int = 1, *, backend: str | None = None,
                     seed: int = 1234, timeout_minutes: float = 30, allow_cpu: bool = False) -> ParallelInfo:
    """Joins (or reuses) the default process group and builds Megatron's TP/PP/DP groups.

    On GPU the device is `local_rank` modulo the visible devices (one GPU bound per task by Slurm, or
    all of a node's GPUs visible to every task). RuntimeError when the task was allocated GPUs but torch
    cannot use them, unless `allow_cpu`. `timeout_minutes` applies to the default group and Megatron's."""
    import datetime

    from megatron.core import parallel_state, tensor_parallel

    cuda = torch.cuda.is_available()
    check_gpu_allocation(cuda_available=cuda, allow_cpu=allow_cpu)
    if not cuda:
        enable_cpu_compat()
    if dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    else:
        env = detect_dist_env()
        check_parallel_sizes(env.world_size, tp_size, pp_size)
        if cuda:
            torch.cuda.set_device(local_device_index(env.local_rank))
        if env.source == "single" and env.master_port == 0:
            rendezvous = {"store": dist.HashStore()}  # one process: nothing to meet, no port to bind
        else:
            rendezvous = {"init_method": f"tcp://{env.master_addr}:{env.master_port}"}
        dist.init_process_group(
            backend or ("nccl" if cuda else "gloo"),
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **rendezvous,
        )
        _CREATED_PROCESS_GROUP["value"] = True
        world_size, rank, local_rank = env.world_size, env.rank, env.local_rank
    dp_size = check_parallel_sizes(world_size, tp_size, pp_size)
    if cuda and not _CREATED_PROCESS_GROUP["value"]:
        torch.cuda.set_device(local_device_index(local_rank))

    if parallel_state.model_parallel_is_initialized():
        same = (parallel_state.get_tensor_model_parallel_world_size() == tp_size
                and parallel_state.get_pipeline_model_parallel_world_size() == pp_size)
        if not same:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp_size,
            pipeline_model_parallel_size=pp_size,
            distributed_timeout_minutes=timeout_minutes,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelInfo(
        rank=rank,
        world_size=world_size,
        tp_size=tp_size,
        pp_size=pp_size,
        dp_size=dp_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def destroy_distributed() -> None:
    """Tears down Megatron's groups, and the default group if `init_distributed` created it."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if _CREATED_PROCESS_GROUP["value"] and dist.is_initialized():
        dist.destroy_process_group()
    _CREATED_PROCESS_GROUP["value"] = False
