"""Triton fused linear divergence (forward KL, reverse KL, generalized JSD) over a vocab-parallel LM head.

Forward layout (per rank; gradients are computed here, the loss is terminal):
  1. kernel `_div_stats_kernel` [grid: token blocks]: for each vocab tile, a = h_s W^T / tau and
     b = h_t W_t^T / tau via tl.dot, online (max, sum) for a and b with rescaling when the max grows, and
     U = sum e^(b - m_b)(b - a) (forward KL) or sum e^(a - m_a)(a - b) (reverse KL)  -> stats [T, 3] =
     (lse_a_local, lse_b_local, U / S)
  2. Python: all_gather [TP, T, 3] over tp_group, fixed-order combine (kernels/tp.py) -> lse_a, lse_b, KL
  3. JSD only: kernel `_jsd_sums_kernel` [grid: token blocks] recomputes the tiles and accumulates
     (sum p log p, sum q log q, sum M log M, sum q log M) -> Python: all_reduce SUM [T, 4] -> JSD, KL(q||M)
  4. token_clip with clip_mode="entry" (default; the reference's per-entry clamp): kernel
     `_clip_sums_kernel` [grid: token blocks] recomputes the tiles, forms every term d_v from the normalized
     log-probs and accumulates (sum_v min(d_v, c), S_U = sum_{v in U} g_v, #clipped, clipped mass) over
     U = {d_v <= c}, g_v = q_v dd_v/dq_v -> Python: all_gather [TP, T, 4] + fixed-order sum (bitwise equal
     on every rank) -> the clipped per-token loss, S_U for the gradient kernel, the clip statistics
  5. Python: per-token coefficient = loss_weight / tau (clip_mode="position": times (div <= clip))
  6. per token chunk: kernel `_div_grad_kernel` [grid: token blocks x vocab tiles] recomputes a, b and
     writes dZ = coef * dLoss/da [T_c, NV] in the input dtype (entry clip: g_v [v in U] - q_v S_U);
     Python GEMMs dH_s[chunk] = dZ W and dW += dZ^T H_s (fp32 accumulation across chunks)
  7. Python: all_reduce SUM of dH_s over tp_group
Backward layout: no kernel and no collective; grad_output (a scalar) scales the stored dH_s and dW.
This is the recompute variant (6 logits-sized GEMMs, JSD 8; the entry clip adds 2); rows >= NV (vocab
padding) never enter. `api.fused_linear_divergence` uses it only with mode="recompute" or when `memory_budget`
cannot hold the store mode's chunk (kernels/divergence_store.py). Known limits (issue 14, not yet fixed here):
the one-pass per-token KL (E_p[b - a] - lse_b + lse_a) and the entropy-difference JSD cancel at small
divergences (a few % relative error at KL ~ 1e-5, V = 152k, fp32; store mode sums non-negative terms
instead); the statistics kernels parallelize over token blocks only. The clip-sums and gradient kernels
decide d_v <= c on their own recomputed tiles: on the GPU their autotuned tile shapes may differ, so an entry
within float rounding of c can land on either side in the two (the loss is continuous there; only that
entry's gradient term is affected).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import tp
from .triton_common import GRAD_CONFIGS, STATS_CONFIGS, autotuned, launch, logits_tile
from .types import FwdBwdOut, GradInForwardDivergence, divergence_opts, divergence_result, position_clip

KIND_IDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
CHUNK_TOKENS = 4096  # dZ chunk: 4096 x V_local in bf16; >= 2048 keeps the dW GEMM compute-bound


@triton.jit
def _div_stats_kernel(HS_ptr, HT_ptr, W_ptr, WT_ptr, STATS_ptr, T, NV, H, stride_x, stride_w, inv_tau,
                      KIND: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                      UPCAST_DOT: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    m_a = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    m_b = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    s_a = tl.zeros((BLOCK_T,), tl.float32)
    s_b = tl.zeros((BLOCK_T,), tl.float32)
    u = tl.zeros((BLOCK_T,), tl.float32)
    for v0 in range(0, NV, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        valid = offs_v[None, :] < NV
        a = logits_tile(HS_ptr, W_ptr, offs_t, offs_v, T, NV, H, stride_x, stride_w, inv_tau,
                        BLOCK_T, BLOCK_V, BLOCK_H, UPCAST_DOT)
        b = logits_tile(HT_ptr, WT_ptr, offs_t, offs_v, T, NV, H, stride_x, stride_w, inv_tau,
                        BLOCK_T, BLOCK_V, BLOCK_H, UPCAST_DOT)
        a = tl.where(valid, a, float("-inf"))
        b = tl.where(valid, b, float("-inf"))
        m_a_new = tl.maximum(m_a, tl.max(a, 1))
        m_b_new = tl.maximum(m_b, tl.max(b, 1))
        alpha_a = tl.exp(m_a - m_a_new)
        alpha_b = tl.exp(m_b - m_b_new)
        e_a = tl.exp(a - m_a_new[:, None])
        e_b = tl.exp(b - m_b_new[:, None])
        s_a = s_a * alpha_a + tl.sum(e_a, 1)
        s_b = s_b * alpha_b + tl.sum(e_b, 1)
        if KIND == 0:
            u = u * alpha_b + tl.sum(tl.where(valid, e_b * (b - a), 0.0), 1)
        elif KIND == 1:
            u = u * alpha_a + tl.sum(tl.where(valid, e_a * (a - b), 0.0), 1)
        m_a = m_a_new
        m_b = m_b_new
    if KIND == 0:
        e = u / s_b
    else:
        e = u / s_a
    row = offs_t < T
    tl.store(STATS_ptr + offs_t * 3, m_a + tl.log(s_a), mask=row)
    tl.store(STATS_ptr + offs_t * 3 + 1, m_b + tl.log(s_b), mask=row)
    tl.store(STATS_ptr + offs_t * 3 + 2, e, mask=row)


@triton.jit
def _log_mix(logp, logq, log_beta, log_1mbeta):
    """log(beta p + (1 - beta) q) from log p, log q, stably."""
    x = logp + log_beta
    y = logq + log_1mbeta
    mx = tl.maximum(x, y)
    return mx + tl.log(tl.exp(x - mx) + tl.exp(y - mx))


@triton.jit
def _jsd_sums_kernel(HS_ptr, HT_ptr, W_ptr, WT_ptr, TOK_ptr, SUMS_ptr, T, NV, H, stride_x, stride_w, inv_tau,
                     log_beta, log_1mbeta,
                     BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                      UPCAST_DOT: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row = offs_t < T
    lse_a = tl.load(TOK_ptr + offs_t * 4, mask=row, other=0.0)
    lse_b = tl.load(TOK_ptr + offs_t * 4 + 1, mask=row, other=0.0)
    spp = tl.zeros((BLOCK_T,), tl.float32)
    sqq = tl.zeros((BLOCK_T,), tl.float32)
    smm = tl.zeros((BLOCK_T,), tl.float32)
    sqm = tl.zeros((BLOCK_T,), tl.float32)
    for v0 in range(0, NV, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        valid = offs_v[None, :] < NV
        logq = logits_tile(HS_ptr, W_ptr, offs_t, offs_v, T, NV, H, stride_x, stride_w, inv_tau,
                           BLOCK_T, BLOCK_V, BLOCK_H, UPCAST_DOT) - lse_a[:, None]
        logp = logits_tile(HT_ptr, WT_ptr, offs_t, offs_v, T, NV, H, stride_x, stride_w, inv_tau,
                           BLOCK_T, BLOCK_V, BLOCK_H, UPCAST_DOT) - lse_b[:, None]
        logm = _log_mix(logp, logq, log_beta, log_1mbeta)
        q = tl.exp(logq)
        spp += tl.sum(tl.where(valid, tl.exp(logp) * logp, 0.0), 1)
        sqq += tl.sum(tl.where(valid, q * logq, 0.0), 1)
        smm += tl.sum(tl.where(valid, tl.exp(logm) * logm, 0.0), 1)
        sqm += tl.sum(tl.where(valid, q * logm, 0.0), 1)
    tl.store(SUMS_ptr + offs_t * 4, spp, mask=row)
    tl.store(SUMS_ptr + offs_t * 4 + 1, sqq, mask=row)
    tl.store(SUMS_ptr + offs_t * 4 + 2, smm, mask=row)
    tl.store(SUMS_ptr + offs_t * 4 + 3, sqm, mask=row)


@triton.jit
def _entry_terms(logq, logp, q, beta, log_beta, log_1mbeta, KIND: tl.constexpr):
    """Per-entry (d_v, g_v = q_v dd_v/dq_v, the probability weighting the term) for the per-entry clip."""
    if KIND == 0:
        p = tl.exp(logp)
        d = p * (logp - logq)
        g = -p
        prob = p
    elif KIND == 1:
        lr = logq - logp
        d = q * lr
        g = q * (lr + 1.0)
        prob = q
    else:
        logm = _log_mix(logp, logq, log_beta, log_1mbeta)
        lqm = logq - logm
        g = (1.0 - beta) * q * lqm
        d = beta * tl.exp(logp) * (logp - logm) + g
        prob = tl.exp(logm)
    return d, g, prob


@triton.jit
def _clip_sums_kernel(HS_ptr, HT_ptr, W_ptr, WT_ptr, TOK_ptr, SUMS_ptr, T, NV, H, stride_x, stride_w, inv_tau,
                      clip, beta, log_beta, log_1mbeta,
                      KIND: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                      UPCAST_DOT: tl.constexpr):
    """Per token over this shard: (sum_v min(d_v, c), S_U = sum_{d_v <= c} g_v, #clipped, clipped mass)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row = offs_t < T
    lse_a = tl.load(TOK_ptr + offs_t * 4, mask=row, other=0.0)
    lse_b = tl.load(TOK_ptr + offs_t * 4 + 1, mask=row, other=0.0)
    closs = tl.zeros((BLOCK_T,), tl.float32)
    s_u = tl.zeros((BLOCK_T,), tl.float32)
    cnt = tl.zeros((BLOCK_T,), tl.float32)
    mass = tl.zeros((BLOCK_T,), tl.float32)
    for v0 in range(0, NV, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        valid = offs_v[None, :] < NV
        logq = logits_tile(HS_ptr, W_ptr, offs_t, offs_v, T, NV, H, stride_x, stride_w, inv_tau,
                           BLOCK_T, BLOCK_V, BLOCK_H, UPCAST_DOT) - lse_a[:, None]
        logp = logits_tile(HT_ptr, WT_ptr, offs_t, offs_v, T, NV, H, stride_x, stride_w, inv_tau,
                           BLOCK_T, BLOCK_V, BLOCK_H, UPCAST_DOT) - lse_b[:, None]
        if KIND == 2:
            # JSD, ordered so that fewer [BLOCK_T, BLOCK_V] values are live (spills 200-280 B at 128 x 128
            # tiles, 744 B through _entry_terms): log M from x - y, x = log p + log beta, y = log q + log(1-beta)
            diff = (logp - logq) + (log_beta - log_1mbeta)
            logm = tl.where(diff > 0, logp + log_beta, logq + log_1mbeta) + tl.log(1.0 + tl.exp(-tl.abs(diff)))
            d = beta * tl.exp(logp) * (logp - logm)
            g = (1.0 - beta) * tl.exp(logq) * (logq - logm)
            d = d + g
            closs += tl.sum(tl.where(valid, tl.minimum(d, clip), 0.0), 1)
            s_u += tl.sum(tl.where(valid & (d <= clip), g, 0.0), 1)
            cut = valid & (d > clip)
            cnt += tl.sum(tl.where(cut, 1.0, 0.0), 1)
            mass += tl.sum(tl.where(cut, tl.exp(logm), 0.0), 1)
        else:
            d, g, prob = _entry_terms(logq, logp, tl.exp(logq), beta, log_beta, log_1mbeta, KIND)
            keep = d <= clip
            closs += tl.sum(tl.where(valid, tl.minimum(d, clip), 0.0), 1)
            s_u += tl.sum(tl.where(valid & keep, g, 0.0), 1)
            cnt += tl.sum(tl.where(valid & (d > clip), 1.0, 0.0), 1)
            mass += tl.sum(tl.where(valid & (d > clip), prob, 0.0), 1)
    tl.store(SUMS_ptr + offs_t * 4, closs, mask=row)
    tl.store(SUMS_ptr + offs_t * 4 + 1, s_u, mask=row)
    tl.store(SUMS_ptr + offs_t * 4 + 2, cnt, mask=row)
    tl.store(SUMS_ptr + offs_t * 4 + 3, mass, mask=row)


@triton.jit
def _div_grad_kernel(HS_ptr, HT_ptr, W_ptr, WT_ptr, TOK_ptr, DZ_ptr, T, NV, H, stride_x, stride_w, stride_dz,
                     inv_tau, beta, log_beta, log_1mbeta, clip,
                     KIND: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                     UPCAST_DOT: tl.constexpr, CLIP_ENTRY: tl.constexpr):
    """dZ tile = coef_t * dLoss_t / da; TOK = per token (lse_a, lse_b, aux, coef), aux = KL(q||p) for reverse
    KL and KL(q||M) for JSD; with CLIP_ENTRY aux = S_U and dZ = coef (g_v [d_v <= clip] - q_v S_U)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row = offs_t < T
    lse_a = tl.load(TOK_ptr + offs_t * 4, mask=row, other=0.0)
    lse_b = tl.load(TOK_ptr + offs_t * 4 + 1, mask=row, other=0.0)
    aux = tl.load(TOK_ptr + offs_t * 4 + 2, mask=row, other=0.0)
    coef = tl.load(TOK_ptr + offs_t * 4 + 3, mask=row, other=0.0)
    logq = logits_tile(HS_ptr, W_ptr, offs_t, offs_v, T, NV, H, stride_x, stride_w, inv_tau,
                       BLOCK_T, BLOCK_V, BLOCK_H, UPCAST_DOT) - lse_a[:, None]
    logp = logits_tile(HT_ptr, WT_ptr, offs_t, offs_v, T, NV, H, stride_x, stride_w, inv_tau,
                       BLOCK_T, BLOCK_V, BLOCK_H, UPCAST_DOT) - lse_b[:, None]
    q = tl.exp(logq)
    if CLIP_ENTRY:
        d, gv, _prob = _entry_terms(logq, logp, q, beta, log_beta, log_1mbeta, KIND)
        g = tl.where(d <= clip, gv, 0.0) - q * aux[:, None]
    elif KIND == 0:
        g = q - tl.exp(logp)
    elif KIND == 1:
        g = q * (logq - logp - aux[:, None])
    else:
        g = (1.0 - beta) * q * (logq - _log_mix(logp, logq, log_beta, log_1mbeta) - aux[:, None])
    g = g * coef[:, None]
    mask = row[:, None] & (offs_v[None, :] < NV)
    # int64 row offsets: a dZ chunk of T_c x V_local elements may exceed 2^31
    tl.store(DZ_ptr + offs_t.to(tl.int64)[:, None] * stride_dz + offs_v[None, :], g.to(DZ_ptr.dtype.element_ty),
             mask=mask)


_stats_tuned = autotuned(_div_stats_kernel, STATS_CONFIGS, key=["NV", "H", "KIND"])
_sums_tuned = autotuned(_jsd_sums_kernel, STATS_CONFIGS, key=["NV", "H"])
_clip_tuned = autotuned(_clip_sums_kernel, STATS_CONFIGS, key=["NV", "H", "KIND"])
_grad_tuned = autotuned(_div_grad_kernel, GRAD_CONFIGS, key=["NV", "H", "KIND", "CLIP_ENTRY"])


def _divergence_fwd_bwd(hs, ht, w, tw, *, kind, beta, tau, clip, clip_mode, vocab_total, loss_weight, group, nv,
                        need_dh, need_dw, chunk_size) -> FwdBwdOut:
    num_t, hdim = hs.shape
    entry = clip is not None and clip_mode == "entry"
    inv_tau, kid = 1.0 / tau, KIND_IDS[kind]
    log_b = math.log(beta) if 0 < beta < 1 else 0.0
    log_1mb = math.log1p(-beta) if 0 < beta < 1 else 0.0
    hs, ht, w, tw = hs.contiguous(), ht.contiguous(), w.contiguous(), tw.contiguous()
    stats = torch.empty(num_t, 3, dtype=torch.float32, device=hs.device)
    if nv > 0:
        launch(_div_stats_kernel, _stats_tuned, lambda m: (triton.cdiv(num_t, m["BLOCK_T"]),),
               hs, ht, w, tw, stats, num_t, nv, hdim, hdim, hdim, inv_tau, KIND=kid)
    else:  # this rank holds only vocabulary padding
        stats.copy_(torch.tensor([float("-inf"), float("-inf"), 0.0]).expand(num_t, 3))
    lse_a, lse_b, div = tp.combine_kl(tp.gather_stats(stats, group), kind)
    tok = torch.stack([lse_a, lse_b, torch.zeros_like(lse_a), torch.zeros_like(lse_a)], 1).contiguous()
    if kind == "jsd":
        sums = torch.zeros(num_t, 4, dtype=torch.float32, device=hs.device)
        if nv > 0:
            launch(_jsd_sums_kernel, _sums_tuned, lambda m: (triton.cdiv(num_t, m["BLOCK_T"]),),
                   hs, ht, w, tw, tok, sums, num_t, nv, hdim, hdim, hdim, inv_tau, log_b, log_1mb)
        div, aux = tp.combine_jsd(tp.all_reduce_sum(sums, group), beta)
        tok[:, 2] = aux
    elif kind == "reverse_kl":
        tok[:, 2] = div
    coef = torch.full_like(div, inv_tau) if loss_weight is None else loss_weight.float() * inv_tau
    token_loss = clip_stats = None
    if entry:
        csums = torch.zeros(num_t, 4, dtype=torch.float32, device=hs.device)
        if nv > 0:
            launch(_clip_sums_kernel, _clip_tuned, lambda m: (triton.cdiv(num_t, m["BLOCK_T"]),),
                   hs, ht, w, tw, tok, csums, num_t, nv, hdim, hdim, hdim, inv_tau, clip, beta, log_b, log_1mb,
                   KIND=kid)
        tot = tp.gather_stats(csums, group).sum(0)  # fixed rank order: bitwise equal on every rank
        token_loss, clip_stats = tot[:, 0].contiguous(), tot[:, 2:].contiguous()
        tok[:, 2] = tot[:, 1]
        tok[:, 3] = coef
    elif clip is not None:
        token_loss, clip_stats, keep = position_clip(div, clip, vocab_total)
        tok[:, 3] = coef * keep
    else:
        tok[:, 3] = coef
    dhs = torch.zeros(hs.shape, dtype=torch.float32, device=hs.device) if need_dh else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None
    if (need_dh or need_dw) and nv > 0:
        tc = chunk_size or CHUNK_TOKENS
        dz = torch.empty(min(tc, num_t), nv, dtype=hs.dtype, device=hs.device)
        for c0 in range(0, num_t, tc):
            c1 = min(num_t, c0 + tc)
            dzc = dz[:c1 - c0]
            launch(_div_grad_kernel, _grad_tuned,
                   lambda m: (triton.cdiv(c1 - c0, m["BLOCK_T"]), triton.cdiv(nv, m["BLOCK_V"])),
                   hs[c0:c1], ht[c0:c1], w, tw, tok[c0:c1], dzc, c1 - c0, nv, hdim, hdim, hdim, nv,
                   inv_tau, beta, log_b, log_1mb, 0.0 if clip is None else clip, KIND=kid, CLIP_ENTRY=entry)
            if dhs is not None:
                dhs[c0:c1] = (dzc @ w[:nv].to(dzc.dtype)).float()
            if dw is not None:
                dw[:nv] += (dzc.T @ hs[c0:c1]).float()
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
