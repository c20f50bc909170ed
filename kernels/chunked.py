"""Pure-torch token-chunked fused linear divergence / log-probs: the CPU path and the GPU fallback.

Same algorithm as the Triton kernels, with torch ops on one chunk of tokens at a time (the whole local
vocabulary shard per chunk, so a chunk's [T_c, V_local] fp32 logits are the largest buffers; T_c is chosen
so that one such buffer holds about `CHUNK_ELEMENTS` numbers):

Divergence, forward (gradients are computed here; backward only scales them by grad_output):
  per chunk: a = h_s W^T / tau, b = h_t W_t^T / tau            (2 GEMMs, fp32)
             local (logsumexp a, logsumexp b, E)               (E = E_p[b-a] or E_q[a-b] on the shard)
             all_gather [TP, T_c, 3] -> fixed-order combine    (collective 1)
             JSD only: local (sum p log p, q log q, M log M, q log M) -> all_reduce SUM [T_c, 4] (collective 2)
             dZ = coef_t * dDiv/da  (coef = loss_weight * not_clipped / tau)
             dH_s[chunk] = dZ W,  dW += dZ^T H_s               (2 GEMMs, fp32 accumulation)
  end:       all_reduce SUM of dH_s over the TP group (the caller gets the full student gradient)
Log-probs, forward: a, local (logsumexp, target logit, E_q[a]) -> all_gather -> combine.
           backward: recompute a per chunk (the output is per token, so dW cannot be rescaled after the
           fact), dZ = (g_lp (onehot - q) - g_ent q (log q + H)) / tau, dH = dZ W, dW += dZ^T H,
           all_reduce SUM of dH.
Every rank must use the same number of chunks, so T_c depends on T and V_local only (pass equal shards).
"""
from __future__ import annotations

import math

import torch

from . import tp
from .types import DivergenceResult, LogprobResult, local_valid

CHUNK_ELEMENTS = 1 << 22  # 16 MB per fp32 [T_c, V_local] buffer; a handful of them are live at a time


def _chunk_len(num_tokens: int, num_local: int, chunk_size) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, min(num_tokens, CHUNK_ELEMENTS // max(1, num_local)))


def _divergence_fwd_bwd(hs, ht, w, tw, *, kind, beta, tau, clip, loss_weight, group, nv, need_dh, need_dw,
                        chunk_size):
    """Returns (per_token [T] fp32, dhs [T,H] fp32 | None, dw [V_local,H] fp32 | None); the gradients are of
    sum_t loss_weight_t * min(div_t, clip)."""
    num_t = hs.shape[0]
    wv, twv = w[:nv].float(), tw[:nv].float()  # [nv, H]; no copy when already fp32
    per_token = torch.empty(num_t, dtype=torch.float32, device=hs.device)
    dhs = torch.zeros(hs.shape, dtype=torch.float32, device=hs.device) if need_dh else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None
    tc = _chunk_len(num_t, w.shape[0], chunk_size)
    inv_tau = 1.0 / tau
    for c0 in range(0, num_t, tc):
        c1 = min(num_t, c0 + tc)
        hs_c = hs[c0:c1].float()
        a = (hs_c * inv_tau) @ wv.T  # [T_c, nv] student logits / tau
        b = (ht[c0:c1].float() * inv_tau) @ twv.T  # [T_c, nv] teacher logits / tau
        la, lb = torch.logsumexp(a, 1), torch.logsumexp(b, 1)
        if kind == "forward_kl":
            e = torch.sub(b, lb[:, None]).exp_().mul_(torch.sub(b, a)).sum(1)
        elif kind == "reverse_kl":
            e = torch.sub(a, la[:, None]).exp_().mul_(torch.sub(a, b)).sum(1)
        else:
            e = torch.zeros_like(la)
        lse_a, lse_b, div = tp.combine_kl(tp.gather_stats(torch.stack([la, lb, e], 1), group), kind)
        a.sub_(lse_a[:, None])  # log q (local slice of the global distribution)
        b.sub_(lse_b[:, None])  # log p
        if kind == "jsd":
            logm = torch.logaddexp(b + math.log(beta), a + math.log1p(-beta))
            q, p = a.exp(), b.exp()
            sums = torch.stack([(p * b).sum(1), (q * a).sum(1), (logm.exp() * logm).sum(1), (q * logm).sum(1)], 1)
            del p
            div, kl_qm = tp.combine_jsd(tp.all_reduce_sum(sums, group), beta)
        per_token[c0:c1] = div
        if dhs is None and dw is None:
            continue
        coef = torch.full_like(div, inv_tau) if loss_weight is None else loss_weight[c0:c1].float() * inv_tau
        if clip is not None:
            coef = coef * (div <= clip)  # clipped tokens contribute a constant: no gradient
        if kind == "forward_kl":
            dz = a.exp_().sub_(b.exp_())  # q - p
        elif kind == "reverse_kl":
            b.neg_().add_(a).sub_(div[:, None])  # log q - log p - KL(q||p)
            dz = b.mul_(a.exp_())
        else:
            dz = a.sub_(logm).sub_(kl_qm[:, None]).mul_(q).mul_(1 - beta)
        dz.mul_(coef[:, None])
        if dhs is not None:
            dhs[c0:c1] = dz @ wv
        if dw is not None:
            dw[:nv].addmm_(dz.T, hs_c)
    if dhs is not None:
        tp.all_reduce_sum(dhs, group)
    return per_token, dhs, dw


class _ChunkedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ht, w, tw, loss_weight, opts):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        per_token, dhs, dw = _divergence_fwd_bwd(hs, ht, w, tw, loss_weight=loss_weight, need_dh=need_dh,
                                                 need_dw=need_dw, **opts)
        clipped = per_token if opts["clip"] is None else per_token.clamp(max=opts["clip"])
        loss = clipped.sum() if loss_weight is None else (clipped * loss_weight.float()).sum()
        ctx.save_for_backward(dhs, dw)
        ctx.dtypes = (hs.dtype, w.dtype)
        ctx.mark_non_differentiable(per_token)
        return loss, per_token

    @staticmethod
    def backward(ctx, g_loss, _g_per_token):
        dhs, dw = ctx.saved_tensors
        ghs = None if dhs is None else (dhs * g_loss).to(ctx.dtypes[0])
        gw = None if dw is None else (dw * g_loss).to(ctx.dtypes[1])
        return ghs, None, gw, None, None, None


