"""Triton fused linear log-probs (and entropy) over a vocab-parallel LM head.

Forward layout (per rank):
  1. kernel `_lp_stats_kernel` [grid: token blocks]: a = h W^T / tau tile by tile (tl.dot), online
     (max, sum) with rescaling, U = sum e^(a - m) a, and the target logit when this rank owns the target
     -> stats [T, 3] = (lse_local, target logit or 0, U / S)
  2. Python: all_gather [TP, T, 3] over tp_group, fixed-order combine -> lse, log-prob, entropy
Backward layout (the outputs are per token, so dW cannot be precomputed and rescaled; recompute instead):
  3. per token chunk: kernel `_lp_grad_kernel` [grid: token blocks x vocab tiles] recomputes a and writes
     dZ = (g_lp (onehot(y) - q) - g_ent q (log q + H)) / tau in the input dtype; Python GEMMs
     dH[chunk] = dZ W and dW += dZ^T H (fp32 accumulation)
  4. Python: all_reduce SUM of dH over tp_group (the caller gets the full gradient)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tp
from .triton_common import GRAD_CONFIGS, STATS_CONFIGS, autotuned, launch, logits_tile
from .types import LogprobResult, local_valid

CHUNK_TOKENS = 4096


@triton.jit
def _lp_stats_kernel(H_ptr, W_ptr, TGT_ptr, STATS_ptr, T, NV, H, stride_x, stride_w, inv_tau,
                     BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                     UPCAST_DOT: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row = offs_t < T
    tgt = tl.load(TGT_ptr + offs_t, mask=row, other=-1)  # local target column, -1 if another rank owns it
    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_T,), tl.float32)
    u = tl.zeros((BLOCK_T,), tl.float32)
    ay = tl.zeros((BLOCK_T,), tl.float32)
    for v0 in range(0, NV, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        valid = offs_v[None, :] < NV
        a = logits_tile(H_ptr, W_ptr, offs_t, offs_v, T, NV, H, stride_x, stride_w, inv_tau,
                        BLOCK_T, BLOCK_V, BLOCK_H, UPCAST_DOT)
        ay += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], a, 0.0), 1)
        a = tl.where(valid, a, float("-inf"))
        m_new = tl.maximum(m, tl.max(a, 1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(a - m_new[:, None])
        s = s * alpha + tl.sum(e, 1)
        u = u * alpha + tl.sum(tl.where(valid, e * a, 0.0), 1)
        m = m_new
    tl.store(STATS_ptr + offs_t * 3, m + tl.log(s), mask=row)
    tl.store(STATS_ptr + offs_t * 3 + 1, ay, mask=row)
    tl.store(STATS_ptr + offs_t * 3 + 2, u / s, mask=row)


@triton.jit
def _lp_grad_kernel(H_ptr, W_ptr, TGT_ptr, TOK_ptr, DZ_ptr, T, NV, H, stride_x, stride_w, stride_dz, inv_tau,
                    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    UPCAST_DOT: tl.constexpr):
    """TOK = per token (lse, entropy, g_logprob, g_entropy)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row = offs_t < T
    tgt = tl.load(TGT_ptr + offs_t, mask=row, other=-1)
    lse = tl.load(TOK_ptr + offs_t * 4, mask=row, other=0.0)
    ent = tl.load(TOK_ptr + offs_t * 4 + 1, mask=row, other=0.0)
    g_lp = tl.load(TOK_ptr + offs_t * 4 + 2, mask=row, other=0.0)
    g_ent = tl.load(TOK_ptr + offs_t * 4 + 3, mask=row, other=0.0)
    logq = logits_tile(H_ptr, W_ptr, offs_t, offs_v, T, NV, H, stride_x, stride_w, inv_tau,
                       BLOCK_T, BLOCK_V, BLOCK_H, UPCAST_DOT) - lse[:, None]
    q = tl.exp(logq)
    onehot = tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
    g = (g_lp[:, None] * (onehot - q) - g_ent[:, None] * q * (logq + ent[:, None])) * inv_tau
    mask = row[:, None] & (offs_v[None, :] < NV)
    # int64 row offsets: a dZ chunk of T_c x V_local elements may exceed 2^31
    tl.store(DZ_ptr + offs_t.to(tl.int64)[:, None] * stride_dz + offs_v[None, :], g.to(DZ_ptr.dtype.element_ty),
             mask=mask)


