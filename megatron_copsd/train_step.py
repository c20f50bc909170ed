"""Megatron forward/backward passes of one training step (teacher scoring, student loss).

    teacher_pass(teacher_model, microbatches, spec)     # forward_only; fills mb.teacher_out on the last stage
    metrics = student_pass(ddp_model, microbatches, spec, num_global_tokens)   # forward + backward

Both go through `megatron.core.pipeline_parallel.get_forward_backward_func()` with one micro-batch per
`MicroBatch`, so TP, PP (p2p of hidden states between stages) and gradient accumulation are Megatron's.
The models return final-norm hidden states (`HiddenStateGPTModel.return_hidden_states = True`); the LM
head is applied inside `copsd_kernels`, so no [tokens x vocab] logits are built.

Normalisation: the objective functions divide by the *global* number of response tokens (all
micro-batches, all DP ranks). The model's TransformerConfig has `calculate_per_token_loss=True`, so
Megatron neither divides by the number of micro-batches nor averages over DP (DDP sums), and the
loss_func reports 0 tokens so `finalize_model_grads` does not rescale either: the summed gradient is
exactly the gradient of the global token mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_copsd import objective as obj
from megatron_copsd.batching import MicroBatch, gather_response_hidden

METRIC_KEYS = ("loss", "tokens", "divergence_sum", "clipped_tokens", "clipped_entry_frac_sum", "clipped_mass_sum",
               "kl_sum", "tis_weight_sum", "ratio_sum",
               "nll_sum", "logprob_gap_sum", "logprob_abs_gap_sum", "gap_tokens")


@dataclass
class ObjectiveSpec:
    """What the loss functions need, resolved once from the config (no config reads inside passes)."""

    name: str  # copsd | rosd | sampled_kl | grpo | sft
    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    token_clip: Optional[float] = None
    token_clip_mode: str = "entry"  # entry (the reference's per-entry clamp) | position
    teacher_top_k: Optional[int] = None
    rollout_temperature: float = 1.0
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 0.0
    tis_cap: Optional[float] = None
    valid_vocab: int = 0
    separate_teacher_weights: bool = True  # fixed / ema teacher: use the teacher's own LM head
    rosd_loss: str = "full_vocab"  # rosd: full_vocab | topk_tail
    rosd_top_k: int = 100

    @property
    def teacher_output(self) -> Optional[str]:
        """What the teacher pass must produce: hidden states, log-probs, or nothing."""
        if self.name in ("copsd", "rosd"):
            return "hidden"
        if self.name == "sampled_kl" or (self.name == "grpo" and self.kl_coef > 0):
            return "logprobs"
        return None

    @property
    def teacher_logprob_temperature(self) -> float:
        return self.temperature if self.name == "sampled_kl" else self.rollout_temperature


def _tp_group():
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()


def _response_hidden(model, hidden, side):
    """[T, H] hidden states at the response positions. Under sequence parallelism the model returns this
    TP rank's sequence slice [s/tp, b, H]: all-gather it first. The fused kernels all-reduce the gradient
    of the (replicated) hidden states over TP themselves, so the gather's backward only keeps this
    rank's slice (tensor_parallel_output_grad=False), no second reduction."""
    from megatron_copsd.megatron.model_provider import unwrap_model

    if getattr(unwrap_model(model).config, "sequence_parallel", False):
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    return gather_response_hidden(hidden, side)


def _head(model, valid_vocab: int):
    from megatron_copsd.megatron.model_provider import lm_head_weight, vocab_shard_info

    w = lm_head_weight(model)
    start, valid = vocab_shard_info(model, valid_vocab)
    return w, start, valid


def _logprobs(hidden, weight, targets, *, temperature, vocab_start, valid_vocab):
    import copsd_kernels

    return copsd_kernels.fused_linear_logprobs(hidden, weight, targets, temperature=temperature,
                                               tp_group=_tp_group(), vocab_start=vocab_start,
                                               valid_vocab=valid_vocab).logprobs


def _run(model, microbatches: list[MicroBatch], side: str, make_loss_func, *, forward_only: bool) -> list:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_copsd.megatron.device import compute_device

    device = compute_device()

    def forward_step(data_iterator, model_chunk):
        # Micro-batches are collated on the host; the model (and every loss input) lives on `device`.
        mb = next(data_iterator).to_(device)
        inputs = getattr(mb, side)
        out = model_chunk(inputs.tokens, inputs.position_ids, None)
        return out, make_loss_func(mb)

    seq = max(getattr(mb, side).tokens.shape[1] for mb in microbatches)
    mbs = max(getattr(mb, side).tokens.shape[0] for mb in microbatches)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


@torch.no_grad()
def teacher_pass(teacher_model, microbatches: list[MicroBatch], spec: ObjectiveSpec) -> None:
    """Runs the teacher over the teacher-side sequences; on the last PP stage stores `mb.teacher_out`
    ([T, H] hidden states or [T] log-probs of the sampled tokens) for the student pass."""
    kind = spec.teacher_output
    if kind is None:
        return

    def make_loss_func(mb: MicroBatch):
        def loss_func(hidden):
            h = _response_hidden(teacher_model, hidden, mb.teacher).detach()  # [T, H]
            if kind == "hidden":
                mb.teacher_out = h
            else:
                w, start, valid = _head(teacher_model, spec.valid_vocab)
                mb.teacher_out = _logprobs(h, w, mb.targets, temperature=spec.teacher_logprob_temperature,
                                           vocab_start=start, valid_vocab=valid)
            return torch.zeros((), dtype=torch.float32), {}

        return loss_func

    _run(teacher_model, microbatches, "teacher", make_loss_func, forward_only=True)


