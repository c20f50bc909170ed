"""Pieces shared by the Triton kernels: the logits tile (a tl.dot GEMM over H), the autotune
configurations (also compiled ahead of time for Hopper by kernels/aot.py) and the launch helper.

Running on CPU: set TRITON_INTERPRET=1 *before* the first `import triton` in the process (the interpreter is
chosen at import time), e.g. `TRITON_INTERPRET=1 pytest tests/kernels/test_triton_interpret.py` or, as that
test does, in a fresh subprocess. Under the interpreter the kernels run un-autotuned with INTERPRET_CONFIG
(small tiles: numpy semantics, slow).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Checked with kernels/aot.py on sm_90a, compiled with the launch's own divisibility-16 specialization: every
# config must use wgmma with N >= 128, fit shared memory and not spill. 128x128x64 tiles with 8 warps (two
# warpgroups, m64n128k16 each) hold two fp32 [128, 128] logits accumulators (128 registers per thread) in the
# recompute kernels at 196-246 registers / 0 spills (the sums / grad epilogues on column blocks,
# divergence_triton.SUMS_PARTS); 64-row tiles compile to m64n64 (half the N, more shared-memory traffic per FLOP).
# Kernels that stream the vocabulary for one token block (statistics passes): grid = (cdiv(T, BLOCK_T),).
STATS_CONFIGS = [
    dict(BLOCK_T=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    dict(BLOCK_T=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=4),
]
# Kernels that write one [BLOCK_T, BLOCK_V] tile of dZ: grid = (cdiv(T, BLOCK_T), cdiv(NV, BLOCK_V)).
GRAD_CONFIGS = [
    dict(BLOCK_T=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    dict(BLOCK_T=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=4),
]
SHARED_LIMIT = 227 * 1024  # sm_90: opt-in shared memory per thread block


def pair_shared_bytes(cfg: dict, shared_w: bool) -> int:
    """Shared memory of pair_logits_tile's pipelined loop over H: num_stages x one step's bf16 operand tiles
    (student and teacher [BLOCK_T, BLOCK_H], one weight [BLOCK_V, BLOCK_H], two with a separate teacher head).
    kernels/aot.py checks the compiled value against the limit (equal for the shipped configs)."""
    tiles = 2 * cfg["BLOCK_T"] + (1 if shared_w else 2) * cfg["BLOCK_V"]
    return cfg["num_stages"] * tiles * cfg["BLOCK_H"] * 2


def pair_configs(configs, shared_w: bool) -> list:
    """The configs a pair kernel launches with: those whose pipeline fits in shared memory (with a separate
    teacher head 4 stages of 128x128x64 would need 256 KB, so only the 3-stage config remains)."""
    return [c for c in configs if pair_shared_bytes(c, shared_w) <= SHARED_LIMIT]


def _prune_pair(configs, named_args, **kwargs):
    shared_w = bool(kwargs.get("SHARED_W", True))
    return [c for c in configs
            if pair_shared_bytes(dict(c.kwargs, num_stages=c.num_stages), shared_w) <= SHARED_LIMIT]


# UPCAST_DOT: triton 3.9's interpreter computes tl.dot on bf16 operands from their raw bits (garbage), so
# under the interpreter the tiles are cast to fp32 before tl.dot; compiled kernels keep bf16 operands (wgmma).
INTERPRET_CONFIG = dict(BLOCK_T=16, BLOCK_V=32, BLOCK_H=16, UPCAST_DOT=True, num_warps=1, num_stages=1)


@triton.jit
def logits_tile(X_ptr, W_ptr, offs_t, offs_v, T, NV, H, stride_x, stride_w, inv_tau,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """fp32 [BLOCK_T, BLOCK_V] tile of (X W^T) / tau; rows >= T and columns >= NV come out as 0."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        x = tl.load(X_ptr + offs_t[:, None] * stride_x + offs_h[None, :],
                    mask=(offs_t[:, None] < T) & (offs_h[None, :] < H), other=0.0)
        w = tl.load(W_ptr + offs_v[:, None] * stride_w + offs_h[None, :],
                    mask=(offs_v[:, None] < NV) & (offs_h[None, :] < H), other=0.0)
        if UPCAST_DOT:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc)
    return acc * inv_tau