_stats_tuned = autotuned(_lp_stats_kernel, STATS_CONFIGS, key=["NV", "H"])
_grad_tuned = autotuned(_lp_grad_kernel, GRAD_CONFIGS, key=["NV", "H"])


def _local_targets(target_ids, vocab_start, nv):
    local = target_ids.long() - vocab_start
    return torch.where((local >= 0) & (local < nv), local, -1).to(torch.int32).contiguous()


class _TritonLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, target_ids, opts):
        h, w = h.contiguous(), w.contiguous()
        num_t, hdim = h.shape
        nv = opts["nv"]
        tgt = _local_targets(target_ids, opts["vocab_start"], nv)
        stats = torch.empty(num_t, 3, dtype=torch.float32, device=h.device)
        if nv > 0:
            launch(_lp_stats_kernel, _stats_tuned, lambda m: (triton.cdiv(num_t, m["BLOCK_T"]),),
                   h, w, tgt, stats, num_t, nv, hdim, hdim, hdim, 1.0 / opts["tau"])
        else:
            stats.copy_(torch.tensor([float("-inf"), 0.0, 0.0]).expand(num_t, 3))
        lse, lp, ent = tp.combine_logprob(tp.gather_stats(stats, opts["group"]))
        ctx.save_for_backward(h, w, tgt, lse, ent)
        ctx.opts = opts
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h, w, tgt, lse, ent = ctx.saved_tensors
        opts, nv = ctx.opts, ctx.opts["nv"]
        num_t, hdim = h.shape
        zeros = torch.zeros_like(lse)
        tok = torch.stack([lse, ent, zeros if g_lp is None else g_lp.float(),
                           zeros if g_ent is None else g_ent.float()], 1).contiguous()
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
        if nv > 0:
            tc = opts["chunk_size"] or CHUNK_TOKENS
            dz = torch.empty(min(tc, num_t), nv, dtype=h.dtype, device=h.device)
            for c0 in range(0, num_t, tc):
                c1 = min(num_t, c0 + tc)
                dzc = dz[:c1 - c0]
                launch(_lp_grad_kernel, _grad_tuned,
                       lambda m: (triton.cdiv(c1 - c0, m["BLOCK_T"]), triton.cdiv(nv, m["BLOCK_V"])),
                       h[c0:c1], w, tgt[c0:c1], tok[c0:c1], dzc, c1 - c0, nv, hdim, hdim, hdim, nv,
                       1.0 / opts["tau"])
                dh[c0:c1] = (dzc @ w[:nv]).float()
                if dw is not None:
                    dw[:nv] += (dzc.T @ h[c0:c1]).float()
        tp.all_reduce_sum(dh, opts["group"])
        gh = dh.to(h.dtype) if ctx.needs_input_grad[0] else None
        return gh, (None if dw is None else dw.to(w.dtype)), None, None


def fused_linear_logprobs(hidden, weight, target_ids, *, temperature, tp_group, vocab_start, valid_vocab,
                          return_entropy, chunk_size=None) -> LogprobResult:
    opts = dict(tau=float(temperature), vocab_start=int(vocab_start), group=tp_group, chunk_size=chunk_size,
                nv=local_valid(weight.shape[0], vocab_start, valid_vocab))
    lp, ent = _TritonLogprobs.apply(hidden, weight, target_ids, opts)
    return LogprobResult(lp, ent if return_entropy else None)
