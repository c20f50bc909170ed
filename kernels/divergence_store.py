"""Store mode of the fused linear divergence: per token chunk, logits once (fp32) and row kernels over them.

Per chunk of T_c tokens (T_c from `memory_budget`, see `store_chunk_tokens`), per tensor-parallel rank:
  1. GEMM  Z = [h_s; h_t] W^T  (one GEMM over the stacked hidden states when the teacher shares the head,
     else two), bf16 operands, fp32 accumulate and fp32 output (`_mm_f32`), Z [2 T_c, V_local] kept.
  2. row kernel `_row_lse_kernel` [grid: 2 T_c rows]: local log-normalizers of a = Z_s / tau, b = Z_t / tau
     -> all_gather [TP, T_c, 2], fixed-order logsumexp -> global lse_a, lse_b.
  3. row kernel `_row_sums_kernel` [grid: T_c rows]: with log q = a - lse_a, log p = b - lse_b known,
     per-token sums of non-negative terms (no cancellation against the log-normalizers, docs/kernels.md):
       div  = sum_v d_v + shift_v          (forward KL: d = p log(p/q), shift = q - p; reverse KL:
                                            d = q log(q/p), shift = p - q; JSD: d = beta p log(p/M) +
                                            (1-beta) q log(q/M) >= 0 per entry, shift = 0)
       loss = sum_v min(d_v, c) + shift_v  (the reference's per-entry clip; = div without clip)
       S    = sum_{v in U} s_v             (U = entries with d_v <= c; s = -p, q (log q/p + 1), q log(q/M))
       n_clipped, mass_clipped             (entries outside U and the probability mass they hold under
                                            p (forward KL), q (reverse KL) or M (JSD))
     -> all_gather [TP, T_c, 5], fixed-order sum (bitwise identical on every rank).
  4. row kernel `_row_grad_kernel` [grid: T_c rows]: dZ_v = coef_t * g_v in the input dtype, with
     g = [v in U] s_v - q S, i.e. q P_U - p [v in U] (forward KL), [v in U] q (log q/p + 1) - q S (reverse KL),
     (1 - beta) ([v in U] q log(q/M) - q S) (JSD); coef_t = loss_weight_t / tau (times [div_t <= c] in
     clip_mode="position", where U is every entry).
  5. GEMMs dH_s[chunk] = dZ W (fp32 out) and dW += dZ^T H_s (fp32 accumulate into the fp32 dW: no
     bf16 round per chunk).
  end: all_reduce SUM of dH_s over the TP group.
Cost: 4 logits-sized GEMMs (the minimum) + 3 streaming passes over the fp32 logits (kernels/roofline.py).
Every row offset is int64 (`row * stride` overflows int32 once T_c x V_local >= 2^31).
"""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from . import tp
from .triton_common import INTERPRET
from .types import GradInForwardDivergence, divergence_opts, divergence_result

KIND_IDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
CLIP_MODES = ("entry", "position")
# Default per-rank budget for the stored chunk (2 fp32 logits rows + 1 dZ row per token): 3 GiB gives
# T_c = 2048 at V_local = 151,936 (bf16), the smallest chunk that keeps the fp32 dW update compute-bound on
# H100 (arithmetic intensity T_c / 4 FLOP/B above the ~280 FLOP/B ridge, docs/kernels.md).
DEFAULT_MEMORY_BUDGET = 3 * 2 ** 30
CHUNK_ALIGN = 128  # chunks are multiples of the GEMM tile height
MIN_STORE_TOKENS = 128  # "auto" falls back to recompute mode when the budget cannot hold this many tokens
NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima (exp(NEG_BIG - NEG_BIG) = 1, never NaN)
# Row kernels stream one row per program: [BLOCK_V] fp32 per tile, no tl.dot; pruned with kernels/aot.py.
ROW_CONFIGS = [dict(BLOCK_V=2048, num_warps=8, num_stages=2), dict(BLOCK_V=1024, num_warps=4, num_stages=2)]
ROW_INTERPRET_BLOCK = 512


@triton.jit
def _row_lse_kernel(Z_ptr, LSE_ptr, NV, stride_z, inv_tau, BLOCK_V: tl.constexpr):
    """LSE[row] = logsumexp_v Z[row, v] * inv_tau over the first NV columns; per-lane running (max, sum),
    merged once at the end."""
    row = tl.program_id(0).to(tl.int64)
    base = Z_ptr + row * stride_z
    m = tl.full((BLOCK_V,), NEG_BIG, tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, NV, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + offs, mask=offs < NV, other=float("-inf")) * inv_tau
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    mx = tl.max(m, 0)
    tot = tl.sum(s * tl.exp(m - mx), 0)
    tl.store(LSE_ptr + row, mx + tl.log(tot))


