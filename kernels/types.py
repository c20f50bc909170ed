"""Result types and input validation shared by every implementation of the fused kernels."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
CLIP_MODES = ("entry", "position")


class DivergenceResult(NamedTuple):
    """`loss`: fp32 scalar `sum_t loss_weight[t] * clipped_t`, differentiable w.r.t. the student hidden states
    and the (student) weight shard, where with `token_clip` = c
      clip_mode="entry" (default, the COPSD reference's `token_clip`): clipped_t = sum_v min(d_tv, c), the
        clamp applied to every (position, vocabulary entry) term d_tv of the divergence before the vocabulary
        sum (forward KL d_v = p_v log(p_v/q_v), reverse KL q_v log(q_v/p_v), JSD
        beta p_v log(p_v/M_v) + (1-beta) q_v log(q_v/M_v)); negative terms are never clamped, and only the
        clamped entries stop contributing gradient;
      clip_mode="position": clipped_t = min(div_t, c), the per-position sum clamped (a clipped position gives
        no gradient at all; our behaviour before the reference's per-entry clip was adopted).
    `per_token`: fp32 [T] unclipped, unweighted divergence (detached; identical on every tensor-parallel rank).
    `clipped_count`: fp32 [T] number of vocabulary entries whose term exceeded c (position mode: every valid
    entry of a clipped position, 0 elsewhere). `clipped_mass`: fp32 [T] probability mass of those entries under
    the distribution that weights the term: the teacher p for forward KL, the student q for reverse KL, the
    mixture M for JSD (position mode: 1.0 for a clipped position). Both detached, None when token_clip is
    None."""

    loss: torch.Tensor
    per_token: torch.Tensor
    clipped_count: Optional[torch.Tensor] = None
    clipped_mass: Optional[torch.Tensor] = None


class LogprobResult(NamedTuple):
    """`logprobs`: fp32 [T] log-softmax(hidden @ W^T / tau) at the target ids; `entropy`: fp32 [T] or None.
    Both differentiable w.r.t. hidden and weight."""

    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor]


def resolve_divergence(divergence: str, beta: float) -> str:
    """Maps (divergence, beta) to the formula actually computed.

    methods.md convention: generalized JSD with beta=0 is forward KL(p||q), beta=1 is reverse KL(q||p)
    (the limits of JSD_beta itself are 0 there, so the endpoints are defined as the two KLs)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "jsd":
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1] for divergence='jsd', got {beta}")
        if beta == 0.0:
            return "forward_kl"
        if beta == 1.0:
            return "reverse_kl"
    return divergence


def local_valid(num_local: int, vocab_start: int, valid_vocab: Optional[int]) -> int:
    """Number of leading rows of a [V_local, H] shard that are real vocabulary (the rest is padding)."""
    if valid_vocab is None:
        return num_local
    return max(0, min(num_local, int(valid_vocab) - int(vocab_start)))


def check_divergence_inputs(student_hidden, teacher_hidden, weight, teacher_weight, temperature, token_clip,
                            loss_weight, clip_mode="entry") -> None:
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
    if student_hidden.dim() != 2:
        raise ValueError(f"student_hidden must be [T, H], got shape {tuple(student_hidden.shape)}")
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(f"teacher_hidden shape {tuple(teacher_hidden.shape)} != student_hidden shape "
                         f"{tuple(student_hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != student_hidden.shape[1]:
        raise ValueError(f"weight must be [V_local, H={student_hidden.shape[1]}], got {tuple(weight.shape)}")
    if teacher_weight is not None and teacher_weight.shape != weight.shape:
        raise ValueError(f"teacher_weight shape {tuple(teacher_weight.shape)} != weight shape {tuple(weight.shape)}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if token_clip is not None and not float(token_clip) > 0:
        raise ValueError(f"token_clip must be > 0 or None, got {token_clip}")
    if loss_weight is not None and tuple(loss_weight.shape) != (student_hidden.shape[0],):
        raise ValueError(f"loss_weight must be [T={student_hidden.shape[0]}], got {tuple(loss_weight.shape)}")


def check_logprob_inputs(hidden, weight, target_ids, temperature) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V_local, H={hidden.shape[1]}], got {tuple(weight.shape)}")
    if tuple(target_ids.shape) != (hidden.shape[0],):
        raise ValueError(f"target_ids must be [T={hidden.shape[0]}], got {tuple(target_ids.shape)}")
    if target_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"target_ids must be an integer tensor, got {target_ids.dtype}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def divergence_opts(weight, *, kind, beta, temperature, token_clip, tp_group, vocab_start, valid_vocab,
                    chunk_size, clip_mode="entry") -> dict:
    """The keyword options every `_divergence_fwd_bwd` implementation takes (`vocab_total`: the global number
    of valid vocabulary entries, for the position-mode clipped_count)."""
    tp_world = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
    vocab_total = weight.shape[0] * tp_world if valid_vocab is None else int(valid_vocab)
    return dict(vocab_total=vocab_total, kind=kind, beta=float(beta), tau=float(temperature),
                clip=None if token_clip is None else float(token_clip), clip_mode=clip_mode, group=tp_group,
                nv=local_valid(weight.shape[0], vocab_start, valid_vocab), chunk_size=chunk_size)


class FwdBwdOut(NamedTuple):
    """What a `_divergence_fwd_bwd` implementation returns (all fp32, detached). `token_loss` [T]: the clipped
    per-token value the loss sums (None: no clip, = per_token); `clip_stats` [T, 2] (clipped_count,
    clipped_mass) or None without a clip; dhs [T, H] / dw [V_local, H] gradients of
    sum_t loss_weight_t * token_loss_t, or None when not asked for."""

    per_token: torch.Tensor
    token_loss: Optional[torch.Tensor]
    clip_stats: Optional[torch.Tensor]
    dhs: Optional[torch.Tensor]
    dw: Optional[torch.Tensor]


def position_clip(per_token, clip, num_valid):
    """clip_mode="position": (token_loss = min(div, c), clip_stats, unclipped row mask)."""
    keep = per_token <= clip
    hit = (~keep).float()
    return per_token.clamp(max=clip), torch.stack([hit * float(num_valid), hit], 1), keep


class GradInForwardDivergence(torch.autograd.Function):
    """The divergence is a terminal loss, so its gradients are computed during the forward by
    `fwd_bwd(hs, ht, w, tw, loss_weight=, need_dh=, need_dw=, **opts) -> FwdBwdOut` (the chunked or the
    Triton implementation) and backward only scales them by the incoming scalar. Returns
    (loss, per_token, clip_stats [T, 2], zeros when there is no clip)."""

    @staticmethod
    def forward(ctx, hs, ht, w, tw, loss_weight, fwd_bwd, opts):
        out = fwd_bwd(hs, ht, w, tw, loss_weight=loss_weight, need_dh=ctx.needs_input_grad[0],
                      need_dw=ctx.needs_input_grad[2], **opts)
        clipped = out.per_token if out.token_loss is None else out.token_loss
        loss = clipped.sum() if loss_weight is None else (clipped * loss_weight.float()).sum()
        stats = out.clip_stats if out.clip_stats is not None else out.per_token.new_zeros(len(out.per_token), 2)
        ctx.save_for_backward(out.dhs, out.dw)
        ctx.dtypes = (hs.dtype, w.dtype)
        ctx.mark_non_differentiable(out.per_token, stats)
        return loss, out.per_token, stats

    @staticmethod
    def backward(ctx, g_loss, _g_per_token, _g_stats):
        dhs, dw = ctx.saved_tensors
        ghs = None if dhs is None else (dhs * g_loss).to(ctx.dtypes[0])
        gw = None if dw is None else (dw * g_loss).to(ctx.dtypes[1])
        return ghs, None, gw, None, None, None, None


def divergence_result(loss, per_token, stats, clip) -> DivergenceResult:
    if clip is None:
        return DivergenceResult(loss, per_token)
    return DivergenceResult(loss, per_token, stats[:, 0], stats[:, 1])
