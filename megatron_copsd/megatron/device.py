"""Which device this process computes on, and the checks that pick it.

    dev = compute_device()                  # cuda:<current index> on GPU, cpu otherwise
    idx = local_device_index(local_rank)    # local_rank wrapped modulo the visible devices
    check_gpu_allocation()                  # RuntimeError: GPUs allocated but torch has no CUDA

Every tensor the trainer creates for the model or for a collective goes to `compute_device()`: NCCL
refuses host tensors, and an embedding fed host token ids fails on the first step.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

import torch

# Variables through which a launcher says "this task has GPUs". Slurm sets CUDA_VISIBLE_DEVICES itself
# (or "NoDevFiles" when the job has none); the SLURM_* ones cover gres/--gpus* allocations.
GPU_ALLOCATION_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS",
                       "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")
_NO_GPU_VALUES = ("", "-1", "none", "nodevfiles", "n/a")
_ZERO_COUNT = ("SLURM_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")  # "0" = none


def gpu_allocation(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """`NAME=value` of the first variable that allocates GPUs to this task, or None when none does."""
    env = os.environ if environ is None else environ
    for name in GPU_ALLOCATION_VARS:
        value = env.get(name)
        if value is None or value.strip().lower() in _NO_GPU_VALUES:
            continue
        if name in _ZERO_COUNT and value.strip() == "0":
            continue
        return f"{name}={value}"
    return None


def check_gpu_allocation(environ: Optional[Mapping[str, str]] = None, *, cuda_available: Optional[bool] = None,
                         allow_cpu: bool = False) -> None:
    """Refuses to train on CPU when the job was given GPUs but this torch cannot use them (a CPU-only
    build, or a driver mismatch): otherwise every rank would silently run gloo on the host."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if cuda_available or allow_cpu:
        return
    found = gpu_allocation(environ)
    if found is None:
        return
    build = f"torch {torch.__version__}" + (" (CPU-only build)" if torch.version.cuda is None else
                                            f" (CUDA {torch.version.cuda}, but no usable device)")
    raise RuntimeError(
        f"GPUs are allocated to this task ({found}) but {build} cannot use them; install a CUDA build "
        f"of torch matching the driver, or set parallel.allow_cpu=true to train on CPU on purpose")


def local_device_index(local_rank: int, device_count: Optional[int] = None) -> int:
    """The CUDA index for this task: `local_rank` modulo the visible devices. Where Slurm binds one GPU
    per task each task sees a single device 0, so `set_device(local_rank)` would fail for local_rank > 0."""
    if device_count is None:
        device_count = torch.cuda.device_count()
    if device_count < 1:
        raise RuntimeError(f"local_device_index: no CUDA device visible (local_rank={local_rank})")
    if local_rank < 0:
        raise ValueError(f"local_rank must be >= 0, got {local_rank}")
    return local_rank % device_count


def compute_device() -> torch.device:
    """The device the model and every collective's tensors live on: the current CUDA device, else CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    current = torch.cuda.current_device()
    return current if isinstance(current, torch.device) else torch.device("cuda", current)


def to_compute_device(t: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    """Host -> device copy that overlaps with compute on CUDA (pinned source, non_blocking); no-op when
    the tensor is already there."""
    device = compute_device() if device is None else device
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        if not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)
