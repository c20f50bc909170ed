"""Interrupting a pytest run that holds the Slurm fixture (SIGINT as from Ctrl-C, SIGTERM as from a CI
timeout) leaves no munged / slurmctld / slurmd behind. Real daemons, a real pytest child process."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.slurm_cluster import ensure_slurm_installed

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]

HOLDER = '''
import json, os, time
from tests.e2e.slurm_cluster import slurm_cluster  # noqa: F401

def test_hold(slurm_cluster):
    pids = {name: proc.pid for name, proc in slurm_cluster.procs.items()}
    open(os.environ["PIDS_FILE"], "w").write(json.dumps(pids))
    time.sleep(600)
'''


def _default_signals() -> None:
    """preexec_fn of the child pytest: SIGINT back to its default. A command started with `&` from a
    non-interactive shell (`nohup bash .ci/run &`, some CI runners) inherits SIGINT ignored, and a Python
    started with SIGINT ignored never raises KeyboardInterrupt; Ctrl-C in a terminal finds the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's bookkeeping is left


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_session_leaves_no_daemon(tmp_path, sig):
    if os.geteuid() != 0:
        pytest.skip("a test Slurm cluster needs root (slurmd runs jobs as their users; SlurmUser=root)")
    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(reason)
    (tmp_path / "test_holder.py").write_text(HOLDER)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    pids_file = tmp_path / "pids.json"
    env = dict(os.environ, PIDS_FILE=str(pids_file), PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                              "-c", str(tmp_path / "pytest.ini"), str(tmp_path / "test_holder.py")],
                             cwd=tmp_path, env=env, stdout=open(tmp_path / "child.log", "w"),
                             stderr=subprocess.STDOUT, preexec_fn=_default_signals)
    try:
        deadline = time.monotonic() + 180
        while not pids_file.exists():
            assert child.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Slurm fixture did not start"
            time.sleep(0.2)
        time.sleep(0.2)
        pids = json.loads(pids_file.read_text())
        assert sorted(pids) == ["munged", "slurmctld", "slurmd"] and all(_alive(p) for p in pids.values())
        child.send_signal(sig)
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {name: pid for name, pid in pids.items() if _alive(pid)}
    for pid in left.values():  # clean up after a failure so later tests are not disturbed
        os.kill(pid, signal.SIGKILL)
    assert not left, f"daemons left after {sig.name}: {left}\n" + (tmp_path / "child.log").read_text()[-3000:]
