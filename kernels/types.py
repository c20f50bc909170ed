"""Result types and input validation shared by every implementation of the fused kernels."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


class DivergenceResult(NamedTuple):
    """`loss`: fp32 scalar `sum_t loss_weight[t] * min(div_t, token_clip)`, differentiable w.r.t. the student
    hidden states and the (student) weight shard. `per_token`: fp32 [T] unclipped, unweighted divergence
    (detached; identical on every tensor-parallel rank)."""

    loss: torch.Tensor
    per_token: torch.Tensor


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
                            loss_weight) -> None:
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
                    chunk_size) -> dict:
    """The keyword options every `_divergence_fwd_bwd` implementation takes."""
    return dict(kind=kind, beta=float(beta), tau=float(temperature),
                clip=None if token_clip is None else float(token_clip), group=tp_group,
                nv=local_valid(weight.shape[0], vocab_start, valid_vocab), chunk_size=chunk_size)


class GradInForwardDivergence(torch.autograd.Function):
    """The divergence is a terminal loss, so its gradients are computed during the forward by
    `fwd_bwd(hs, ht, w, tw, loss_weight=, need_dh=, need_dw=, **opts) -> (per_token, dhs, dw)` (the chunked
    or the Triton implementation) and backward only scales them by the incoming scalar."""

    @staticmethod
    def forward(ctx, hs, ht, w, tw, loss_weight, fwd_bwd, opts):
        per_token, dhs, dw = fwd_bwd(hs, ht, w, tw, loss_weight=loss_weight, need_dh=ctx.needs_input_grad[0],
                                     need_dw=ctx.needs_input_grad[2], **opts)
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
        return ghs, None, gw, None, None, None, None
