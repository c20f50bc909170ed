"""A real one-node Slurm cluster on this machine, for tests (Debian's slurmctld, slurmd, munge).

Usage in a test module (the fixture is session-scoped, so every Slurm test shares one cluster):

    from tests.e2e.slurm_cluster import slurm_cluster  # noqa: F401  (pytest fixture)

    def test_something(slurm_cluster):
        job_id = slurm_cluster.sbatch(["--ntasks=2", "slurm/train.sbatch", ...])
        info = slurm_cluster.wait(job_id, timeout=120)
        assert info["JobState"] == "COMPLETED"

Everything the cluster writes lives in one temp dir: munge key, munge socket, slurm.conf, state,
spool and logs; munged gets private `--socket/--key-file/--pid-file/--seed-file/--log-file` paths
and slurm.conf points Slurm's auth plugin at that socket (`AuthInfo=socket=...`), so a system-wide
munged (if any) is neither used nor disturbed. Client commands find the cluster through
`SLURM_CONF` in `cluster.env`. Teardown cancels the jobs, then stops exactly the three daemons this
module started, by pid (they run in the foreground, so the pid is the daemon's own).

Teardown also runs when pytest is interrupted: SIGINT reaches the fixture's `finally` (pytest tears down
session fixtures on KeyboardInterrupt), SIGTERM / SIGHUP are caught while a cluster is live (daemons
stopped, then the previous handler or the default action), `atexit` covers other exits, and each daemon
gets PR_SET_PDEATHSIG (SIGTERM) so it also goes when the test process is SIGKILLed.

Missing packages are installed with apt-get (`apt-get update` first, root only); the fixture skips
with the reason when that is impossible.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "munged")
PARTITION = "debug"


_LIVE: list["SlurmCluster"] = []  # clusters whose daemons may be running
_PREVIOUS_HANDLERS: dict[int, object] = {}


def _stop_live_clusters() -> None:
    for cluster in list(_LIVE):
        cluster.stop()


def _on_termination(signum, frame) -> None:
    """SIGTERM / SIGHUP while a cluster is live: stop its daemons, then act as the signal would have."""
    _stop_live_clusters()
    previous = _PREVIOUS_HANDLERS.pop(signum, signal.SIG_DFL)
    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        os.kill(os.getpid(), signum)


def _install_cleanup() -> None:
    if threading_main():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if sig not in _PREVIOUS_HANDLERS:
                _PREVIOUS_HANDLERS[sig] = signal.signal(sig, _on_termination)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


atexit.register(_stop_live_clusters)


def _die_with_parent() -> None:
    """preexec_fn of the daemons: SIGTERM when the process that started them dies (even by SIGKILL)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apt_install(packages: tuple[str, ...], binaries: tuple[str, ...]) -> str | None:
    """apt-get install `packages` unless all `binaries` exist. Returns a reason string if impossible."""
    def missing() -> list[str]:
        return [b for b in binaries if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]

    if not missing():
        return None
    if os.geteuid() != 0:
        return f"{missing()} missing and not root (cannot apt-get install {' '.join(packages)})"
    if shutil.which("apt-get") is None:
        return f"{missing()} missing and apt-get not available"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}"
    return f"still missing after apt-get install: {missing()}" if missing() else None


def ensure_slurm_installed() -> str | None:
    """Install Slurm + munge with apt-get when missing. Returns a reason string if impossible."""
    return apt_install(PACKAGES, BINARIES)


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("MemTotal not found in /proc/meminfo")


_RENDEZVOUS_VARS = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                    "GROUP_RANK", "TORCHELASTIC_RUN_ID"}


