"""Full-vocabulary divergences between the student and teacher next-token distributions.

    result = token_divergence(student_hidden, teacher_hidden, weight, divergence="forward_kl", ...)

`teacher_top_k=None` (default): the exact divergence over the whole vocabulary through the fused kernel
`copsd_kernels.fused_linear_divergence` -- the LM head is applied inside the kernel, chunk by chunk, so
no [tokens x vocab] logits exist. `teacher_top_k=k`: the cheaper baseline of methods.md §1: both
distributions are restricted to the teacher's k most likely tokens and renormalised there, computed in
chunked torch (one [chunk x V_local] block at a time, recomputed in backward). Where we differ from
the ROSD reference code: its top-k variant ranks by the *student* and adds a tail bin; ours ranks by the
teacher and renormalises (no tail bin), as methods.md §1 describes for COPSD.

`token_clip` with `clip_mode="entry"` (default, the COPSD reference's clip) clamps every (position,
vocabulary entry) term of the divergence before the vocabulary sum (on the top-k support for the top-k
variant); `clip_mode="position"` clamps each position's divergence (a clipped position gives no gradient).

Convention for p / q: p = teacher, q = student, both `softmax(logits / temperature)`; forward KL is
KL(p || q), reverse KL is KL(q || p), JSD_beta = beta KL(p||M) + (1-beta) KL(q||M), M = beta p + (1-beta) q.
Pure torch: no Megatron imports, no config reads.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.utils.checkpoint

TOPK_CHUNK_ELEMENTS = 1 << 21


def token_divergence(
    student_hidden: torch.Tensor,  # [T, H]
    teacher_hidden: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [V_local, H]
    *,
    teacher_weight: Optional[torch.Tensor] = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    token_clip: Optional[float] = None,
    loss_weight: Optional[torch.Tensor] = None,  # [T]
    teacher_top_k: Optional[int] = None,
    tp_group=None,
    vocab_start: int = 0,
    valid_vocab: Optional[int] = None,
    clip_mode: str = "entry",
):
    """Returns `copsd_kernels.DivergenceResult(loss, per_token, clipped_count, clipped_mass)`:
    loss = sum_t loss_weight[t] * clipped div_t (see clip_mode), per_token = unclipped div_t (detached)."""
    if teacher_top_k is None:
        import copsd_kernels

        return copsd_kernels.fused_linear_divergence(
            student_hidden, teacher_hidden, weight, teacher_weight=teacher_weight, divergence=divergence,
            beta=beta, temperature=temperature, token_clip=token_clip, loss_weight=loss_weight,
            tp_group=tp_group, vocab_start=vocab_start, valid_vocab=valid_vocab, clip_mode=clip_mode,
        )
    return topk_divergence(
        student_hidden, teacher_hidden, weight, teacher_weight=teacher_weight, k=teacher_top_k,
        divergence=divergence, beta=beta, temperature=temperature, token_clip=token_clip,
        loss_weight=loss_weight, tp_group=tp_group, vocab_start=vocab_start, valid_vocab=valid_vocab,
        clip_mode=clip_mode,
    )


def _tp_size(tp_group) -> int:
    return 1 if tp_group is None else torch.distributed.get_world_size(tp_group)


def clip_metrics(res, mask, support: int) -> dict:
    """Clip statistics as sums over masked-in tokens (callers add them over micro-batches and ranks):
    clipped_tokens (positions with at least one clipped entry; position mode: clipped positions),
    clipped_entry_frac_sum (share of the `support` entries clipped, summed over tokens) and
    clipped_mass_sum (probability mass of the clipped entries, summed over tokens)."""
    zero = mask.new_zeros(())
    if res.clipped_count is None:
        return {"clipped_tokens": zero, "clipped_entry_frac_sum": zero, "clipped_mass_sum": zero}
    count = res.clipped_count.float()
    return {"clipped_tokens": ((count > 0).float() * mask).sum(),
            "clipped_entry_frac_sum": (count * mask).sum() / float(max(1, support)),
            "clipped_mass_sum": (res.clipped_mass.float() * mask).sum()}


def _full_logits(hidden, weight, tau, tp_group, vocab_start, valid_vocab):
    """[T_c, V_valid] logits / tau over the whole (unpadded) vocabulary for one chunk of tokens."""
    z = (hidden.float() @ weight.float().T) / tau  # [T_c, V_local]
    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        import torch.distributed.nn.functional as dist_fn

        z = torch.cat(dist_fn.all_gather(z, group=tp_group), dim=1)  # differentiable gather
    if valid_vocab is not None:
        z = z[:, :valid_vocab]
    return z


def divergence_terms(logp, logq, divergence, beta):
    """Per-entry terms [T, K] of the divergence between distributions given as log-probs on the same support
    (their row sums are the divergence), and the probability weighting each term (p for forward KL, q for
    reverse KL, M for JSD). 0 log 0 = 0 (empty support entries, e.g. an empty tail bin)."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"

    def plogr(logx, logy):  # x log(x / y), 0 where x = 0
        x = logx.exp()
        return x * torch.where(x > 0, logx - logy, torch.zeros_like(logx)), x

    if divergence == "forward_kl":
        return plogr(logp, logq)
    if divergence == "reverse_kl":
        return plogr(logq, logp)
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    return beta * plogr(logp, logm)[0] + (1 - beta) * plogr(logq, logm)[0], logm.exp()