def fused_linear_divergence(student_hidden, teacher_hidden, weight, *, teacher_weight=None, kind, beta,
                            temperature, token_clip, loss_weight, tp_group, vocab_start, valid_vocab,
                            chunk_size=None) -> DivergenceResult:
    """Chunked implementation; `kind` is the resolved divergence (see types.resolve_divergence)."""
    tw = weight.detach() if teacher_weight is None else teacher_weight.detach()
    opts = dict(kind=kind, beta=float(beta), tau=float(temperature),
                clip=None if token_clip is None else float(token_clip), group=tp_group,
                nv=local_valid(weight.shape[0], vocab_start, valid_vocab), chunk_size=chunk_size)
    lw = None if loss_weight is None else loss_weight.detach()
    loss, per_token = _ChunkedDivergence.apply(student_hidden, teacher_hidden.detach(), weight, tw, lw, opts)
    return DivergenceResult(loss, per_token)


def _logprob_chunks(h, w, targets, *, tau, vocab_start, nv, group, chunk_size, fn):
    tc = _chunk_len(h.shape[0], w.shape[0], chunk_size)
    wv = w[:nv].float()
    for c0 in range(0, h.shape[0], tc):
        c1 = min(h.shape[0], c0 + tc)
        h_c = h[c0:c1].float()
        local = targets[c0:c1].long() - vocab_start
        owned = (local >= 0) & (local < nv)
        fn(c0, c1, h_c, (h_c * (1.0 / tau)) @ wv.T, local.clamp(0, max(nv - 1, 0)), owned, wv)


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, opts):
        num_t = h.shape[0]
        lse = torch.empty(num_t, dtype=torch.float32, device=h.device)
        lp, ent = torch.empty_like(lse), torch.empty_like(lse)

        def stats(c0, c1, h_c, a, local, owned, wv):
            la = torch.logsumexp(a, 1)
            ay = torch.where(owned, a.gather(1, local[:, None])[:, 0] if a.shape[1] else la, 0.0)
            ea = torch.sub(a, la[:, None]).exp_().mul_(a).sum(1)
            lse[c0:c1], lp[c0:c1], ent[c0:c1] = tp.combine_logprob(
                tp.gather_stats(torch.stack([la, ay, ea], 1), opts["group"]))

        _logprob_chunks(h, w, targets, fn=stats, **opts)
        ctx.save_for_backward(h, w, targets, lse, ent)
        ctx.opts = opts
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h, w, targets, lse, ent = ctx.saved_tensors
        opts = ctx.opts
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None
        inv_tau = 1.0 / opts["tau"]

        def grads(c0, c1, h_c, a, local, owned, wv):
            logq = a.sub_(lse[c0:c1, None])
            q = logq.exp()
            dz = torch.zeros_like(q)
            if g_lp is not None:
                glp = g_lp[c0:c1].float()
                dz.sub_(q * glp[:, None])
                rows = torch.arange(c1 - c0, device=h.device)[owned]
                dz[rows, local[owned]] += glp[owned]
            if g_ent is not None:
                dz.sub_(logq.add_(ent[c0:c1, None]).mul_(q).mul_(g_ent[c0:c1].float()[:, None]))
            dz.mul_(inv_tau)
            dh[c0:c1] = dz @ wv
            if dw is not None:
                dw[:wv.shape[0]].addmm_(dz.T, h_c)

        _logprob_chunks(h, w, targets, fn=grads, **opts)
        tp.all_reduce_sum(dh, opts["group"])  # every rank holds a partial sum over its vocab shard
        return (dh.to(h.dtype) if need_dh else None), (None if dw is None else dw.to(w.dtype)), None, None


def fused_linear_logprobs(hidden, weight, target_ids, *, temperature, tp_group, vocab_start, valid_vocab,
                          return_entropy, chunk_size=None) -> LogprobResult:
    opts = dict(tau=float(temperature), vocab_start=int(vocab_start), group=tp_group, chunk_size=chunk_size,
                nv=local_valid(weight.shape[0], vocab_start, valid_vocab))
    lp, ent = _ChunkedLogprobs.apply(hidden, weight, target_ids, opts)
    return LogprobResult(lp, ent if return_entropy else None)