def _student_objective(mb: MicroBatch, h, w, start, valid, spec: ObjectiveSpec, num_global_tokens: float,
                       teacher_weight):
    """The objective for one micro-batch: (loss, metrics, trainer log-probs at rollout temperature or None)."""
    if spec.name == "copsd":
        loss, metrics = obj.copsd_loss(
            h, mb.teacher_out, w, mb.mask, num_global_tokens, teacher_weight=teacher_weight,
            divergence=spec.divergence, beta=spec.beta, temperature=spec.temperature,
            token_clip=spec.token_clip, token_clip_mode=spec.token_clip_mode, teacher_top_k=spec.teacher_top_k,
            tp_group=_tp_group(), vocab_start=start, valid_vocab=valid)
        return loss, metrics, None
    if spec.name == "rosd":
        lp, iw = None, None
        if spec.tis_cap is not None and mb.has_rollout_logprobs:
            from megatron_copsd.rosd.topk_tail import truncated_importance_weight

            with torch.no_grad():  # the weight is detached: pi_train at the sampling temperature vs the engine's
                lp = _logprobs(h.detach(), w.detach(), mb.targets, temperature=spec.rollout_temperature,
                               vocab_start=start, valid_vocab=valid)
            iw = truncated_importance_weight(lp, mb.rollout_logprobs, cap=spec.tis_cap)
        loss, metrics = obj.rosd_loss(
            h, mb.teacher_out, w, mb.mask, num_global_tokens, importance_weight=iw, loss=spec.rosd_loss,
            top_k=spec.rosd_top_k, teacher_weight=teacher_weight, divergence=spec.divergence, beta=spec.beta,
            temperature=spec.temperature, token_clip=spec.token_clip, token_clip_mode=spec.token_clip_mode,
            tp_group=_tp_group(), vocab_start=start, valid_vocab=valid)
        return loss, metrics, lp
    if spec.name == "sampled_kl":
        lp = _logprobs(h, w, mb.targets, temperature=spec.temperature, vocab_start=start, valid_vocab=valid)
        loss, metrics = obj.sampled_kl_loss(lp, mb.teacher_out, mb.mask, num_global_tokens)
        return loss, metrics, (lp if spec.temperature == spec.rollout_temperature else None)
    if spec.name == "grpo":
        lp = _logprobs(h, w, mb.targets, temperature=spec.rollout_temperature, vocab_start=start, valid_vocab=valid)
        loss, metrics = obj.grpo_loss(
            lp, lp.detach(), mb.advantages, mb.mask, num_global_tokens, clip_eps_low=spec.clip_eps_low,
            clip_eps_high=spec.clip_eps_high, ref_logprobs=getattr(mb, "teacher_out", None),
            kl_coef=spec.kl_coef, rollout_logprobs=mb.rollout_logprobs if mb.has_rollout_logprobs else None,
            tis_cap=spec.tis_cap)
        return loss, metrics, lp
    lp = _logprobs(h, w, mb.targets, temperature=1.0, vocab_start=start, valid_vocab=valid)
    loss, metrics = obj.sft_loss(lp, mb.mask, num_global_tokens)
    return loss, metrics, None


def student_pass(model, microbatches: list[MicroBatch], spec: ObjectiveSpec, num_global_tokens: float, *,
                 teacher_model=None, teacher_head: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Forward + backward of every micro-batch (gradients accumulate in Megatron's DDP buffers).
    The teacher's LM head (fixed / EMA teacher) is `teacher_head`, or read from `teacher_model`.
    Returns this rank's metric sums (zeros on non-last PP stages) keyed by METRIC_KEYS, as 0-dim fp64
    tensors on the compute device: accumulated without a host sync per micro-batch (the trainer reads
    them once per step, after the all-reduce)."""
    from megatron_copsd.megatron.device import compute_device

    device = compute_device()
    totals = {k: torch.zeros((), dtype=torch.float64, device=device) for k in METRIC_KEYS}

    def make_loss_func(mb: MicroBatch):
        def loss_func(hidden):
            h = _response_hidden(model, hidden, mb.student)  # [T, H]
            w, start, valid = _head(model, spec.valid_vocab)
            tw = None
            if spec.separate_teacher_weights and spec.name in ("copsd", "rosd"):
                if teacher_head is not None:
                    tw = teacher_head.detach()
                elif teacher_model is not None:
                    tw = _head(teacher_model, spec.valid_vocab)[0].detach()
            loss, metrics, lp = _student_objective(mb, h, w, start, valid, spec, num_global_tokens, tw)
            if mb.has_rollout_logprobs:
                with torch.no_grad():
                    if lp is None:
                        lp = _logprobs(h.detach(), w.detach(), mb.targets, temperature=spec.rollout_temperature,
                                       vocab_start=start, valid_vocab=valid)
                    gap = (mb.rollout_logprobs - lp.detach().float()) * mb.mask
                    metrics["logprob_gap_sum"] = gap.sum()
                    metrics["logprob_abs_gap_sum"] = gap.abs().sum()
                    metrics["gap_tokens"] = mb.mask.sum()
            metrics["loss"] = loss.detach()
            mb.per_token_divergence = metrics.pop("per_token_divergence", None)  # diagnostics / layout tests
            for k, v in metrics.items():
                totals[k] += torch.as_tensor(v).detach().to(device=device, dtype=torch.float64)
            # 0 tokens: our loss is already the global token mean's share (see module docstring).
            return loss, torch.zeros((), dtype=torch.int), {}

        return loss_func

    _run(model, microbatches, "student", make_loss_func, forward_only=False)
    return totals