@triton.jit
def _breg(w, x, other):
    """w x - w + other >= 0 where x = log(w / other): the entry of sum w log(w/other) plus the zero-sum
    (other - w). Near x = 0 it cancels, so there w phi(x) with the series of phi(x) = x - 1 + e^-x
    (|x| < 1/4: truncation < 4e-7 relative); elsewhere the direct form (no overflow of e^-x)."""
    x2 = x * x
    series = x2 * (0.5 + x * (-1.0 / 6 + x * (1.0 / 24 + x * (-1.0 / 120 + x * (1.0 / 720)))))
    return tl.where(tl.abs(x) < 0.25, w * series, w * x - w + other)


@triton.jit
def _expm1(x):
    """exp(x) - 1 accurate near 0 (Kahan: (u - 1) x / log u with u = exp(x))."""
    u = tl.exp(x)
    um1 = u - 1.0
    safe = tl.where(um1 == 0.0, 1.0, um1)
    return tl.where(um1 == 0.0, x, tl.where(u == 0.0, -1.0, safe * x / tl.log(tl.where(um1 == 0.0, 2.0, u))))


@triton.jit
def _log1p(y):
    """log(1 + y) accurate near 0 (Kahan: log(u) y / (u - 1) with u = 1 + y)."""
    u = 1.0 + y
    um1 = u - 1.0
    return tl.where(um1 == 0.0, y, tl.log(u) * y / tl.where(um1 == 0.0, 1.0, um1))


@triton.jit
def _entry_terms(a, b, lse_a, dlse, inv_tau, beta, KIND: tl.constexpr):
    """Per entry, with log q = a / tau - lse_a and r = log p - log q = (b - a) / tau - (lse_b - lse_a) (the
    logit difference is taken first, so r keeps its digits when student and teacher nearly agree):
    (q, d = the reference's integrand, breg = d plus a term that sums to 0 over the vocabulary and makes the
    entry >= 0 (the cancellation-free per-token sum), shift = breg - d for unclipped entries, s = the
    clip-gradient summand, mass = the weighting distribution, h = the entry's own gradient term)."""
    logq = a * inv_tau - lse_a
    r = (b - a) * inv_tau - dlse
    q = tl.exp(logq)
    p = tl.exp(logq + r)
    if KIND == 0:  # p log(p/q) - p + q
        d = p * r
        breg = _breg(p, r, q)
        shift = q - p
        s = -p  # S = -P_U, so that g = h - q S = q P_U - p on U
        mass = p
        h = s
    elif KIND == 1:  # q log(q/p) - q + p
        d = -q * r
        breg = _breg(q, -r, p)
        shift = p - q
        s = q * (1.0 - r)
        mass = q
        h = s
    else:  # log(p/M) = -log1p((1-beta) expm1(-r)), log(q/M) = -log1p(beta expm1(r)); each part >= 0
        lpm = -_log1p((1.0 - beta) * _expm1(-r))
        lqm = -_log1p(beta * _expm1(r))
        mass = beta * p + (1.0 - beta) * q
        d = beta * _breg(p, lpm, mass) + (1.0 - beta) * _breg(q, lqm, mass)  # = beta p log(p/M) + ...
        breg = d
        shift = tl.zeros_like(d)
        s = q * lqm
        h = s
    return q, d, breg, shift, s, mass, h


