"""ROSD loss: the divergence to the reflective teacher on the localized response tokens, one global mean.

    loss, metrics = rosd_loss(student_hidden, teacher_hidden, weight, mask, num_global_tokens,
                              importance_weight=w, loss="full_vocab", divergence="jsd", beta=0.5)

methods.md §2 step 4: per response token t with mask 1 (failed rollouts: tokens [k, L) from the
localized error; correct rollouts: all), D_t = divergence(p_t || q_t) between the teacher (the ROSD
teacher prompt + the same response) and the student; loss = sum_t mask_t * w_t * D_t / N where N is the
number of masked-in tokens of the whole global batch (all micro-batches, all DP ranks -- the reference
code averaged per micro-batch) and w_t the optional detached importance weight
min(pi_train(y_t) / pi_rollout(y_t), cap) (the caller computes it; see rosd.topk_tail).

`loss="full_vocab"` (our default): the exact full-vocabulary divergence through the fused kernel, no
[T, V] logits. `loss="topk_tail"`: the paper's variant -- the student's top-k tokens plus one tail bin
holding the remaining mass (rosd.topk_tail), on logits materialized one chunk of tokens at a time and
recomputed in backward; the per-entry token clip (`token_clip_mode="entry"`, default) clamps each of the k + 1
bins' terms. No RL term (as in the paper). Pure torch: no Megatron, no config reads.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.utils.checkpoint
from copsd_kernels.types import DivergenceResult

from .divergence import _full_logits, _tp_size, clip_metrics, clip_terms, token_divergence

TOPK_TAIL_CHUNK_ELEMENTS = 1 << 21


def _topk_tail_chunk(hs, ht, w, tw, top_k, divergence, beta, tau, tp_group, vocab_start, valid_vocab, token_clip,
                     clip_mode):
    from megatron_copsd.rosd.topk_tail import topk_tail_terms

    zs = _full_logits(hs, w, 1.0, tp_group, vocab_start, valid_vocab)  # [T_c, V]
    with torch.no_grad():
        zt = _full_logits(ht, tw, 1.0, tp_group, vocab_start, valid_vocab)
    terms, prob = topk_tail_terms(zs, zt, top_k=top_k, divergence=divergence, beta=beta, temperature=tau)
    clipped, div, count, mass = clip_terms(terms, prob, token_clip, clip_mode)
    return (clipped, div) if count is None else (clipped, div, count, mass)


def topk_tail_token_divergence(student_hidden, teacher_hidden, weight, *, teacher_weight=None, top_k: int,
                               divergence: str, beta: float, temperature: float, tp_group=None,
                               vocab_start: int = 0, valid_vocab: Optional[int] = None, token_clip=None,
                               clip_mode: str = "entry", loss_weight=None) -> DivergenceResult:
    """Top-k + tail divergence chunked over tokens (gradient-checkpointed per chunk), returned like the fused
    kernel: DivergenceResult(sum_t loss_weight_t * clipped_t, per_token [T] unclipped, clipped_count,
    clipped_mass). token_clip clamps each of the k + 1 bins' terms (clip_mode="entry") or the per-token sum
    (clip_mode="position"; a clipped token keeps its value but gives no gradient)."""
    if clip_mode not in ("entry", "position"):
        raise ValueError(f"clip_mode must be entry or position, got {clip_mode!r}")
    tw = (weight if teacher_weight is None else teacher_weight).detach()
    ht = teacher_hidden.detach()
    vocab = valid_vocab or weight.shape[0]
    chunk = max(1, TOPK_TAIL_CHUNK_ELEMENTS // max(1, vocab))
    parts = []
    for c0 in range(0, student_hidden.shape[0], chunk):
        c1 = min(student_hidden.shape[0], c0 + chunk)
        args = (student_hidden[c0:c1], ht[c0:c1], weight, tw, top_k, divergence, beta, temperature, tp_group,
                vocab_start, valid_vocab, token_clip, clip_mode)
        if torch.is_grad_enabled() and (student_hidden.requires_grad or weight.requires_grad):
            parts.append(torch.utils.checkpoint.checkpoint(_topk_tail_chunk, *args, use_reentrant=False))
        else:
            parts.append(_topk_tail_chunk(*args))
    if not parts:
        empty = student_hidden.new_zeros(0, dtype=torch.float32)
        return DivergenceResult(empty.sum(), empty)
    cols = [torch.cat(c) for c in zip(*parts)]
    lw = torch.ones_like(cols[1]) if loss_weight is None else loss_weight.float()
    return DivergenceResult((lw * cols[0]).sum(), cols[1], *cols[2:])


def rosd_loss(
    student_hidden: torch.Tensor,  # [T, H] response positions under the student prompt
    teacher_hidden: torch.Tensor,  # [T, H] the same positions under the ROSD teacher prompt
    weight: torch.Tensor,  # [V_local, H] student LM-head shard
    mask: torch.Tensor,  # [T] 1.0 for distilled tokens
    num_global_tokens: float,
    *,
    importance_weight: Optional[torch.Tensor] = None,  # [T] detached, or None
    loss: str = "full_vocab",
    top_k: int = 100,
    teacher_weight: Optional[torch.Tensor] = None,
    divergence: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    token_clip: Optional[float] = None,
    tp_group=None,
    vocab_start: int = 0,
    valid_vocab: Optional[int] = None,
    token_clip_mode: str = "entry",
) -> tuple[torch.Tensor, dict]:
    """Returns (loss, metrics); metrics are sums over this call's masked-in tokens: tokens,
    divergence_sum (unweighted, unclipped), the clip statistics of `clip_metrics`, tis_weight_sum; plus
    per_token_divergence [T]. token_clip_mode: see copsd_kernels.fused_linear_divergence's clip_mode."""
    if num_global_tokens <= 0:
        raise ValueError(f"num_global_tokens must be > 0, got {num_global_tokens}")
    if loss not in ("full_vocab", "topk_tail"):
        raise ValueError(f"loss must be full_vocab or topk_tail, got {loss!r}")
    mask = mask.float()
    iw = torch.ones_like(mask) if importance_weight is None else importance_weight.detach().float()
    lw = mask * iw / float(num_global_tokens)
    if loss == "full_vocab":
        res = token_divergence(student_hidden, teacher_hidden, weight, teacher_weight=teacher_weight,
                               divergence=divergence, beta=beta, temperature=temperature, token_clip=token_clip,
                               loss_weight=lw, tp_group=tp_group, vocab_start=vocab_start, valid_vocab=valid_vocab,
                               clip_mode=token_clip_mode)
        support = valid_vocab or weight.shape[0] * _tp_size(tp_group)
    else:
        res = topk_tail_token_divergence(student_hidden, teacher_hidden, weight, teacher_weight=teacher_weight,
                                         top_k=top_k, divergence=divergence, beta=beta, temperature=temperature,
                                         tp_group=tp_group, vocab_start=vocab_start, valid_vocab=valid_vocab,
                                         token_clip=token_clip, clip_mode=token_clip_mode, loss_weight=lw)
        support = min(top_k, valid_vocab or weight.shape[0] * _tp_size(tp_group)) + 1
    div = res.per_token.detach()
    metrics = {
        "tokens": mask.sum(),
        "divergence_sum": (div * mask).sum(),
        **clip_metrics(res, mask, support),
        "tis_weight_sum": (iw * mask).sum(),
        "per_token_divergence": div,
    }
    return res.loss, metrics
