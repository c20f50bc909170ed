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
