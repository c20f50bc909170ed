"""Public entry points: input checks and the choice between the Triton, chunked and reference paths.

impl: "auto" (Triton on CUDA tensors when triton imports, the chunked torch path otherwise), "triton"
(also runs on CPU tensors when TRITON_INTERPRET=1 was set before triton was first imported), "chunked",
"reference" (naive float64, tests only).
mode (Triton divergence only): "store" keeps each token chunk's fp32 logits (4 logits-sized GEMMs, chunk
size from `memory_budget`, kernels/divergence_store.py), "recompute" never stores logits (6 GEMMs, JSD 8,
kernels/divergence_triton.py), "auto" (default) = store when `memory_budget` (bytes per rank, default
divergence_store.DEFAULT_MEMORY_BUDGET = 3 GiB) holds at least 128 tokens, else recompute.

The chunked and Triton divergences always run through the custom op `copsd::divergence_fwd_bwd`, and
log-probs of meta / fake tensors through `copsd::linear_logprobs` (ops.py), so both also run under meta
tensors (`copsd dry-run`) and fake tensors (`torch.compile`); meta / fake inputs pick "triton" in "auto"
mode (the GPU's choice; only the fake implementation runs; store mode's fake allocates its chunk).
"""
from __future__ import annotations

import warnings

import torch

from . import chunked, ops
from .types import (DivergenceResult, LogprobResult, check_divergence_inputs, check_logprob_inputs,
                    resolve_divergence)

IMPLS = ("auto", "triton", "chunked", "reference")
MODES = ("auto", "store", "recompute")


def _pick(impl: str, x: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if x.is_cuda or ops.is_shape_only(x):
        try:
            import triton  # noqa: F401
            return "triton"
        except ImportError:
            return "chunked"
    return "chunked"


def fused_linear_divergence(student_hidden, teacher_hidden, weight, *, teacher_weight=None,
                            divergence="forward_kl", beta=0.5, temperature=1.0, token_clip=None,
                            loss_weight=None, tp_group=None, vocab_start=0, valid_vocab=None,
                            impl="auto", chunk_size=None, mode="auto", memory_budget=None,
                            clip_mode="entry") -> DivergenceResult:
    """Exact full-vocabulary divergence between student q = softmax(W h_s / tau) and teacher
    p = softmax(W_t h_t / tau) over the (possibly vocab-parallel) LM head, without [T, V] logits.

    student_hidden, teacher_hidden: [T, H]; weight: local shard [V_local, H] (rows vocab_start ..
    vocab_start + V_local - 1 of the global head); teacher_weight: teacher's shard (default: weight, detached).
    divergence: "forward_kl" KL(p||q), "reverse_kl" KL(q||p), "jsd" generalized JSD_beta with
    M = beta p + (1-beta) q (beta=0 -> forward KL, beta=1 -> reverse KL).
    token_clip c (None: no clip) with clip_mode "entry" (default; the COPSD reference's clip): every
    (position, vocabulary entry) term d_tv of the divergence is clamped at c before the vocabulary sum, so
    only the clamped entries stop contributing gradient; "position": the per-position divergence is clamped
    (min(div_t, c); a clipped position gives no gradient).
    Returns DivergenceResult(loss = sum_t loss_weight[t] * clipped_t, per_token = div_t (unclipped),
    clipped_count, clipped_mass: see types.DivergenceResult).
    Gradients: student_hidden (full, already summed over tp_group) and weight (local shard) only.
    Global vocab rows >= valid_vocab are padding and excluded from every softmax.
    """
    check_divergence_inputs(student_hidden, teacher_hidden, weight, teacher_weight, temperature, token_clip,
                            loss_weight, clip_mode)
    kind = resolve_divergence(divergence, beta)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if memory_budget is not None and not int(memory_budget) > 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
    which = _pick(impl, student_hidden)
    if which != "triton" and (mode != "auto" or memory_budget is not None):
        warnings.warn(f"mode={mode!r} / memory_budget={memory_budget} only apply to impl='triton'; ignored for "
                      f"impl={which!r}", stacklevel=2)
    if which == "reference":
        from . import reference
        return reference.fused_linear_divergence(
            student_hidden, teacher_hidden, weight, teacher_weight=teacher_weight, divergence=divergence,
            beta=beta, temperature=temperature, token_clip=token_clip, loss_weight=loss_weight,
            tp_group=tp_group, vocab_start=vocab_start, valid_vocab=valid_vocab, clip_mode=clip_mode)
    kw = dict(teacher_weight=teacher_weight, kind=kind, beta=beta, temperature=temperature, token_clip=token_clip,
              loss_weight=loss_weight, tp_group=tp_group, vocab_start=vocab_start, valid_vocab=valid_vocab,
              chunk_size=chunk_size, clip_mode=clip_mode)
    if which == "triton":
        from . import divergence_store
        if divergence_store.resolve_mode(mode, student_hidden.shape[0], weight.shape[0], student_hidden.dtype,
                                         memory_budget) == "store":
            return divergence_store.fused_linear_divergence(student_hidden, teacher_hidden, weight,
                                                            memory_budget=memory_budget,
                                                            fwd_bwd=ops.divergence_via_op("store"), **kw)
        from . import divergence_triton as mod
    else:
        mod = chunked
    return mod.fused_linear_divergence(student_hidden, teacher_hidden, weight, fwd_bwd=ops.divergence_via_op(which),
                                       **kw)


def fused_linear_logprobs(hidden, weight, target_ids, *, temperature=1.0, tp_group=None, vocab_start=0,
                          valid_vocab=None, return_entropy=False, impl="auto", chunk_size=None) -> LogprobResult:
    """log softmax(W h / tau)[target] per token (and the entropy of that distribution if asked) over the
    vocab-parallel head, differentiable w.r.t. hidden (full gradient, summed over tp_group) and the local
    weight shard. target_ids are global vocabulary ids < valid_vocab (not checked: that would sync)."""
    check_logprob_inputs(hidden, weight, target_ids, temperature)
    which = _pick(impl, hidden)
    if which == "reference":
        from . import reference
        return reference.fused_linear_logprobs(hidden, weight, target_ids, temperature=temperature,
                                               tp_group=tp_group, vocab_start=vocab_start,
                                               valid_vocab=valid_vocab, return_entropy=return_entropy)
    if ops.is_shape_only(hidden):
        lp, ent = ops.logprobs_via_op(hidden, weight, target_ids, impl=which, temperature=temperature,
                                      tp_group=tp_group, vocab_start=vocab_start, valid_vocab=valid_vocab,
                                      chunk_size=chunk_size)
        return LogprobResult(lp, ent if return_entropy else None)
    if which == "triton":
        from . import logprobs_triton as mod
    else:
        mod = chunked
    return mod.fused_linear_logprobs(hidden, weight, target_ids, temperature=temperature, tp_group=tp_group,
                                     vocab_start=vocab_start, valid_vocab=valid_vocab,
                                     return_entropy=return_entropy, chunk_size=chunk_size)
