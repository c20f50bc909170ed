"""init_distributed from real launcher environments (torchrun's and Slurm's), 2 processes over gloo."""
from __future__ import annotations

import os

import pytest

from megatron_copsd.testing.multiproc import free_port, run_distributed

pytestmark = pytest.mark.distributed


def _init_child(rank, world_size, slurm_port):
    import torch
    import torch.distributed as dist

    from megatron_copsd.megatron.dist import destroy_distributed, init_distributed

    out = {}
    try:
        init_distributed(tp_size=4)
    except ValueError as exc:
        out["factor_error"] = str(exc)
    # Slurm: hide torchrun's variables, describe the job the way srun does.
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world_size), SLURM_LOCALID=str(rank),
                      SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4242", MASTER_PORT=str(slurm_port))
    info = init_distributed(tp_size=2, pp_size=1)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    out["slurm"] = (info.rank, info.world_size, info.tp_size, info.dp_size, info.tp_rank, info.pp_rank, t.item())
    destroy_distributed()
    out["slurm_destroyed"] = not dist.is_initialized()
    for k in list(os.environ):
        if k.startswith("SLURM_"):
            del os.environ[k]
    os.environ.update(saved)
    info = init_distributed(tp_size=1, pp_size=2)
    out["torchrun"] = (info.rank, info.pp_size, info.pp_rank, info.dp_size)
    destroy_distributed()
    return out


def test_init_from_slurm_and_torchrun_env():
    results = run_distributed(_init_child, 2, args=(free_port(),), init_process_group=False, timeout=180)
    for rank, r in enumerate(results):
        assert "world size 2 is not divisible by tp_size*pp_size = 4*1" in r["factor_error"]
        assert r["slurm"] == (rank, 2, 2, 1, rank, 0, 3.0)
        assert r["slurm_destroyed"]
        assert r["torchrun"] == (rank, 2, rank, 1)