class SlurmCluster:
    """Daemons and client helpers of a one-node cluster rooted at `root` (a temp dir)."""

    def __init__(self, root: Path, *, num_cpus: int | None = None):
        self.root = root
        self.hostname = socket.gethostname().split(".")[0]
        # At least 2 CPUs so a 2-task job fits even on a 1-core box; `config_overrides` below makes
        # slurmd trust the configured CPUs/memory instead of draining the node on a mismatch.
        self.num_cpus = num_cpus or max(os.cpu_count() or 1, 2)
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = root / "etc" / "slurm.conf"
        self.munge_socket = root / "munge" / "run" / "munge.socket"
        # Clients find this cluster through SLURM_CONF; an enclosing job's SLURM_* (if pytest itself runs
        # under Slurm) would leak into sbatch/srun and must not.
        # Jobs derive their own rendezvous from Slurm: never hand them a caller's torchrun/Slurm variables.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in _RENDEZVOUS_VARS}
        self.env["SLURM_CONF"] = str(self.conf)

    # ---- setup -------------------------------------------------------------------------------
    def _start_munge(self) -> None:
        munge_dir = self.root / "munge"
        for sub in ("etc", "run", "lib", "log"):
            (munge_dir / sub).mkdir(parents=True, exist_ok=True)
        key = munge_dir / "etc" / "munge.key"
        key.write_bytes(os.urandom(1024))
        user = pwd.getpwnam("munge") if os.geteuid() == 0 else None
        cmd = ["munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
               f"--pid-file={munge_dir / 'run' / 'munged.pid'}",
               f"--seed-file={munge_dir / 'lib' / 'munged.seed'}",
               f"--log-file={munge_dir / 'log' / 'munged.log'}"]
        if user is not None:
            # munged refuses keys/dirs that others can write and wants to run as its own user.
            for path in [munge_dir, *munge_dir.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)
            for sub in ("etc", "run", "lib", "log"):
                os.chmod(munge_dir / sub, 0o755 if sub == "run" else 0o700)
            os.chmod(munge_dir, 0o755)
            os.chmod(key, 0o400)
        # Popen's user/group (not runuser/su) so the pid we hold is munged's own.
        self._spawn("munged", cmd, user=user)
        self._wait_for(lambda: self.munge_socket.exists(), 20, "munged socket")

    def _write_conf(self) -> None:
        for sub in ("etc", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        lines = [
            "ClusterName=copsdtest",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "SlurmdParameters=config_overrides",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'state' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'spool' / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            # Keep finished jobs visible to `scontrol show job` (there is no accounting DB).
            "MinJobAge=600",
            # Deliver time-limit signals promptly and kill quickly: tests are short.
            "KillWait=10",
            "ReturnToService=2",
            f"NodeName={self.hostname} NodeAddr=127.0.0.1 CPUs={self.num_cpus} "
            f"RealMemory={max(_mem_mb() - 1024, 512)} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        self._start_munge()
        self._write_conf()
        log = self.root / "log"
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)], log / "slurmctld.out")
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)], log / "slurmd.out")
        self._wait_for(self._node_idle, 60, "node to become idle")

    def _spawn(self, name: str, cmd: list[str], out: Path | None = None,
               user: pwd.struct_passwd | None = None) -> None:
        out = out or self.root / f"{name}.out"
        ids = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        with open(out, "wb") as f:
            self.procs[name] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                                start_new_session=True, preexec_fn=_die_with_parent, **ids)

    def _wait_for(self, pred, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for "
                                       f"{what}:\n{self.daemon_logs()}")
            if pred():
                return
            time.sleep(0.3)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}:\n{self.daemon_logs()}")

    def _node_idle(self) -> bool:
        proc = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False)
        return proc.returncode == 0 and proc.stdout.strip().startswith("idle")

    def daemon_logs(self, tail: int = 30) -> str:
        parts = []
        for path in sorted([*(self.root / "log").glob("*"), *(self.root / "munge" / "log").glob("*")]):
            try:
                lines = path.read_text(errors="replace").splitlines()[-tail:]
            except OSError:
                continue
            parts.append(f"==> {path.name} <==\n" + "\n".join(lines))
        return "\n".join(parts)

    # ---- teardown ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel remaining jobs, then stop exactly the daemons started here (by pid). Idempotent."""
        if self in _LIVE:
            _LIVE.remove(self)
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", f"--partition={PARTITION}"], check=False)
            deadline = time.monotonic() + 20  # let slurmd reap the jobs' steps before it goes
            while time.monotonic() < deadline:
                queue = self.run(["squeue", "-h", "-o", "%i"], check=False)
                if queue.returncode != 0 or not queue.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    # ---- client helpers ----------------------------------------------------------------------
    def run(self, cmd: list[str], *, check: bool = True, env: dict | None = None,
            cwd: str | os.PathLike | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, args: list[str], *, env: dict | None = None,
               cwd: str | os.PathLike | None = None) -> int:
        """Submit and return the job id. `env` entries are added to the submitting environment
        (sbatch exports the whole environment to the job by default)."""
        proc = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd)
        return int(proc.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def wait(self, job_id: int, timeout: float = 120,
             until: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                       "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")) -> dict[str, str]:
        """Poll until the job reaches one of the `until` states; return its `scontrol` fields."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {until} after {timeout}s: {info}\n{self.daemon_logs()}")


def start_cluster(root: Path | None = None) -> SlurmCluster:
    cluster = SlurmCluster(Path(root or tempfile.mkdtemp(prefix="copsd-slurm-")))
    os.chmod(cluster.root, 0o755)  # munged (user munge) must traverse into its subdir
    _LIVE.append(cluster)
    _install_cleanup()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    """Session-wide one-node Slurm cluster; skipped with the reason when it cannot be installed."""
    if not sys.platform.startswith("linux"):
        pytest.skip("Slurm test cluster needs Linux")
    if os.geteuid() != 0:
        pytest.skip("a test Slurm cluster needs root (slurmd runs jobs as their users; SlurmUser=root)")
    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
