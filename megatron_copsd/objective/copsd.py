"""COPSD loss: one global token mean of the full-vocabulary divergence on response positions.

    loss, metrics = copsd_loss(student_hidden, teacher_hidden, weight, mask, num_global_tokens, ...)

methods.md §1: for every response token the student's next-token distribution q (student prompt +
response) is pulled towards the teacher's p (privileged teacher prompt + the same response). Where we
differ from the reference code: (1) the loss is divided by the number of valid response tokens of the
whole global batch (`num_global_tokens`, summed over micro-batches and data-parallel ranks by the
caller), not averaged per micro-batch; (2) the divergence is exact over the full vocabulary with no
[tokens x vocab] logits (fused kernel), in fp32; (3) the fixed teacher is a frozen full copy rather
than the base model with LoRA disabled.

Metrics are *sums* over this call's tokens (keys ending in `_sum` or counting tokens; the clip statistics
of `divergence.clip_metrics`), so callers can add them over micro-batches and ranks before dividing;
plus `per_token_divergence` ([T], detached, unclipped) for diagnostics.
Pure torch: no Megatron imports, no config reads.
"""
from __future__ import annotations

from typing import Optional

import torch

from .divergence import _tp_size, clip_metrics, token_divergence


def copsd_loss(
    student_hidden: torch.Tensor,  # [T, H] response positions of the student sequences
    teacher_hidden: torch.Tensor,  # [T, H] the same response positions under the teacher prompt
    weight: torch.Tensor,  # [V_local, H] student LM-head shard
    mask: torch.Tensor,  # [T] 1.0 for tokens that count
    num_global_tokens: float,
    *,
    teacher_weight: Optional[torch.Tensor] = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    token_clip: Optional[float] = None,
    teacher_top_k: Optional[int] = None,
    tp_group=None,
    vocab_start: int = 0,
    valid_vocab: Optional[int] = None,
    token_clip_mode: str = "entry",
) -> tuple[torch.Tensor, dict]:
    """token_clip with token_clip_mode "entry" (default; the reference's clip) clamps every (position,
    vocabulary entry) term before the vocabulary sum; "position" clamps each position's divergence."""
    if num_global_tokens <= 0:
        raise ValueError(f"num_global_tokens must be > 0, got {num_global_tokens}")
    mask = mask.float()
    res = token_divergence(
        student_hidden, teacher_hidden, weight, teacher_weight=teacher_weight, divergence=divergence, beta=beta,
        temperature=temperature, token_clip=token_clip, loss_weight=mask / float(num_global_tokens),
        teacher_top_k=teacher_top_k, tp_group=tp_group, vocab_start=vocab_start, valid_vocab=valid_vocab,
        clip_mode=token_clip_mode,
    )
    div = res.per_token.detach()
    vocab = valid_vocab or weight.shape[0] * _tp_size(tp_group)
    metrics = {
        "tokens": mask.sum(),
        "divergence_sum": (div * mask).sum(),
        **clip_metrics(res, mask, vocab if teacher_top_k is None else min(teacher_top_k, vocab)),
        "per_token_divergence": div,
    }
    return res.loss, metrics
