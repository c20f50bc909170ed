"""Slow: the chunked CPU path at the issue's shape (T=4096, H=256, V=32768, JSD beta=0.5, fwd+bwd, fp32)
uses under 1/20 of the naive path's peak extra memory (issue 14; measured 0.34 vs 7.5 GB) and is not slower
(each measured in its own process by the benchmark's worker, peak RSS minus RSS after building the inputs).
The speed target against the 4-GEMM floor (<= 1.15x) is a benchmark, not a test: on this shared machine one
run's ratio moves by +-10% (`copsd bench-kernels --impls chunked,floor --rounds 3`, README)."""
import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.kernels]


def _measure(impl):
    cmd = [sys.executable, "-m", "copsd_kernels.bench", "--worker", "--impl", impl, "--mode", "cpu",
           "--T", "4096", "--H", "256", "--V", "32768", "--divergence", "jsd", "--beta", "0.5", "--repeat", "1",
           "--threads", "1"]  # one thread: on a shared machine idle threads spin at barriers (measured: 2 threads
    # under load average ~6 gave the chunked path 58 CPU-s vs naive 24; 1 thread 9.1-9.4 vs 24.5-28.3)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])


def test_chunked_memory_and_time_vs_naive():
    naive, chunked = _measure("naive"), _measure("chunked")
    print(f"naive {naive}\nchunked {chunked}")
    assert chunked["peak_mem_gb"] < naive["peak_mem_gb"] / 20
    # CPU seconds, not wall time: the machine may be shared; 10% slack for noise
    assert chunked["cpu_s"] <= 1.1 * naive["cpu_s"]