@triton.jit
def pair_logits_tile(HS_ptr, HT_ptr, W_ptr, WT_ptr, offs_t, offs_v, T, NV, H, stride_x, stride_w,
                     BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST_DOT: tl.constexpr,
                     SHARED_W: tl.constexpr):
    """Unscaled fp32 [BLOCK_T, BLOCK_V] tiles (h_s W^T, h_t W_t^T) in one loop over H: with SHARED_W (the
    teacher uses the student's head, the default) each W tile is loaded once for both dots."""
    acc_a = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    rows = offs_t[:, None] < T
    cols = offs_v[:, None] < NV
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        hmask = offs_h[None, :] < H
        xs = tl.load(HS_ptr + offs_t[:, None] * stride_x + offs_h[None, :], mask=rows & hmask, other=0.0)
        xt = tl.load(HT_ptr + offs_t[:, None] * stride_x + offs_h[None, :], mask=rows & hmask, other=0.0)
        w = tl.load(W_ptr + offs_v[:, None] * stride_w + offs_h[None, :], mask=cols & hmask, other=0.0)
        if SHARED_W:
            wt = w
        else:
            wt = tl.load(WT_ptr + offs_v[:, None] * stride_w + offs_h[None, :], mask=cols & hmask, other=0.0)
        if UPCAST_DOT:
            xs = xs.to(tl.float32)
            xt = xt.to(tl.float32)
            w = w.to(tl.float32)
            wt = wt.to(tl.float32)
        if xs.dtype == tl.float32:  # fp32 inputs (parity / debugging): full fp32 products, not TF32
            acc_a = tl.dot(xs, tl.trans(w), acc_a, input_precision="ieee")
            acc_b = tl.dot(xt, tl.trans(wt), acc_b, input_precision="ieee")
        else:
            acc_a = tl.dot(xs, tl.trans(w), acc_a)
            acc_b = tl.dot(xt, tl.trans(wt), acc_b)
    return acc_a, acc_b


@triton.jit
def grouped_tile(pid, n_rows, n_cols, GROUP: tl.constexpr):
    """(row tile, column tile) of program `pid` in grouped order: GROUP consecutive row (token) tiles run over
    every column (vocab) tile before the next group starts, so the concurrently running programs share a few
    hidden-state tiles and each W tile is read by GROUP of them back to back (L2 reuse)."""
    per_group = GROUP * n_cols
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_rows - first, GROUP)
    local = pid % per_group
    return first + local % size, local // size


def autotuned(fn, configs, key, pair=False):
    """The GPU entry point: `fn` autotuned over `configs` (the interpreter uses `fn` with one config); `pair`:
    a pair_logits_tile kernel, its configs pruned per launch to pair_configs(configs, SHARED_W)."""
    return triton.autotune(
        configs=[triton.Config({**{k: v for k, v in c.items() if k.startswith("BLOCK")}, "UPCAST_DOT": False},
                               num_warps=c["num_warps"],
                               num_stages=c["num_stages"]) for c in configs],
        key=key, prune_configs_by={"early_config_prune": _prune_pair} if pair else None)(fn)


def launch(fn, tuned, grid_fn, *args, interpret_overrides=None, **constexprs):
    """Launches `tuned` on GPU, or `fn` with INTERPRET_CONFIG (updated by `interpret_overrides`) under
    TRITON_INTERPRET=1."""
    if INTERPRET:
        cfg = dict(INTERPRET_CONFIG, **(interpret_overrides or {}))
        fn[grid_fn(cfg)](*args, **constexprs, **cfg)
    else:
        tuned[grid_fn](*args, **constexprs)
