"""Sampled-token reverse KL (methods.md §1.7): the cheaper COPSD alternative.

    loss, metrics = sampled_kl_loss(student_logprobs, teacher_logprobs, mask, num_global_tokens)

Per response token the advantage is `A_t = log p(y_t) - log q(y_t)` (teacher minus student, detached)
and the loss `-A_t log q(y_t)`; since y ~ q, the expected gradient is the gradient of KL(q || p) per
position (the score-function estimator with the per-token log-ratio as reward, no future terms). Only
the sampled token's log-prob from each side is needed (`copsd_kernels.fused_linear_logprobs`).
Differences from the paper: one global token mean; optional truncated importance weight (detached)
against the rollout engine's log-probs when the caller passes `is_weight`.
Pure torch: no Megatron imports, no config reads.
"""
from __future__ import annotations

from typing import Optional

import torch


def sampled_kl_loss(
    student_logprobs: torch.Tensor,  # [T] log q(y_t), differentiable
    teacher_logprobs: torch.Tensor,  # [T] log p(y_t)
    mask: torch.Tensor,  # [T]
    num_global_tokens: float,
    *,
    is_weight: Optional[torch.Tensor] = None,  # [T] detached importance weight
) -> tuple[torch.Tensor, dict]:
    if num_global_tokens <= 0:
        raise ValueError(f"num_global_tokens must be > 0, got {num_global_tokens}")
    mask = mask.float()
    adv = (teacher_logprobs.detach() - student_logprobs.detach()).float()  # [T]
    w = mask if is_weight is None else mask * is_weight.detach().float()
    loss = -(adv * student_logprobs.float() * w).sum() / float(num_global_tokens)
    # -A_t = log q - log p is the single-sample estimate of KL(q||p) at position t.
    metrics = {"tokens": mask.sum(), "divergence_sum": (-adv * mask).sum()}
    return loss, metrics
