"""Full-vocabulary divergences between the student and teacher next-token distributions.

    result = token_divergence(student_hidden, teacher_hidden, weight, divergence="forward_kl", ...)

`teacher_top_k=None` (default): the exact divergence over the whole vocabulary through the fused kernel
`copsd_kernels.fused_linear_divergence` -- the LM head is applied inside the kernel, chunk by chunk, so
no [tokens x vocab] logits exist. `teacher_top_k=k`: the cheaper baseline of methods.md §1: both
distributions are restricted to the teacher's k most likely tokens and renormalised there, computed in
chunked torch (one [chunk x V_local] block at a time, recomputed in backward). Where we differ from
the ROSD reference code: its top-k variant ranks by the *student* and adds a tail bin; ours ranks by the
teacher and renormalises (no tail bin), as methods.md §1 describes for COPSD.

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
):
    """Returns `copsd_kernels.DivergenceResult(loss, per_token)`:
    loss = sum_t loss_weight[t] * min(div_t, token_clip), per_token = unclipped div_t (detached)."""
    if teacher_top_k is None:
        import copsd_kernels

        return copsd_kernels.fused_linear_divergence(
            student_hidden, teacher_hidden, weight, teacher_weight=teacher_weight, divergence=divergence,
            beta=beta, temperature=temperature, token_clip=token_clip, loss_weight=loss_weight,
            tp_group=tp_group, vocab_start=vocab_start, valid_vocab=valid_vocab,
        )
    return topk_divergence(
        student_hidden, teacher_hidden, weight, teacher_weight=teacher_weight, k=teacher_top_k,
        divergence=divergence, beta=beta, temperature=temperature, token_clip=token_clip,
        loss_weight=loss_weight, tp_group=tp_group, vocab_start=vocab_start, valid_vocab=valid_vocab,
    )


def _full_logits(hidden, weight, tau, tp_group, vocab_start, valid_vocab):
    """[T_c, V_valid] logits / tau over the whole (unpadded) vocabulary for one chunk of tokens."""
    z = (hidden.float() @ weight.float().T) / tau  # [T_c, V_local]
    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        import torch.distributed.nn.functional as dist_fn

        z = torch.cat(dist_fn.all_gather(z, group=tp_group), dim=1)  # differentiable gather
    if valid_vocab is not None:
        z = z[:, :valid_vocab]
    return z


def _divergence_from_logprobs(logp, logq, divergence, beta):
    """Per-row divergence between distributions given as log-probs on the same support ([T, K])."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence == "forward_kl":
        return (logp.exp() * (logp - logq)).sum(-1)
    if divergence == "reverse_kl":
        return (logq.exp() * (logq - logp)).sum(-1)
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    kl_pm = (logp.exp() * (logp - logm)).sum(-1)
    kl_qm = (logq.exp() * (logq - logm)).sum(-1)
    return beta * kl_pm + (1 - beta) * kl_qm


def _topk_chunk(hs, ht, w, tw, k, divergence, beta, tau, tp_group, vocab_start, valid_vocab):
    zs = _full_logits(hs, w, tau, tp_group, vocab_start, valid_vocab)  # [T_c, V]
    with torch.no_grad():
        zt = _full_logits(ht, tw, tau, tp_group, vocab_start, valid_vocab)
        top = zt.topk(min(k, zt.shape[1]), dim=1)
        logp = torch.log_softmax(top.values, dim=1)  # teacher renormalised on its top-k
    logq = torch.log_softmax(zs.gather(1, top.indices), dim=1)  # student renormalised on the same set
    return _divergence_from_logprobs(logp, logq, divergence, beta)


def topk_divergence(student_hidden, teacher_hidden, weight, *, teacher_weight=None, k, divergence="forward_kl",
                    beta=0.5, temperature=1.0, token_clip=None, loss_weight=None, tp_group=None, vocab_start=0,
                    valid_vocab=None):
    """Teacher top-k renormalised divergence in chunked torch (gradient-checkpointed per chunk)."""
    from copsd_kernels.types import DivergenceResult

    if k < 1:
        raise ValueError(f"teacher_top_k must be >= 1, got {k}")
    tw = (weight if teacher_weight is None else teacher_weight).detach()
    ht = teacher_hidden.detach()
    num_t = student_hidden.shape[0]
    vocab = valid_vocab or weight.shape[0]
    chunk = max(1, TOPK_CHUNK_ELEMENTS // max(1, vocab))
    per_token = []
    for c0 in range(0, num_t, chunk):
        c1 = min(num_t, c0 + chunk)
        args = (student_hidden[c0:c1], ht[c0:c1], weight, tw, k, divergence, beta, temperature, tp_group,
                vocab_start, valid_vocab)
        if torch.is_grad_enabled() and (student_hidden.requires_grad or weight.requires_grad):
            per_token.append(torch.utils.checkpoint.checkpoint(_topk_chunk, *args, use_reentrant=False))
        else:
            per_token.append(_topk_chunk(*args))
    div = torch.cat(per_token) if per_token else student_hidden.new_zeros(0, dtype=torch.float32)
    clipped = div if token_clip is None else torch.where(div <= token_clip, div, div.detach().clamp(max=token_clip))
    lw = torch.ones_like(div) if loss_weight is None else loss_weight.float()
    return DivergenceResult((lw * clipped).sum(), div.detach())
