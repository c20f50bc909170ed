"""The paper's ROSD loss option: divergence over the student's top-k tokens plus one tail bin, and the
truncated importance weight against the rollout engine's log-probs. Pure torch, materialized logits.

    per_token = topk_tail_divergence(student_logits, teacher_logits, top_k=100, divergence="jsd", beta=0.5)
    w = truncated_importance_weight(train_logprobs, rollout_logprobs, cap=2.0)
    loss = (loss_weight * w * per_token).sum()       # loss_weight = mask / global token count

This materializes [T, V] logits, so it is the option, not the default: the default ROSD loss is the
exact full-vocabulary divergence of the fused kernel (`copsd_kernels.fused_linear_divergence`).

Bins: the k tokens with the highest STUDENT probability at each position (indices chosen without
gradient), plus one bin with all remaining mass, on both sides. With k >= V the tail is empty and the
result equals the full-vocabulary divergence. Divergence convention as in `copsd_kernels`: p = teacher,
q = student, "forward_kl" = KL(p||q), "reverse_kl" = KL(q||p), "jsd" = beta*KL(p||M) + (1-beta)*KL(q||M)
with M = beta*p + (1-beta)*q (beta = the paper's alpha; beta 0 / 1 fall back to forward / reverse KL).
The teacher side gets no gradient.
"""
from __future__ import annotations

import math

import torch


def _binned(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[T, k+1] log-probs: the k chosen tokens, then the log of the remaining mass."""
    top = logp.gather(-1, idx)
    rest = logp.scatter(-1, idx, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1, keepdim=True)  # exact (no 1 - sum cancellation); -inf if empty
    return torch.cat([top, tail], dim=-1)


def topk_tail_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, top_k: int = 100,
                         divergence: str = "jsd", beta: float = 0.5, temperature: float = 1.0,
                         valid_vocab: int | None = None) -> torch.Tensor:
    """Per-token divergence [T] over top-k + tail bins of `student_logits` / `teacher_logits` [T, V]."""
    return topk_tail_terms(student_logits, teacher_logits, top_k=top_k, divergence=divergence, beta=beta,
                           temperature=temperature, valid_vocab=valid_vocab)[0].sum(-1)


def topk_tail_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, top_k: int = 100,
                    divergence: str = "jsd", beta: float = 0.5, temperature: float = 1.0,
                    valid_vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin terms [T, k+1] of the top-k + tail divergence (their row sums are the divergence; the
    per-entry token clip clamps each of them) and the probability weighting each term (p, q or M)."""
    from megatron_copsd.objective.divergence import divergence_terms

    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"expected equal [T, V] logits, got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence not in ("forward_kl", "reverse_kl", "jsd"):
        raise ValueError(f"divergence must be forward_kl, reverse_kl or jsd, got {divergence!r}")
    if divergence == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if valid_vocab is not None:  # drop vocabulary padding rows
        student_logits, teacher_logits = student_logits[:, :valid_vocab], teacher_logits[:, :valid_vocab]
    logq = torch.log_softmax(student_logits.float() / temperature, -1)
    with torch.no_grad():
        logp_full = torch.log_softmax(teacher_logits.float() / temperature, -1)
        idx = logq.detach().topk(min(top_k, logq.shape[-1]), dim=-1).indices
        logp = _binned(logp_full, idx)
    logq = _binned(logq, idx)
    return divergence_terms(logp, logq, divergence, beta)


def truncated_importance_weight(train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, *,
                                cap: float = 2.0) -> torch.Tensor:
    """min(pi_train(y_t) / pi_rollout(y_t), cap), detached; both arguments are log-probs of the sampled
    tokens ([T]), trainer first. Corrects the rollout-engine / trainer numerical mismatch."""
    if train_logprobs.shape != rollout_logprobs.shape:
        raise ValueError(f"log-prob shapes differ: {tuple(train_logprobs.shape)} vs {tuple(rollout_logprobs.shape)}")
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    ratio = torch.exp((train_logprobs.detach().float() - rollout_logprobs.detach().float()).clamp(max=math.log(cap)))
    return ratio.clamp(max=cap)