def clip_terms(terms, prob, token_clip, clip_mode):
    """(clipped per-row loss [T], per-row divergence [T] (detached), clipped_count [T], clipped_mass [T]) from
    the per-entry terms; count / mass are None without a clip. Position mode: a clipped row keeps its value
    but gives no gradient, and counts all K entries with mass 1."""
    div = terms.sum(-1)
    if token_clip is None:
        return div, div.detach(), None, None
    if clip_mode == "entry":
        hit = terms.detach() > token_clip
        return (terms.clamp(max=token_clip).sum(-1), div.detach(), hit.sum(-1).float(),
                (prob.detach() * hit).sum(-1).float())
    if clip_mode != "position":
        raise ValueError(f"clip_mode must be entry or position, got {clip_mode!r}")
    hit = (div.detach() > token_clip).float()
    clipped = torch.where(div <= token_clip, div, div.detach().clamp(max=token_clip))
    return clipped, div.detach(), hit * terms.shape[-1], hit


def _topk_chunk(hs, ht, w, tw, k, divergence, beta, tau, tp_group, vocab_start, valid_vocab, token_clip, clip_mode):
    zs = _full_logits(hs, w, tau, tp_group, vocab_start, valid_vocab)  # [T_c, V]
    with torch.no_grad():
        zt = _full_logits(ht, tw, tau, tp_group, vocab_start, valid_vocab)
        top = zt.topk(min(k, zt.shape[1]), dim=1)
        logp = torch.log_softmax(top.values, dim=1)  # teacher renormalised on its top-k
    logq = torch.log_softmax(zs.gather(1, top.indices), dim=1)  # student renormalised on the same set
    clipped, div, count, mass = clip_terms(*divergence_terms(logp, logq, divergence, beta), token_clip, clip_mode)
    if count is None:
        return clipped, div
    return clipped, div, count, mass


def topk_divergence(student_hidden, teacher_hidden, weight, *, teacher_weight=None, k, divergence="forward_kl",
                    beta=0.5, temperature=1.0, token_clip=None, loss_weight=None, tp_group=None, vocab_start=0,
                    valid_vocab=None, clip_mode="entry"):
    """Teacher top-k renormalised divergence in chunked torch (gradient-checkpointed per chunk); the clip
    applies to the k renormalised entries (clipped_count counts among them)."""
    from copsd_kernels.types import DivergenceResult

    if k < 1:
        raise ValueError(f"teacher_top_k must be >= 1, got {k}")
    tw = (weight if teacher_weight is None else teacher_weight).detach()
    ht = teacher_hidden.detach()
    num_t = student_hidden.shape[0]
    vocab = valid_vocab or weight.shape[0]
    chunk = max(1, TOPK_CHUNK_ELEMENTS // max(1, vocab))
    if clip_mode not in ("entry", "position"):
        raise ValueError(f"clip_mode must be entry or position, got {clip_mode!r}")
    parts = []
    for c0 in range(0, num_t, chunk):
        c1 = min(num_t, c0 + chunk)
        args = (student_hidden[c0:c1], ht[c0:c1], weight, tw, k, divergence, beta, temperature, tp_group,
                vocab_start, valid_vocab, token_clip, clip_mode)
        if torch.is_grad_enabled() and (student_hidden.requires_grad or weight.requires_grad):
            parts.append(torch.utils.checkpoint.checkpoint(_topk_chunk, *args, use_reentrant=False))
        else:
            parts.append(_topk_chunk(*args))
    if not parts:
        empty = student_hidden.new_zeros(0, dtype=torch.float32)
        return DivergenceResult(empty.sum(), empty)
    cols = [torch.cat(c) for c in zip(*parts)]
    clipped, div = cols[0], cols[1]
    lw = torch.ones_like(div) if loss_weight is None else loss_weight.float()
    return DivergenceResult((lw * clipped).sum(), div.detach(), *cols[2:])
