"""Device selection and placement: GPU-allocation check, device-index wrap, micro-batch moves, metric reduction.

What CPU cannot prove: that NCCL accepts the tensors (the dry run's collective check covers placement on
fake CUDA) and that pinned non_blocking copies overlap compute.
"""
from __future__ import annotations

import pytest
import torch

from megatron_copsd.batching import TrainItem, collate
from megatron_copsd.megatron.device import (check_gpu_allocation, compute_device, gpu_allocation,
                                            local_device_index, to_compute_device)


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"CUDA_VISIBLE_DEVICES": ""}, None),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None),  # what Slurm sets for a job without GPUs
    ({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0"),
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, "CUDA_VISIBLE_DEVICES=2,3"),
    ({"SLURM_GPUS_ON_NODE": "0"}, None),
    ({"SLURM_GPUS_ON_NODE": "4"}, "SLURM_GPUS_ON_NODE=4"),
    ({"SLURM_JOB_GPUS": "0,1"}, "SLURM_JOB_GPUS=0,1"),
    ({"SLURM_GPUS_PER_NODE": "h100:8"}, "SLURM_GPUS_PER_NODE=h100:8"),
])
def test_gpu_allocation_from_env(env, expected):
    assert gpu_allocation(env) == expected


def test_cpu_torch_on_gpu_allocation_is_an_error():
    env = {"SLURM_JOB_GPUS": "0,1,2,3"}
    with pytest.raises(RuntimeError, match=r"SLURM_JOB_GPUS=0,1,2,3.*parallel.allow_cpu"):
        check_gpu_allocation(env, cuda_available=False)
    check_gpu_allocation(env, cuda_available=False, allow_cpu=True)  # explicit opt-out
    check_gpu_allocation(env, cuda_available=True)
    check_gpu_allocation({}, cuda_available=False)


def test_init_distributed_refuses_cpu_training_on_gpu_allocation(monkeypatch):
    """The real entry point (this machine's torch has no CUDA): fails before joining any process group."""
    import torch.distributed as dist

    from megatron_copsd.megatron.dist import init_distributed

    if torch.cuda.is_available():
        pytest.skip("needs a torch without CUDA")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    was_initialized = dist.is_initialized()
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES=0"):
        init_distributed(1, 1)
    assert dist.is_initialized() == was_initialized


@pytest.mark.parametrize("local_rank,count,expected", [(0, 1, 0), (3, 1, 0), (5, 4, 1), (7, 8, 7)])
def test_device_index_wraps_modulo_visible_devices(local_rank, count, expected):
    # Slurm --gpus-per-task=1 binds one GPU per task: every task sees exactly device 0.
    assert local_device_index(local_rank, count) == expected


def test_device_index_without_devices():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        local_device_index(0, 0)


def _mb():
    items = [TrainItem([5, 6, 7], [5, 9, 9, 7], [3, 4, 2], rollout_logprobs=[-1.0, -2.0, -0.5], index=0),
             TrainItem([5, 6], [5, 9, 6], [8, 2], rollout_logprobs=[-0.1, -0.2], index=1)]
    return collate(items, pad_id=0)


def _tensors(mb):
    out = {f"{side}.{n}": getattr(getattr(mb, side), n) for side in ("student", "teacher")
           for n in ("tokens", "position_ids", "resp_batch_idx", "resp_pos_idx")}
    out.update({n: getattr(mb, n) for n in ("targets", "mask", "rollout_logprobs", "advantages")})
    return out


def test_microbatch_moves_every_tensor():
    mb = _mb()
    assert all(t.device.type == "cpu" for t in _tensors(mb).values())
    # No CUDA here: meta stands in for "another device"; every tensor field must follow.
    mb.to_(torch.device("meta"))
    moved = _tensors(mb)
    assert {n for n, t in moved.items() if t.device.type != "meta"} == set()
    assert moved["student.tokens"].shape == (2, 5) and moved["targets"].shape == (5,)
    assert set(vars(mb.student)) == {"tokens", "position_ids", "resp_batch_idx", "resp_pos_idx"}  # nothing missed


def test_move_to_current_device_is_a_no_op():
    mb = _mb()
    before = _tensors(mb)
    mb.to_(compute_device())
    after = _tensors(mb)
    assert all(after[n] is before[n] for n in before)
    t = torch.ones(3)
    assert to_compute_device(t, torch.device("cpu")) is t


def test_reduce_metrics_accepts_device_tensors_and_floats():
    from megatron_copsd.train_step import METRIC_KEYS
    from megatron_copsd.trainer import _reduce_metrics

    totals = {k: torch.tensor(float(i), dtype=torch.float64) for i, k in enumerate(METRIC_KEYS)}
    totals["loss"] = float("nan")  # the non-finite test path patches a float in
    out = _reduce_metrics(totals, tp_size=2)
    assert out["tokens"] == 0.5 and out["divergence_sum"] == 1.0
    assert out["loss"] != out["loss"]
