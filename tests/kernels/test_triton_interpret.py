"""Triton recompute-mode kernels vs the float64 reference under TRITON_INTERPRET=1 (CPU, numpy semantics,
slow: small shapes; store mode is in test_store_interpret.py). The interpreter must be chosen before triton is first imported, and pytest may already have
imported it, so the checks run in one fresh subprocess with the variable set (run_checks below); run this
file directly with `TRITON_INTERPRET=1 python tests/kernels/test_triton_interpret.py` to see the output.
Note: the interpreter's tl.dot is wrong for bf16 operands, so there the kernels upcast tiles to fp32 before
tl.dot (UPCAST_DOT); bf16 cases still check bf16 loads, dZ stores and the GEMMs in Python.
"""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kernels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# the per-entry clip (issue 12) against the reference code's float64 formula at fp32 relative 1e-5:
# (divergence, beta of the reference JSD, tau, clip); the full grid kinds x tau {1, 1.1} x clip
# {none, 0.01, 0.05} runs with ENTRY_CLIP_GRID=1 (slow test below)
ENTRY_CASES = [("forward_kl", 0.0, 1.1, 0.05), ("reverse_kl", 1.0, 1.0, 0.01), ("jsd", 0.5, 1.1, 0.01),
               ("jsd", 0.5, 1.0, 0.05), ("forward_kl", 0.0, 1.0, None)]
ENTRY_SHAPE = dict(T=13, H=16, V=75, valid=70, chunk_size=8)


def entry_cases():
    if os.environ.get("ENTRY_CLIP_GRID") != "1":
        return ENTRY_CASES
    return [(k, b, tau, c) for k, b in (("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.5))
            for tau in (1.0, 1.1) for c in (None, 0.01, 0.05)]


def run_entry_clip_checks():
    from tests.kernels.test_entry_clip import check_entry_clip
    for divergence, beta, tau, clip in entry_cases():
        check_entry_clip("triton", divergence=divergence, beta=beta, tau=tau, clip=clip, seed=2, **ENTRY_SHAPE)
        print(f"entry clip {divergence} tau={tau} clip={clip}: ok", flush=True)


def run_checks():
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing triton"
    import torch

    from tests.kernels.parity_cases import TRITON_BF16_GRAD_TOL, check_divergence, check_logprobs
    torch.set_num_threads(1)
    shape = dict(T=21, H=24, V=75, valid_vocab=70, chunk_size=8)  # odd sizes: partial tiles everywhere
    cases = [("forward_kl", 0.5, 1.0, False, torch.float32), ("reverse_kl", 0.5, 1.1, True, torch.float32),
             ("jsd", 0.1, 2.0, True, torch.float32), ("jsd", 0.9, 1.1, False, torch.float32),
             ("jsd", 0.0, 1.1, True, torch.float32), ("jsd", 1.0, 1.0, True, torch.float32),
             ("jsd", 0.5, 1.1, True, torch.bfloat16), ("forward_kl", 0.5, 2.0, False, torch.bfloat16)]
    for divergence, beta, tau, clip, dtype in cases:
        check_divergence("triton", mode="recompute", dtype=dtype, divergence=divergence, beta=beta,
                         temperature=tau, clip=clip, separate_teacher=divergence == "reverse_kl",
                         grad_tol=TRITON_BF16_GRAD_TOL if dtype == torch.bfloat16 else None, **shape)
        print(f"divergence {divergence} beta={beta} tau={tau} clip={clip} {dtype}: ok", flush=True)
    for dtype, tau in ((torch.float32, 1.1), (torch.bfloat16, 1.0)):
        check_logprobs("triton", dtype=dtype, temperature=tau,
                       grad_tol=TRITON_BF16_GRAD_TOL if dtype == torch.bfloat16 else None, **shape)
        print(f"logprobs {dtype} tau={tau}: ok", flush=True)


def _run_interpreted(grid: bool) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore", ENTRY_CLIP_GRID="1" if grid else "0")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)] + (["--entry-only"] if grid else []),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_triton_kernels_match_reference_under_interpreter():
    out = _run_interpreted(grid=False)
    assert out.count(": ok") == 10 + len(ENTRY_CASES), out


@pytest.mark.slow
def test_triton_entry_clip_full_grid_under_interpreter():
    out = _run_interpreted(grid=True)
    assert out.count("entry clip") == 18 and out.count(": ok") == 18, out


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    if "--entry-only" not in sys.argv:
        run_checks()
    run_entry_clip_checks()
