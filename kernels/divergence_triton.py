"""Triton fused linear divergence (forward KL, reverse KL, generalized JSD) over a vocab-parallel LM head,
recompute mode: logits are never stored, every pass recomputes its [BLOCK_T, BLOCK_V] tiles from the hidden
states (the store mode, kernels/divergence_store.py, keeps them instead and is the default when
`memory_budget` allows).

Forward layout (per rank; gradients are computed here, the loss is terminal):
  1. kernel `_div_stats_kernel` [grid: token tiles x vocab splits, grouped order]: per program one token
     tile and one contiguous split of the local vocabulary; a = h_s W^T / tau and b = h_t W_t^T / tau in one
     loop over H (the W tile loaded once for both dots when the teacher shares the head), online
     (max, sum-exp) of a and b -> STATS [S, T, 2] = the split's log-normalizers (l_a, l_b).
  2. Python: all_gather [TP, S, T, 2] over tp_group; the TP x S partial log-normalizers are merged as
     TP x S "ranks" by one fixed-order logsumexp (kernels/tp.py) -> global lse_a, lse_b (bitwise identical
     on every rank).
  3. kernel `_div_sums_kernel` [same grid]: with log q = a - lse_a and r = log p - log q = (b - a) -
     (lse_b - lse_a) known (the logit difference is taken first), per-token sums over the split of
     non-negative terms (the cancellation-free form of docs/kernels.md; the per-entry algebra is the store
     mode's `_entry_terms`): div = sum_v d_v + shift_v, loss = the per-entry clipped sum, S = the gradient's
     per-token sum, #clipped, clipped mass -> all_gather [TP, S, T, 5] + fixed-order sum.
  4. Python: per-token coefficient = loss_weight / tau (clip_mode="position": times [div <= clip]).
  5. per token chunk: kernel `_div_grad_kernel` [grid: token tiles x vocab tiles, grouped order]
     recomputes a, b and writes dZ = coef (h_v [v in U] - q_v S) (JSD: times 1 - beta) [T_c, NV] in the
     input dtype; Python GEMMs dH_s[chunk] = dZ W and dW += dZ^T H_s (fp32 accumulation across chunks)
  6. Python: all_reduce SUM of dH_s over tp_group
Backward layout: no kernel and no collective; grad_output (a scalar) scales the stored dH_s and dW.
Cost: 8 logits-sized GEMM-equivalents for every divergence and clip mode (stats 2, sums 2, grad 2, dH, dW;
the store mode does 4). The sums pass replaces the one-pass E_p[b - a] - lse_b + lse_a form, whose
cancellation gave ~4% relative error at KL ~ 4e-5 with V = 152k in fp32, and the entropy-difference JSD.
Vocab splits: S = `vocab_splits(T, V_local)` chosen from the shapes only (equal on every TP rank), so that the
statistics passes fill the GPU at small T. Rows >= NV (vocab padding) never enter. The sums and gradient
kernels decide d_v <= c on their own recomputed tiles: on the GPU their tile shapes may differ, so an entry
within float rounding of c can land on either side in the two (the loss is continuous there; only that
entry's gradient term is affected).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tp
from .divergence_store import _addmm_f32_, _breg, _entry_terms, _mm_f32
from .triton_common import (GRAD_CONFIGS, INTERPRET, INTERPRET_CONFIG, STATS_CONFIGS, autotuned, grouped_tile, launch,
                            pair_logits_tile)
from .types import FwdBwdOut, GradInForwardDivergence, divergence_opts, divergence_result, position_clip

KIND_IDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
CHUNK_TOKENS = 4096  # dZ chunk: 4096 x V_local in bf16; >= 2048 keeps the dW GEMM compute-bound
GROUP_T = 8  # token tiles per launch group (grouped_tile)
SPLIT_SMS = 132  # H100 SXM SMs: the statistics grid aims at 2 programs per SM
MIN_SPLIT_COLS = 16 * 128  # a split walks at least 16 vocab tiles (its partial statistics cost ~nothing)
# The per-entry epilogue of the sums and grad kernels runs on column blocks of the [128, 128] logits tiles, each
# in its own basic block (an `if` on the block's first column, which also skips blocks past the split's end), so
# that LLVM and ptxas schedule one block's exp/log temporaries at a time instead of interleaving the whole
# tile's (LLVM hoisted every entry's series polynomial above the first exp). ptxas sm_90a, 128x128x64 w8: one
# tile at a time spilled 424-3436 B at 255 registers in 5 variants; 4 blocks without the basic-block
# boundaries still spilled 320 B (reverse KL + clip); with them every variant is spill-free, 8 blocks in the
# sums kernel leave 13-24 registers of headroom (kernels/aot.py prints the table).
SUMS_PARTS = tl.constexpr(8)
GRAD_PARTS = tl.constexpr(4)
NSUM = 5  # per-token sums: div, clipped loss, S, n_clipped, mass_clipped
BIG_VOCAB = 1024  # under the interpreter, vocabularies above this run with BLOCK_V=2048 (fewer numpy steps)


def vocab_splits(num_tokens: int, num_local: int, block_t: int = 128, min_cols: int = MIN_SPLIT_COLS,
                 sms: int = SPLIT_SMS) -> int:
    """Vocabulary splits of the statistics grid, from the shapes only (identical on every TP rank). With the
    grouped order a launch group is GROUP_T token tiles x S splits; S >= sms / GROUP_T makes one group about
    one wave, so the concurrently running programs share GROUP_T hidden-state tiles (2 x 128 x H bf16 each,
    8 MB at H = 4096: they stay in L2) and every W tile is read from HBM once per group. At small T, S also
    gives 2 programs per SM. Each split is at least `min_cols` wide. Under the interpreter (small tiles,
    4 "SMs", splits one tile wide) the tests get several splits, a partial one too."""
    tiles = triton.cdiv(max(1, num_tokens), block_t)
    want = max(triton.cdiv(sms, GROUP_T), triton.cdiv(2 * sms, tiles))
    return max(1, min(want, num_local // min_cols))


@triton.jit
def _split_range(pid_s, NV, n_splits, BLOCK_V: tl.constexpr):
    """[lo, hi) of vocab split pid_s: equal multiples of BLOCK_V (the last split may be shorter or empty)."""
    width = tl.cdiv(tl.cdiv(NV, n_splits), BLOCK_V) * BLOCK_V
    lo = pid_s * width
    return lo, tl.minimum(NV, lo + width)


@triton.jit
def _jsd_logs(r, beta):
    """(x, y) = (log p/M, log q/M) from r = log p - log q: y = -K(r) with K the cumulant generating function of
    a Bernoulli(beta), log(1 - beta + beta e^r). |r| < 0.35: its Taylor series to r^8 (cumulants from beta;
    truncation < 1e-8 relative), no cancellation near r = 0; else -log(beta e^r + 1 - beta) with one exp of
    -|r| (no overflow). Polynomial instead of the store's Kahan expm1 / log1p: fewer live registers in the
    128 x 128 epilogue (before the column blocks, ptxas gave 2.3 KB instead of 9.8 KB of spills in the JSD
    sums kernel; now 0 at 234 registers)."""
    c = 1.0 - beta
    u = beta * c
    w = 1.0 - 2.0 * beta
    k2 = u / 2
    k3 = u * w / 6
    k4 = u * (1.0 - 6.0 * u) / 24
    k5 = u * w * (1.0 - 12.0 * u) / 120
    k6 = u * (1.0 + u * (-30.0 + 120.0 * u)) / 720
    k7 = u * w * (1.0 + u * (-60.0 + 360.0 * u)) / 5040
    k8 = u * (1.0 + u * (-126.0 + u * (1680.0 - 5040.0 * u))) / 40320
    rest = r * r * (k2 + r * (k3 + r * (k4 + r * (k5 + r * (k6 + r * (k7 + r * k8))))))  # K(r) - beta r
    t = tl.exp(-tl.abs(r))
    direct = -tl.log(tl.where(r > 0, beta + c * t, beta * t + c)) - tl.maximum(r, 0.0)
    small = tl.abs(r) < 0.35
    y = tl.where(small, -(beta * r + rest), direct)
    x = tl.where(small, c * r - rest, direct + r)
    return x, y


@triton.jit
def _halves(x, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    """(x[:, :BV/2], x[:, BV/2:]) of a [BLOCK_T, BLOCK_V] tile."""
    return tl.split(tl.permute(tl.reshape(x, (BLOCK_T, 2, BLOCK_V // 2)), (0, 2, 1)))


@triton.jit
def _col_parts(x, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, PARTS: tl.constexpr):
    """The tile as a tuple of PARTS (1, 2, 4 or 8) consecutive column blocks. Free on the GPU: in the wgmma
    accumulator layout (m64n128) a thread holds columns c, c+1, c+8, ..., c+64 of its rows, so column bits 3..6
    are register bits and reshape / permute / split only renumber registers (the TTGIR has no convert_layout
    there and no shared memory is used; the shapes are linear layouts)."""
    if PARTS == 1:
        return (x,)
    elif PARTS == 2:
        return _halves(x, BLOCK_T, BLOCK_V)
    elif PARTS == 4:
        x0, x1 = _halves(x, BLOCK_T, BLOCK_V)
        x00, x01 = _halves(x0, BLOCK_T, BLOCK_V // 2)
        x10, x11 = _halves(x1, BLOCK_T, BLOCK_V // 2)
        return x00, x01, x10, x11
    else:
        x0, x1, x2, x3 = _col_parts(x, BLOCK_T, BLOCK_V, 4)
        y0, y1 = _halves(x0, BLOCK_T, BLOCK_V // 4)
        y2, y3 = _halves(x1, BLOCK_T, BLOCK_V // 4)
        y4, y5 = _halves(x2, BLOCK_T, BLOCK_V // 4)
        y6, y7 = _halves(x3, BLOCK_T, BLOCK_V // 4)
        return y0, y1, y2, y3, y4, y5, y6, y7


@triton.jit
def _terms(a, b, lse_a, dlse, inv_tau, beta, KIND: tl.constexpr):
    """The store mode's per-entry terms (q, d, breg, shift, s, mass, h; divergence_store._entry_terms) from
    recomputed raw logits tiles; JSD through _jsd_logs (same quantities, fewer live registers)."""
    if KIND == 2:
        logq = a * inv_tau - lse_a
        r = (b - a) * inv_tau - dlse
        q = tl.exp(logq)
        p = tl.exp(logq + r)
        x, y = _jsd_logs(r, beta)
        mass = beta * p + (1.0 - beta) * q
        d = beta * _breg(p, x, mass) + (1.0 - beta) * _breg(q, y, mass)
        s = q * y
        return q, d, d, tl.zeros_like(d), s, mass, s
    else:
        return _entry_terms(a, b, lse_a, dlse, inv_tau, beta, KIND)


@triton.jit
def _part_sums(a, b, p0, hi, lse_a, dlse, inv_tau, clip, beta, KIND: tl.constexpr, CLIP_ENTRY: tl.constexpr,
               WIDTH: tl.constexpr):
    """Row sums (div, clipped loss, S, n_clipped, mass_clipped) of one [BLOCK_T, WIDTH] column block whose
    first column is p0 (columns >= hi excluded)."""
    valid = (p0 + tl.arange(0, WIDTH))[None, :] < hi
    q, d, breg, shift, s, mass, h = _terms(a, b, lse_a[:, None], dlse[:, None], inv_tau, beta, KIND)
    div = tl.sum(tl.where(valid, breg, 0.0), 1)
    if CLIP_ENTRY:
        cut = valid & (d > clip)
        loss = tl.sum(tl.where(valid, tl.where(cut, clip + shift, breg), 0.0), 1)
        ssum = tl.sum(tl.where(valid & (d <= clip), s, 0.0), 1)
        n = tl.sum(tl.where(cut, 1.0, 0.0), 1)
        m = tl.sum(tl.where(cut, mass, 0.0), 1)
    else:  # loss, n, m unused by the caller without the per-entry clip
        loss = div
        ssum = tl.sum(tl.where(valid, s, 0.0), 1)
        n = div
        m = div
    return div, loss, ssum, n, m


@triton.jit
def _part_grad(a, b, rows, row, p0, NV, lse_a, dlse, ssum, coef, inv_tau, clip, beta, KIND: tl.constexpr,
               CLIP_ENTRY: tl.constexpr, WIDTH: tl.constexpr):
    """Stores dZ of one [BLOCK_T, WIDTH] column block whose first column is p0 (row pointers `rows`)."""
    offs = p0 + tl.arange(0, WIDTH)
    q, d, breg, shift, s, mass, h = _terms(a, b, lse_a[:, None], dlse[:, None], inv_tau, beta, KIND)
    if CLIP_ENTRY:
        h = tl.where(d > clip, 0.0, h)
    g = coef[:, None] * (h - q * ssum[:, None])
    tl.store(rows + offs[None, :], g.to(rows.dtype.element_ty), mask=row[:, None] & (offs[None, :] < NV))


@triton.jit
def _div_stats_kernel(HS_ptr, HT_ptr, W_ptr, WT_ptr, STATS_ptr, T, NV, H, stride_x, stride_w, inv_tau, n_splits,
                      BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
                      UPCAST_DOT: tl.constexpr, SHARED_W: tl.constexpr):
    """STATS[s, t] = (logsumexp_v a, logsumexp_v b) over split s (-inf for an empty split)."""
    pid_t, pid_s = grouped_tile(tl.program_id(0), tl.cdiv(T, BLOCK_T), n_splits, GROUP)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    lo, hi = _split_range(pid_s, NV, n_splits, BLOCK_V)
    m_a = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    m_b = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    s_a = tl.zeros((BLOCK_T,), tl.float32)
    s_b = tl.zeros((BLOCK_T,), tl.float32)
    for v0 in range(lo, hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        valid = offs_v[None, :] < hi
        a, b = pair_logits_tile(HS_ptr, HT_ptr, W_ptr, WT_ptr, offs_t, offs_v, T, hi, H, stride_x, stride_w,
                                BLOCK_T, BLOCK_V, BLOCK_H, UPCAST_DOT, SHARED_W)
        a = tl.where(valid, a * inv_tau, float("-inf"))
        b = tl.where(valid, b * inv_tau, float("-inf"))
        m_a_new = tl.maximum(m_a, tl.max(a, 1))
        m_b_new = tl.maximum(m_b, tl.max(b, 1))
        s_a = s_a * tl.exp(m_a - m_a_new) + tl.sum(tl.exp(a - m_a_new[:, None]), 1)
        s_b = s_b * tl.exp(m_b - m_b_new) + tl.sum(tl.exp(b - m_b_new[:, None]), 1)
        m_a = m_a_new
        m_b = m_b_new
    row = offs_t < T
    out = STATS_ptr + (pid_s * T + offs_t) * 2
    tl.store(out, m_a + tl.log(s_a), mask=row)
    tl.store(out + 1, m_b + tl.log(s_b), mask=row)


@triton.jit
def _div_sums_kernel(HS_ptr, HT_ptr, W_ptr, WT_ptr, TOK_ptr, SUMS_ptr, T, NV, H, stride_x, stride_w, inv_tau,
                     clip, beta, n_splits,
                     KIND: tl.constexpr, CLIP_ENTRY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_H: tl.constexpr, GROUP: tl.constexpr, UPCAST_DOT: tl.constexpr, SHARED_W: tl.constexpr):
    """SUMS[s, t] = (div, clipped loss, S, n_clipped, mass_clipped) over split s; TOK[t] = (lse_a, lse_b)."""
    pid_t, pid_s = grouped_tile(tl.program_id(0), tl.cdiv(T, BLOCK_T), n_splits, GROUP)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row = offs_t < T
    lo, hi = _split_range(pid_s, NV, n_splits, BLOCK_V)
    lse_a = tl.load(TOK_ptr + offs_t * 2, mask=row, other=0.0)
    dlse = tl.load(TOK_ptr + offs_t * 2 + 1, mask=row, other=0.0) - lse_a
    acc_div = tl.zeros((BLOCK_T,), tl.float32)
    acc_loss = tl.zeros((BLOCK_T,), tl.float32)
    acc_s = tl.zeros((BLOCK_T,), tl.float32)
    acc_n = tl.zeros((BLOCK_T,), tl.float32)
    acc_m = tl.zeros((BLOCK_T,), tl.float32)
    for v0 in range(lo, hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        a, b = pair_logits_tile(HS_ptr, HT_ptr, W_ptr, WT_ptr, offs_t, offs_v, T, hi, H, stride_x, stride_w,
                                BLOCK_T, BLOCK_V, BLOCK_H, UPCAST_DOT, SHARED_W)
        parts_a = _col_parts(a, BLOCK_T, BLOCK_V, SUMS_PARTS)
        parts_b = _col_parts(b, BLOCK_T, BLOCK_V, SUMS_PARTS)
        for i in tl.static_range(SUMS_PARTS):
            p0 = v0 + i * (BLOCK_V // SUMS_PARTS)
            if p0 < hi:
                c_div, c_loss, c_s, c_n, c_m = _part_sums(parts_a[i], parts_b[i], p0, hi, lse_a, dlse, inv_tau, clip,
                                                          beta, KIND, CLIP_ENTRY, BLOCK_V // SUMS_PARTS)
                acc_div += c_div
                acc_s += c_s
                if CLIP_ENTRY:
                    acc_loss += c_loss
                    acc_n += c_n
                    acc_m += c_m
    out = SUMS_ptr + (pid_s * T + offs_t) * 5
    tl.store(out, acc_div, mask=row)
    if CLIP_ENTRY:
        tl.store(out + 1, acc_loss, mask=row)
    else:
        tl.store(out + 1, acc_div, mask=row)
    tl.store(out + 2, acc_s, mask=row)
    tl.store(out + 3, acc_n, mask=row)
    tl.store(out + 4, acc_m, mask=row)


@triton.jit
def _div_grad_kernel(HS_ptr, HT_ptr, W_ptr, WT_ptr, TOK_ptr, DZ_ptr, T, NV, H, stride_x, stride_w, stride_dz,
                     inv_tau, beta, clip,
                     KIND: tl.constexpr, CLIP_ENTRY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_H: tl.constexpr, GROUP: tl.constexpr, UPCAST_DOT: tl.constexpr, SHARED_W: tl.constexpr):
    """dZ tile = coef_t (h_v [d_v <= clip] - q_v S_t) (JSD: times 1 - beta); TOK = per token (lse_a, lse_b, S,
    coef): forward KL q P_U - p [U], reverse KL [U] q (log q/p + 1) - q S, JSD (1 - beta)([U] q log(q/M) - q S)."""
    pid_t, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(T, BLOCK_T), tl.cdiv(NV, BLOCK_V), GROUP)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row = offs_t < T
    lse_a = tl.load(TOK_ptr + offs_t * 4, mask=row, other=0.0)
    dlse = tl.load(TOK_ptr + offs_t * 4 + 1, mask=row, other=0.0) - lse_a
    ssum = tl.load(TOK_ptr + offs_t * 4 + 2, mask=row, other=0.0)
    coef = tl.load(TOK_ptr + offs_t * 4 + 3, mask=row, other=0.0)
    if KIND == 2:
        coef = coef * (1.0 - beta)
    a, b = pair_logits_tile(HS_ptr, HT_ptr, W_ptr, WT_ptr, offs_t, offs_v, T, NV, H, stride_x, stride_w,
                            BLOCK_T, BLOCK_V, BLOCK_H, UPCAST_DOT, SHARED_W)
    parts_a = _col_parts(a, BLOCK_T, BLOCK_V, GRAD_PARTS)
    parts_b = _col_parts(b, BLOCK_T, BLOCK_V, GRAD_PARTS)
    # int64 row offsets: a dZ chunk of T_c x V_local elements may exceed 2^31
    rows = DZ_ptr + offs_t.to(tl.int64)[:, None] * stride_dz
    for i in tl.static_range(GRAD_PARTS):
        p0 = pid_v * BLOCK_V + i * (BLOCK_V // GRAD_PARTS)
        if p0 < NV:
            _part_grad(parts_a[i], parts_b[i], rows, row, p0, NV, lse_a, dlse, ssum, coef, inv_tau, clip, beta,
                       KIND, CLIP_ENTRY, BLOCK_V // GRAD_PARTS)


_stats_tuned = autotuned(_div_stats_kernel, STATS_CONFIGS, key=["NV", "H", "SHARED_W"], pair=True)
_sums_tuned = autotuned(_div_sums_kernel, STATS_CONFIGS, key=["NV", "H", "KIND", "CLIP_ENTRY", "SHARED_W"], pair=True)
_grad_tuned = autotuned(_div_grad_kernel, GRAD_CONFIGS, key=["NV", "H", "KIND", "CLIP_ENTRY", "SHARED_W"], pair=True)


def _interpret_tiles(nv):
    return dict(BLOCK_V=2048) if nv > BIG_VOCAB else None


def _divergence_fwd_bwd(hs, ht, w, tw, *, kind, beta, tau, clip, clip_mode, vocab_total, loss_weight, group, nv,
                        need_dh, need_dw, chunk_size) -> FwdBwdOut:
    num_t, hdim = hs.shape
    dev = hs.device
    entry = clip is not None and clip_mode == "entry"
    cval = 0.0 if clip is None else float(clip)
    inv_tau, kid = 1.0 / tau, KIND_IDS[kind]
    shared = tw.data_ptr() == w.data_ptr() and tw.dtype == w.dtype and tw.stride() == w.stride()
    hs, ht, w, tw = hs.contiguous(), ht.contiguous(), w.contiguous(), tw.contiguous()
    const = dict(GROUP=GROUP_T, SHARED_W=shared)
    over = _interpret_tiles(w.shape[0])
    if INTERPRET:
        cfg = dict(INTERPRET_CONFIG, **(over or {}))
        n_splits = vocab_splits(num_t, w.shape[0], cfg["BLOCK_T"], cfg["BLOCK_V"], sms=4)
    else:
        n_splits = vocab_splits(num_t, w.shape[0])
    stats_grid = lambda m: (triton.cdiv(num_t, m["BLOCK_T"]) * n_splits,)  # noqa: E731
    stats = torch.full((n_splits, num_t, 2), float("-inf"), dtype=torch.float32, device=dev)
    if nv > 0:  # else this rank holds only vocabulary padding
        launch(_div_stats_kernel, _stats_tuned, stats_grid, hs, ht, w, tw, stats, num_t, nv, hdim, hdim, hdim,
               inv_tau, n_splits, interpret_overrides=over, **const)
    parts = tp.gather_stats(stats.view(n_splits * num_t, 2), group).view(-1, num_t, 2)  # [TP x S, T, 2]
    lse = torch.logsumexp(parts, 0)  # fixed order: bitwise identical on every rank
    sums = torch.zeros(n_splits, num_t, 5, dtype=torch.float32, device=dev)
    if nv > 0:
        launch(_div_sums_kernel, _sums_tuned, stats_grid, hs, ht, w, tw, lse.contiguous(), sums, num_t, nv, hdim,
               hdim, hdim, inv_tau, cval, beta, n_splits, interpret_overrides=over, KIND=kid, CLIP_ENTRY=entry,
               **const)
    tot = tp.gather_stats(sums.view(n_splits * num_t, 5), group).view(-1, num_t, 5).sum(0)  # fixed order
    div = tot[:, 0].contiguous()
    coef = torch.full_like(div, inv_tau) if loss_weight is None else loss_weight.float() * inv_tau
    token_loss = clip_stats = None
    if entry:
        token_loss, clip_stats = tot[:, 1].contiguous(), tot[:, 3:].contiguous()
    elif clip is not None:
        token_loss, clip_stats, keep = position_clip(div, clip, vocab_total)
        coef = coef * keep
    tok = torch.stack([lse[:, 0], lse[:, 1], tot[:, 2], coef], 1).contiguous()
    dhs = torch.zeros(hs.shape, dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None
    if (need_dh or need_dw) and nv > 0:
        tc = chunk_size or CHUNK_TOKENS
        dz = torch.empty(min(tc, num_t), nv, dtype=hs.dtype, device=dev)
        for c0 in range(0, num_t, tc):
            c1 = min(num_t, c0 + tc)
            dzc = dz[:c1 - c0]
            launch(_div_grad_kernel, _grad_tuned,
                   lambda m: (triton.cdiv(c1 - c0, m["BLOCK_T"]) * triton.cdiv(nv, m["BLOCK_V"]),),
                   hs[c0:c1], ht[c0:c1], w, tw, tok[c0:c1], dzc, c1 - c0, nv, hdim, hdim, hdim, nv,
                   inv_tau, beta, cval, interpret_overrides=over, KIND=kid, CLIP_ENTRY=entry, **const)
            if dhs is not None:  # fp32 outputs, dW accumulated in fp32 (no per-chunk round to bf16)
                dhs[c0:c1] = _mm_f32(dzc, w[:nv])
            if dw is not None:
                _addmm_f32_(dw[:nv], dzc.T, hs[c0:c1])
    if dhs is not None:
        tp.all_reduce_sum(dhs, group)
    return FwdBwdOut(div, token_loss, clip_stats, dhs, dw)


def fused_linear_divergence(student_hidden, teacher_hidden, weight, *, teacher_weight=None, kind, beta,
                            temperature, token_clip, loss_weight, tp_group, vocab_start, valid_vocab,
                            chunk_size=None, clip_mode="entry", fwd_bwd=None):
    """Triton implementation; `kind` is the resolved divergence (see types.resolve_divergence)."""
    tw = weight.detach() if teacher_weight is None else teacher_weight.detach().to(weight.dtype)
    opts = divergence_opts(weight, kind=kind, beta=beta, temperature=temperature, token_clip=token_clip,
                           tp_group=tp_group, vocab_start=vocab_start, valid_vocab=valid_vocab, chunk_size=chunk_size,
                           clip_mode=clip_mode)
    lw = None if loss_weight is None else loss_weight.detach()
    loss, per_token, stats = GradInForwardDivergence.apply(
        student_hidden, teacher_hidden.detach().to(student_hidden.dtype), weight, tw, lw,
        fwd_bwd or _divergence_fwd_bwd, opts)
    return divergence_result(loss, per_token, stats, opts["clip"])
