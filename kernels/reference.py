"""Naive, fully materializing references for the fused kernels (tests and benchmarks only).

Everything is computed on full [T, V] logits in `compute_dtype` (float64 by default) with plain torch
autograd, so these functions define what the fused kernels must return. With `tp_group` the weight shards
are all-gathered (rank order = vocab order), every rank computes the full problem, and the weight gradient
flowing back to the local shard is that rank's slice of the full gradient; the student-hidden gradient is
the full one. `token_clip` with clip_mode="entry" (default) materializes the [T, V] divergence integrand
d_tv, clamps every entry at the clip and sums over the vocabulary (the COPSD reference's clip, through
autograd); clip_mode="position" clamps the per-position sum (the earlier behaviour). Also holds
`reference_code_jsd_loss`, our re-implementation (from the formula in docs/methods.md) of the loss the
COPSD reference code uses: generalized JSD on materialized logits with temperature and per-entry clip,
top-k off, masked token mean -- a benchmark baseline.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from .types import (DivergenceResult, LogprobResult, check_divergence_inputs, check_logprob_inputs,
                    resolve_divergence)


class _GatherShards(torch.autograd.Function):
    """All-gathers equal vocab shards along dim 0; backward returns this rank's slice (every rank computes
    the same full loss, so no reduction is needed)."""

    @staticmethod
    def forward(ctx, shard, group):
        world = dist.get_world_size(group)
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard.contiguous(), group=group)
        ctx.rank, ctx.rows = dist.get_rank(group), shard.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def _full_weight(weight, vocab_start, tp_group):
    """Returns (full weight, start of the full weight in global ids) -- gathered when tp_group is given."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return weight, vocab_start
    rank = dist.get_rank(tp_group)
    if vocab_start != rank * weight.shape[0]:
        raise ValueError(f"reference TP needs contiguous equal shards: vocab_start={vocab_start} but "
                         f"rank {rank} x V_local {weight.shape[0]} = {rank * weight.shape[0]}")
    return _GatherShards.apply(weight, tp_group), 0


def _valid_cols(num_cols, start, valid_vocab):
    return num_cols if valid_vocab is None else max(0, min(num_cols, valid_vocab - start))


def divergence_integrand(student_logits, teacher_logits, divergence, beta):
    """([T, V] per-entry terms d_tv whose vocabulary sum is the divergence, [T, V] the probability that
    weights each term: p for forward KL, q for reverse KL, M for JSD), from logits already divided by tau."""
    kind = resolve_divergence(divergence, beta)
    logq = torch.log_softmax(student_logits, -1)
    logp = torch.log_softmax(teacher_logits, -1)
    if kind == "forward_kl":
        p = logp.exp()
        return p * (logp - logq), p
    if kind == "reverse_kl":
        q = logq.exp()
        return q * (logq - logp), q
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    return beta * logp.exp() * (logp - logm) + (1 - beta) * logq.exp() * (logq - logm), logm.exp()


def divergence_from_logits(student_logits, teacher_logits, divergence, beta):
    """Per-token divergence from [T, V] student/teacher logits (already divided by the temperature)."""
    return divergence_integrand(student_logits, teacher_logits, divergence, beta)[0].sum(-1)


def fused_linear_divergence(student_hidden, teacher_hidden, weight, *, teacher_weight=None,
                            divergence="forward_kl", beta=0.5, temperature=1.0, token_clip=None,
                            loss_weight=None, tp_group=None, vocab_start=0, valid_vocab=None, impl="reference",
                            clip_mode="entry", compute_dtype=torch.float64) -> DivergenceResult:
    """Naive reference of `copsd_kernels.fused_linear_divergence` (same signature; `impl` is ignored)."""
    check_divergence_inputs(student_hidden, teacher_hidden, weight, teacher_weight, temperature, token_clip,
                            loss_weight, clip_mode)
    w_full, start = _full_weight(weight, vocab_start, tp_group)
    tw = weight.detach() if teacher_weight is None else teacher_weight.detach()
    tw_full, _ = _full_weight(tw, vocab_start, tp_group)
    nv = _valid_cols(w_full.shape[0], start, valid_vocab)
    if nv <= 0:
        raise ValueError(f"no valid vocabulary rows: valid_vocab={valid_vocab}, vocab_start={vocab_start}")
    a = student_hidden.to(compute_dtype) @ w_full[:nv].to(compute_dtype).T / temperature  # [T, V]
    with torch.no_grad():
        b = teacher_hidden.detach().to(compute_dtype) @ tw_full[:nv].to(compute_dtype).T / temperature
    d, weight_prob = divergence_integrand(a, b, divergence, beta)  # [T, V]
    per_token = d.sum(-1)
    count = mass = None
    if token_clip is None:
        clipped = per_token
    elif clip_mode == "entry":
        clipped = torch.clamp(d, max=token_clip).sum(-1)
        with torch.no_grad():
            hit = d > token_clip
            count, mass = hit.sum(-1).float(), (weight_prob * hit).sum(-1).float()
    else:
        clipped = torch.clamp(per_token, max=token_clip)
        hit = (per_token.detach() > token_clip).float()
        count, mass = hit * nv, hit
    w = torch.ones_like(clipped) if loss_weight is None else loss_weight.to(compute_dtype)
    return DivergenceResult((w * clipped).sum(), per_token.detach(), count, mass)


def fused_linear_logprobs(hidden, weight, target_ids, *, temperature=1.0, tp_group=None, vocab_start=0,
                          valid_vocab=None, return_entropy=False, impl="reference",
                          compute_dtype=torch.float64) -> LogprobResult:
    """Naive reference of `copsd_kernels.fused_linear_logprobs` (same signature; `impl` is ignored)."""
    check_logprob_inputs(hidden, weight, target_ids, temperature)
    w_full, start = _full_weight(weight, vocab_start, tp_group)
    nv = _valid_cols(w_full.shape[0], start, valid_vocab)
    logits = hidden.to(compute_dtype) @ w_full[:nv].to(compute_dtype).T / temperature
    logq = torch.log_softmax(logits, -1)
    lp = logq.gather(1, (target_ids.long() - start)[:, None])[:, 0]
    ent = -(logq.exp() * logq).sum(-1) if return_entropy else None
    return LogprobResult(lp, ent)


def reference_code_jsd_loss(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, token_clip=None,
                            mask=None):
    """The COPSD reference code's distillation loss, re-implemented from docs/methods.md: generalized JSD
    (beta=0 forward KL, beta=1 reverse KL) on materialized [T, V] logits in their own dtype, temperature
    applied to both sides, top-k off, per-entry clip from above (before the vocabulary sum), mean over
    unmasked tokens."""
    s = torch.log_softmax(student_logits.float() / temperature, -1)
    t = torch.log_softmax(teacher_logits.float() / temperature, -1)
    if beta == 0:
        terms = t.exp() * (t - s)
    elif beta == 1:
        terms = s.exp() * (s - t)
    else:
        mix = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), 0)
        terms = beta * (t.exp() * (t - mix)) + (1 - beta) * (s.exp() * (s - mix))
    if token_clip is not None:
        terms = torch.clamp(terms, max=token_clip)
    per_token = terms.sum(-1)
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)