@triton.jit
def _row_sums_kernel(A_ptr, B_ptr, TOK_ptr, OUT_ptr, NV, stride_a, stride_b, inv_tau, clip, beta,
                     KIND: tl.constexpr, CLIP_ENTRY: tl.constexpr, BLOCK_V: tl.constexpr):
    """OUT[row] = (div, loss, S, n_clipped, mass_clipped) over this rank's NV columns; TOK[row] = (lse_a,
    lse_b) global. Per-lane accumulators, one reduction at the end."""
    row = tl.program_id(0).to(tl.int64)
    lse_a = tl.load(TOK_ptr + row * 2)
    dlse = tl.load(TOK_ptr + row * 2 + 1) - lse_a
    acc_div = tl.zeros((BLOCK_V,), tl.float32)
    acc_loss = tl.zeros((BLOCK_V,), tl.float32)
    acc_s = tl.zeros((BLOCK_V,), tl.float32)
    acc_n = tl.zeros((BLOCK_V,), tl.float32)
    acc_m = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, NV, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        valid = offs < NV
        a = tl.load(A_ptr + row * stride_a + offs, mask=valid, other=0.0)
        b = tl.load(B_ptr + row * stride_b + offs, mask=valid, other=0.0)
        q, d, breg, shift, s, mass, h = _entry_terms(a, b, lse_a, dlse, inv_tau, beta, KIND)
        acc_div += tl.where(valid, breg, 0.0)
        if CLIP_ENTRY:
            cut = valid & (d > clip)
            acc_loss += tl.where(valid, tl.where(cut, clip + shift, breg), 0.0)
            acc_s += tl.where(valid & ~cut, s, 0.0)
            acc_n += tl.where(cut, 1.0, 0.0)
            acc_m += tl.where(cut, mass, 0.0)
        else:
            acc_s += tl.where(valid, s, 0.0)
    tl.store(OUT_ptr + row * 5, tl.sum(acc_div, 0))
    if CLIP_ENTRY:
        tl.store(OUT_ptr + row * 5 + 1, tl.sum(acc_loss, 0))
    else:
        tl.store(OUT_ptr + row * 5 + 1, tl.sum(acc_div, 0))
    tl.store(OUT_ptr + row * 5 + 2, tl.sum(acc_s, 0))
    tl.store(OUT_ptr + row * 5 + 3, tl.sum(acc_n, 0))
    tl.store(OUT_ptr + row * 5 + 4, tl.sum(acc_m, 0))


