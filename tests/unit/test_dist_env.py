"""Launcher environment parsing: torchrun, Slurm (compressed node lists), and parallel-size checks."""
from __future__ import annotations

import pytest

from megatron_copsd.megatron.dist import check_parallel_sizes, detect_dist_env, expand_nodelist


@pytest.mark.parametrize("nodelist,expected", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu[9-11],login5", ["gpu9", "gpu10", "gpu11", "login5"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("h100-[008-009]-ib,x", ["h100-008-ib", "h100-009-ib", "x"]),
])
def test_expand_nodelist(nodelist, expected):
    assert expand_nodelist(nodelist) == expected


@pytest.mark.parametrize("bad", ["node[01-03", "node[05-02]", "node[a-b]", ""])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        expand_nodelist(bad)


def test_torchrun_env():
    env = detect_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                           "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == \
        (3, 8, 1, "10.0.0.1", 1234, "torchrun")


def test_slurm_env_master_is_first_node_and_port_from_job_id():
    env = detect_dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                           "SLURM_JOB_NODELIST": "gpu-[12-13,20]", "SLURM_JOB_ID": "987654"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.source) == (5, 16, 1, "gpu-12", "slurm")
    again = detect_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu-[12-13,20]",
                             "SLURM_JOB_ID": "987654"})
    assert env.master_port == again.master_port and 1024 < env.master_port < 65536
    explicit = detect_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1",
                                "MASTER_PORT": "4321"})
    assert explicit.master_port == 4321


def test_single_process_default():
    env = detect_dist_env({})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")
    assert env.master_port == 0  # no default port: an in-memory store (never 29500, which runs would share)


def _single_process_group(_rank, _world, queue_dir):
    """Child of a bare process (no RANK/MASTER_PORT): joins a one-process group and holds it a moment."""
    import os
    import time

    import torch.distributed as dist

    from megatron_copsd.megatron.dist import destroy_distributed, init_distributed

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        os.environ.pop(k, None)
    info = init_distributed(1, 1, backend="gloo")
    open(f"{queue_dir}/{os.getpid()}", "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(queue_dir)) < 2 and time.monotonic() < deadline:  # both groups live at once
        time.sleep(0.05)
    ok = len(os.listdir(queue_dir)) >= 2 and dist.get_world_size() == 1 and info.world_size == 1
    destroy_distributed()
    return ok


def test_two_concurrent_single_process_runs_do_not_collide(tmp_path):
    """Two one-process groups (as two `copsd train` runs without a launcher) live at the same time on one
    machine; with the old fixed default port 29500 the second one would fail to bind or join the first."""
    from concurrent.futures import ThreadPoolExecutor

    from megatron_copsd.testing.multiproc import run_distributed

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_distributed, _single_process_group, 1, (str(tmp_path),),
                               timeout=240, init_process_group=False) for _ in range(2)]
        assert [f.result()[0] for f in futures] == [True, True]


def test_bad_integer_is_named():
    with pytest.raises(ValueError, match="SLURM_NTASKS"):
        detect_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "two", "SLURM_JOB_NODELIST": "n1"})


def test_world_size_must_factor():
    assert check_parallel_sizes(8, 2, 2) == 2
    with pytest.raises(ValueError, match="not divisible by tp_size\\*pp_size = 2\\*2"):
        check_parallel_sizes(6, 2, 2)
    with pytest.raises(ValueError, match="tp_size"):
        check_parallel_sizes(4, 0, 1)
