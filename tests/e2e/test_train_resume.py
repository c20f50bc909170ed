"""Crash safety of the real command: SIGKILL mid-run + resume reproduces the uninterrupted run's metrics;
SIGUSR1 finishes the step, saves and exits 0 (the preemption contract)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_copsd.checkpoint.state import MARKER
from megatron_copsd.metrics_log import read_metrics

pytestmark = pytest.mark.e2e
DETERMINISTIC_KEYS = ("loss", "divergence", "grad_norm", "lr", "reward", "response_len", "tokens", "logprob_gap")


def _cmd(model, train, out, steps):
    return [sys.executable, "-m", "megatron_copsd.train", f"model.hf_path={model}", f"data.train_path={train}",
            "data.langs=[swa]", "data.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=10",
            "optim.lr=1e-3", f"train.steps={steps}", f"train.output_dir={out}", "train.micro_batch_tokens=256",
            "checkpoint.save_every=1", "checkpoint.keep_last=2", "checkpoint.export_hf=false", "eval.every=-1",
            "logging.tensorboard=false", "logging.progress_bar=false"]


def _start(cmd, log):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MASTER_PORT", None)
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def test_sigkill_resume_matches_uninterrupted_and_sigusr1_preempts(tmp_path):
    from megatron_copsd import tiny_run
    from megatron_copsd.data.loaders import load_copsd_training

    train, _ = tiny_run.write_fixture(tmp_path / "data", num_train=16, num_eval=2)
    model = tiny_run.materialize_tiny_model(tmp_path / "model", "qwen3", tiny_run.tokenizer_texts(
        load_copsd_training(train, "swa")), hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    steps = 12
    a = _start(_cmd(model, train, tmp_path / "a", steps), tmp_path / "a.log")
    b = _start(_cmd(model, train, tmp_path / "b", steps), tmp_path / "b.log")
    c = _start(_cmd(model, train, tmp_path / "c", 1000), tmp_path / "c.log")
    # Watch both runs at once: kill b (a crash: no chance to clean up) as soon as its step-2 checkpoint is
    # complete, and preempt c (finish the step, save, exit 0) after its first checkpoint.
    pending = {b: (tmp_path / "b" / "checkpoints" / "step_2" / MARKER, signal.SIGKILL),
               c: (tmp_path / "c" / "checkpoints" / "step_1" / MARKER, signal.SIGUSR1)}
    t0 = time.monotonic()
    while pending:
        for proc, (path, sig) in list(pending.items()):
            if path.exists():
                proc.send_signal(sig)
                del pending[proc]
            elif proc.poll() is not None:
                raise AssertionError(f"run exited with {proc.returncode} before {path} appeared")
        assert time.monotonic() - t0 < 300, "runs did not reach their checkpoints"
        time.sleep(0.005)
    b.wait()
    assert c.wait(timeout=300) == 0, (tmp_path / "c.log").read_text()[-3000:]
    c_log = (tmp_path / "c.log").read_text()
    assert "preempted: checkpoint saved at step" in c_log
    saved = int(c_log.split("preempted: checkpoint saved at step")[1].split()[0])
    assert 1 <= saved < 1000 and (tmp_path / "c" / "checkpoints" / f"step_{saved}" / MARKER).is_file()

    killed_at = max(int(p.name.split("_")[1]) for p in (tmp_path / "b" / "checkpoints").glob("step_*")
                    if (p / MARKER).exists())
    assert killed_at < steps, "the run finished before it was killed; the test proves nothing"
    b2 = _start(_cmd(model, train, tmp_path / "b", steps), tmp_path / "b2.log")
    assert b2.wait(timeout=600) == 0, (tmp_path / "b2.log").read_text()[-3000:]
    assert a.wait(timeout=600) == 0, (tmp_path / "a.log").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "b2.log").read_text()

    ra = {r["step"]: r for r in read_metrics(tmp_path / "a" / "metrics.jsonl")}
    rb = {r["step"]: r for r in read_metrics(tmp_path / "b" / "metrics.jsonl")}
    assert sorted(ra) == sorted(rb) == list(range(1, steps + 1))  # one line per step after truncation
    for step in range(1, steps + 1):
        for key in DETERMINISTIC_KEYS:
            assert rb[step][key] == pytest.approx(ra[step][key], rel=1e-6, abs=1e-9), (step, key, killed_at)
    print(f"killed after checkpoint step {killed_at}; resumed steps {killed_at + 1}..{steps} match; "
          f"preempted run saved step {saved}")


def test_sigkill_during_async_save_keeps_previous_checkpoint(tmp_path):
    """The whole process group (trainer + forked checkpoint writer) is SIGKILLed while step 2's asynchronous
    save is in flight (its `.tmp` folder exists, no completion marker yet): step 1 stays intact and
    `resume=auto` picks it; the resumed run replaces the leftover and finishes."""
    from megatron_copsd import tiny_run
    from megatron_copsd.checkpoint.state import validate_checkpoint
    from megatron_copsd.data.loaders import load_copsd_training

    train, _ = tiny_run.write_fixture(tmp_path / "data", num_train=16, num_eval=2)
    model = tiny_run.materialize_tiny_model(tmp_path / "model", "qwen3", tiny_run.tokenizer_texts(
        load_copsd_training(train, "swa")), hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    ckpts = tmp_path / "run" / "checkpoints"
    cmd = _cmd(model, train, tmp_path / "run", 4) + ["checkpoint.async_save=true"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MASTER_PORT", None)
    proc = subprocess.Popen(cmd, stdout=open(tmp_path / "1.log", "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    t0 = time.monotonic()
    while not ((ckpts / "step_1" / MARKER).exists() and (ckpts / "step_2.tmp").exists()):
        assert proc.poll() is None, (tmp_path / "1.log").read_text()[-3000:]
        assert time.monotonic() - t0 < 300, "the run never reached its second save"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckpts / "step_2.tmp").exists() and not (ckpts / "step_2").exists(), "kill missed the save window"
    assert validate_checkpoint(ckpts / "step_1")["step"] == 1
    r = subprocess.run(cmd, stdout=open(tmp_path / "2.log", "w"), stderr=subprocess.STDOUT, env=env, timeout=600)
    log = (tmp_path / "2.log").read_text()
    assert r.returncode == 0, log[-3000:]
    assert f"resumed from {ckpts / 'step_1'} at step 1" in log
    assert validate_checkpoint(ckpts / "step_4")["step"] == 4 and not list(ckpts.glob("*.tmp"))