@triton.jit
def _row_grad_kernel(A_ptr, B_ptr, TOK_ptr, DZ_ptr, NV, stride_a, stride_b, stride_dz, inv_tau, clip, beta,
                     KIND: tl.constexpr, CLIP_ENTRY: tl.constexpr, BLOCK_V: tl.constexpr):
    """DZ[row, v] = coef * (h_v [v in U] - q_v S) (JSD: times 1 - beta); TOK[row] = (lse_a, lse_b, S, coef)."""
    row = tl.program_id(0).to(tl.int64)
    lse_a = tl.load(TOK_ptr + row * 4)
    dlse = tl.load(TOK_ptr + row * 4 + 1) - lse_a
    ssum = tl.load(TOK_ptr + row * 4 + 2)
    coef = tl.load(TOK_ptr + row * 4 + 3)
    if KIND == 2:
        coef = coef * (1.0 - beta)
    for v0 in range(0, NV, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        valid = offs < NV
        a = tl.load(A_ptr + row * stride_a + offs, mask=valid, other=0.0)
        b = tl.load(B_ptr + row * stride_b + offs, mask=valid, other=0.0)
        q, d, breg, shift, s, mass, h = _entry_terms(a, b, lse_a, dlse, inv_tau, beta, KIND)
        if CLIP_ENTRY:
            h = tl.where(d > clip, 0.0, h)
        g = coef * (h - q * ssum)
        tl.store(DZ_ptr + row * stride_dz + offs, g.to(DZ_ptr.dtype.element_ty), mask=valid)


def _row_tuned(fn, key):
    return triton.autotune(configs=[triton.Config({"BLOCK_V": c["BLOCK_V"]}, num_warps=c["num_warps"],
                                                  num_stages=c["num_stages"]) for c in ROW_CONFIGS], key=key)(fn)


_lse_tuned = _row_tuned(_row_lse_kernel, ["NV"])
_sums_tuned = _row_tuned(_row_sums_kernel, ["NV", "KIND", "CLIP_ENTRY"])
_grad_tuned = _row_tuned(_row_grad_kernel, ["NV", "KIND", "CLIP_ENTRY"])


def _launch(fn, tuned, rows, *args, **constexprs):
    if INTERPRET:  # TRITON_INTERPRET=1: numpy semantics on CPU tensors; big rows in big blocks (fewer steps)
        nv = args[2] if fn is _row_lse_kernel else args[4]
        block = ROW_INTERPRET_BLOCK if nv <= 8 * ROW_INTERPRET_BLOCK else 16 * ROW_INTERPRET_BLOCK
        fn[(rows,)](*args, **constexprs, BLOCK_V=block)
    else:
        tuned[(rows,)](*args, **constexprs)


def _mm_f32(a, b):
    """a @ b with fp32 accumulation and an fp32 result (bf16 tensor cores on CUDA, no bf16 rounding of the
    output)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b.float())
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())  # CPU has no mixed-dtype GEMM


def _addmm_f32_(c, a, b):
    """c += a @ b in place, c fp32: accumulates across chunks without a per-chunk round to a, b's dtype."""
    if a.dtype == torch.float32:
        return c.addmm_(a, b.float())
    if a.is_cuda:
        return torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
    return c.addmm_(a.float(), b.float())


def store_bytes_per_token(nv: int, dtype: torch.dtype) -> int:
    """Extra memory per chunk token: fp32 student and teacher logits rows + one dZ row in `dtype`."""
    return nv * (8 + torch.empty((), dtype=dtype).element_size())


def store_chunk_tokens(num_tokens: int, num_local: int, dtype: torch.dtype, memory_budget=None) -> int:
    """Tokens per chunk under `memory_budget` bytes (default DEFAULT_MEMORY_BUDGET), a multiple of
    CHUNK_ALIGN when possible, at most num_tokens; 0 when the budget holds fewer than MIN_STORE_TOKENS."""
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    fit = budget // max(1, store_bytes_per_token(num_local, dtype))
    if fit < min(MIN_STORE_TOKENS, num_tokens):
        return 0
    if fit >= CHUNK_ALIGN:
        fit -= fit % CHUNK_ALIGN
    return max(1, min(num_tokens, fit))


def _store_fwd_bwd(hs, ht, w, tw, *, kind, beta, tau, clip, loss_weight, group, nv, need_dh, need_dw,
                   chunk_size, clip_mode="position", memory_budget=None, stats=None, vocab_total=None):
    """Returns (per_token div, dhs fp32 | None, dw fp32 | None, per-token loss, clipped count, clipped mass);
    the gradients are of sum_t loss_weight_t * loss_t."""
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
    num_t, dev = hs.shape[0], hs.device
    inv_tau, kid = 1.0 / tau, KIND_IDS[kind]
    entry = clip is not None and clip_mode == "entry"
    cval = float(clip) if clip is not None else 0.0
    shared = tw.data_ptr() == w.data_ptr() and tw.dtype == w.dtype and tw.stride() == w.stride()
    wv, twv = w[:nv], tw[:nv]
    tc = int(chunk_size) if chunk_size else store_chunk_tokens(num_t, w.shape[0], hs.dtype, memory_budget)
    if tc <= 0:
        raise ValueError(f"memory_budget={memory_budget} B holds fewer than {MIN_STORE_TOKENS} tokens of stored "
                         f"logits ({store_bytes_per_token(w.shape[0], hs.dtype)} B per token): raise it or use "
                         f"mode='recompute'")
    out = torch.zeros(5, num_t, dtype=torch.float32, device=dev)  # div, loss, S, n_clipped, mass_clipped
    dhs = torch.zeros(hs.shape, dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=dev) if need_dw else None
    for c0 in range(0, num_t, tc):
        c1 = min(num_t, c0 + tc)
        n = c1 - c0
        hs_c, ht_c = hs[c0:c1], ht[c0:c1]
        lse_local = torch.full((2, n), float("-inf"), dtype=torch.float32, device=dev)
        if nv > 0:
            if shared:  # one GEMM for both sides: [h_s; h_t] W^T
                z = _mm_f32(torch.cat([hs_c, ht_c]), wv.T)
                za, zb = z[:n], z[n:]
            else:
                za, zb = _mm_f32(hs_c, wv.T), _mm_f32(ht_c, twv.T)
            _launch(_row_lse_kernel, _lse_tuned, n, za, lse_local[0], nv, za.stride(0), inv_tau)
            _launch(_row_lse_kernel, _lse_tuned, n, zb, lse_local[1], nv, zb.stride(0), inv_tau)
        lse = torch.logsumexp(tp.gather_stats(lse_local.T.contiguous(), group), 0)  # [n, 2], rank order
        sums = torch.zeros(n, 5, dtype=torch.float32, device=dev)
        if nv > 0:
            _launch(_row_sums_kernel, _sums_tuned, n, za, zb, lse, sums, nv, za.stride(0), zb.stride(0), inv_tau,
                    cval, beta, KIND=kid, CLIP_ENTRY=entry)
        sums = tp.gather_stats(sums, group).sum(0)  # fixed rank order: identical on every rank
        out[:5, c0:c1] = sums.T
        if clip is not None and not entry:  # position mode: a clipped token keeps min(div, c), no gradient
            out[1, c0:c1] = sums[:, 0].clamp(max=cval)
        if not (need_dh or need_dw) or nv == 0:
            continue
        coef = (torch.full((n,), inv_tau, device=dev) if loss_weight is None
                else loss_weight[c0:c1].float() * inv_tau)
        if clip is not None and not entry:
            coef = coef * (sums[:, 0] <= cval)
        tok = torch.stack([lse[:, 0], lse[:, 1], sums[:, 2], coef], 1).contiguous()
        dz = torch.empty(n, nv, dtype=hs.dtype, device=dev)
        _launch(_row_grad_kernel, _grad_tuned, n, za, zb, tok, dz, nv, za.stride(0), zb.stride(0), dz.stride(0),
                inv_tau, cval, beta, KIND=kid, CLIP_ENTRY=entry)
        del za, zb
        if dhs is not None:
            dhs[c0:c1] = _mm_f32(dz, wv)
        if dw is not None:
            _addmm_f32_(dw[:nv], dz.T, hs_c)
    if dhs is not None:
        tp.all_reduce_sum(dhs, group)
    if stats is not None:
        stats.update(chunk_tokens=tc, clipped_count=out[3], clipped_mass=out[4])
    return out[0], dhs, dw, out[1], out[3], out[4]


class StoreOut(tuple):
    """(per_token, dhs, dw) -- what `types.GradInForwardDivergence` / `ops.divergence_fwd_bwd` unpack today --
    that also carries `token_loss` [T] (the clipped per-token value the loss sums; None without a clip) and
    `clip_stats` [T, 2] (clipped_count, clipped_mass; None without a clip) as attributes, the fields the
    per-entry clip's result type (per_token, token_loss, clip_stats, dhs, dw) reads."""

    def __new__(cls, per_token, dhs, dw, token_loss, clip_stats):
        self = super().__new__(cls, (per_token, dhs, dw))
        self.per_token, self.dhs, self.dw, self.token_loss, self.clip_stats = per_token, dhs, dw, token_loss, clip_stats
        return self


def _divergence_fwd_bwd(hs, ht, w, tw, *, clip_mode="position", vocab_total=None, **opts) -> StoreOut:
    """Store-mode `fwd_bwd`: gradients of sum_t loss_weight_t * token_loss_t, with token_loss = the per-entry
    clipped sum (clip_mode="entry") or min(div, c) (clip_mode="position"). Position mode counts every valid
    entry (`vocab_total`, default this rank's shard times the TP size) of a clipped position, mass 1."""
    div, dhs, dw, loss_t, n_clip, m_clip = _store_fwd_bwd(hs, ht, w, tw, clip_mode=clip_mode, **opts)
    loss_t = loss_t.clone()  # div and loss_t are rows of one buffer: a custom op's outputs may not alias
    if opts.get("clip") is None:
        return StoreOut(div, dhs, dw, None, None)
    if clip_mode == "entry":
        return StoreOut(div, dhs, dw, loss_t, torch.stack([n_clip, m_clip], 1))
    hit = (div > opts["clip"]).float()
    total = vocab_total if vocab_total is not None else opts["nv"] * tp.tp_size(opts.get("group"))
    return StoreOut(div, dhs, dw, loss_t, torch.stack([hit * float(total), hit], 1))


def resolve_mode(mode: str, num_tokens: int, num_local: int, dtype, memory_budget) -> str:
    """'store' / 'recompute' as given; 'auto' = store when the budget holds MIN_STORE_TOKENS tokens."""
    if mode not in ("auto", "store", "recompute"):
        raise ValueError(f"mode must be 'auto', 'store' or 'recompute', got {mode!r}")
    if mode != "auto":
        return mode
    if store_chunk_tokens(num_tokens, num_local, dtype, memory_budget) > 0:
        return "store"
    warnings.warn(f"memory_budget={memory_budget} B is too small for store mode "
                  f"({store_bytes_per_token(num_local, dtype)} B per token): using recompute mode", stacklevel=3)
    return "recompute"


def fused_linear_divergence(student_hidden, teacher_hidden, weight, *, teacher_weight=None, kind, beta,
                            temperature, token_clip, loss_weight, tp_group, vocab_start, valid_vocab,
                            chunk_size=None, clip_mode="entry", memory_budget=None, fwd_bwd=None):
    """Store-mode implementation; `kind` is the resolved divergence (see types.resolve_divergence); both
    clip modes go through `fwd_bwd` (api.py passes the custom op)."""
    tw = weight.detach() if teacher_weight is None else teacher_weight.detach().to(weight.dtype)
    opts = divergence_opts(weight, kind=kind, beta=beta, temperature=temperature, token_clip=token_clip,
                           tp_group=tp_group, vocab_start=vocab_start, valid_vocab=valid_vocab, chunk_size=chunk_size,
                           clip_mode=clip_mode)
    opts.update(memory_budget=memory_budget)
    lw = None if loss_weight is None else loss_weight.detach()
    ht = teacher_hidden.detach().to(student_hidden.dtype)
    loss, per_token, stats = GradInForwardDivergence.apply(student_hidden, ht, weight, tw, lw,
                                                           fwd_bwd or _divergence_fwd_bwd, opts)
    return divergence_result(loss, per_token, stats, opts["clip"])
