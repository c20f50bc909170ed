"""The fused kernels as torch custom ops, with fake (meta) implementations.

    torch.ops.copsd.divergence_fwd_bwd(hs, ht, w, tw, loss_weight, impl, group_name, opts_json, need_dh, need_dw)
    torch.ops.copsd.linear_logprobs(h, w, targets, impl, group_name, opts_json) -> (logprobs, entropy)

Why custom ops: under meta or fake tensors (the dry run, `torch.compile`) a Triton launch or a
`.item()`-free but data-carrying torch path cannot run; the op boundary lets the dispatcher call the fake
implementation instead, which returns outputs of the right shapes and dtypes *and allocates the transient
buffers the real kernel would* (so a memory tracker sees the kernel's workspace peak).

Autograd stays where it was: the divergence is computed "gradient in forward" by
`types.GradInForwardDivergence`, whose `fwd_bwd` callable is this op (no autograd on the op itself).
The log-prob op has a registered backward (`linear_logprobs_backward`) that recomputes the forward
statistics; `api.py` uses it only for meta / fake inputs, so eager GPU/CPU training keeps the
implementations' own autograd Functions (no recomputation).

Non-tensor options travel as a JSON string (they are plain numbers / strings) and the tensor-parallel
group by name (`ProcessGroup.group_name`, resolved with c10d's registry).
"""
from __future__ import annotations

import json
from typing import Optional

import torch
from torch import Tensor

from .types import FwdBwdOut


def group_name(group) -> str:
    return "" if group is None else group.group_name


def _group(name: str):
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def _divergence_module(impl: str):
    if impl == "store":
        from . import divergence_store as mod
    elif impl == "triton":
        from . import divergence_triton as mod
    else:
        from . import chunked as mod
    return mod


def _logprob_module(impl: str):
    if impl == "triton":
        from . import logprobs_triton as mod
    else:
        from . import chunked as mod
    return mod


def _placeholder(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.float32) if t is None else t


@torch.library.custom_op("copsd::divergence_fwd_bwd", mutates_args=())
def divergence_fwd_bwd(hs: Tensor, ht: Tensor, w: Tensor, tw: Tensor, loss_weight: Optional[Tensor], impl: str,
                       group: str, opts_json: str, need_dh: bool,
                       need_dw: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(per_token [T] fp32, clipped token_loss [T] or [0], clip_stats [T, 2] or [0] (both [0] without a clip),
    d loss/d hs [T, H] fp32 or [0], d loss/d w [V_local, H] fp32 or [0]); see types.FwdBwdOut."""
    opts = json.loads(opts_json)
    out = _divergence_module(impl)._divergence_fwd_bwd(
        hs, ht, w, tw, loss_weight=loss_weight, need_dh=need_dh, need_dw=need_dw, group=_group(group), **opts)
    return (out.per_token, _placeholder(out.token_loss, hs), _placeholder(out.clip_stats, hs),
            _placeholder(out.dhs, hs), _placeholder(out.dw, w))


def _workspace_rows(impl: str, num_t: int, num_local: int, chunk_size,
                    memory_budget=None) -> list[tuple[int, torch.dtype, bool]]:
    """(rows, dtype, uses_input_dtype) of the [rows, nv] buffers the implementation holds at its peak."""
    if impl == "store":  # the chunk's fp32 student + teacher logits and its dZ in the input dtype
        from .divergence_store import store_chunk_tokens

        tc = int(chunk_size) if chunk_size else store_chunk_tokens(num_t, num_local, torch.bfloat16, memory_budget)
        return [(2 * tc, torch.float32, False), (tc, torch.float32, True)]
    if impl == "triton":
        from .divergence_triton import CHUNK_TOKENS

        return [(min(chunk_size or CHUNK_TOKENS, num_t), torch.float32, True)]  # dz in the input dtype
    from .chunked import BLOCK_ELEMENTS, _chunk_len

    tc = _chunk_len(num_t, num_local, chunk_size)
    return [(4 * tc, torch.float32, False),  # A, B, X, Y
            (2 * max(1, min(tc, BLOCK_ELEMENTS // max(1, num_local))), torch.float32, False)]  # 2 row scratches


@divergence_fwd_bwd.register_fake
def _divergence_fake(hs, ht, w, tw, loss_weight, impl, group, opts_json, need_dh, need_dw):
    opts = json.loads(opts_json)
    num_t, nv = hs.shape[0], int(opts["nv"])
    per_token = hs.new_empty(num_t, dtype=torch.float32)
    clip = opts.get("clip") is not None
    token_loss = hs.new_empty(num_t if clip else 0, dtype=torch.float32)
    clip_stats = hs.new_empty((num_t, 2) if clip else (0,), dtype=torch.float32)
    stats = hs.new_empty(num_t, 8, dtype=torch.float32)  # per-token statistics (gathered over TP)
    dhs = hs.new_empty(hs.shape, dtype=torch.float32) if need_dh else hs.new_empty(0, dtype=torch.float32)
    dw = w.new_empty(w.shape, dtype=torch.float32) if need_dw else w.new_empty(0, dtype=torch.float32)
    if nv > 0 and (need_dh or need_dw or impl != "triton"):  # store mode keeps its logits even without grads
        bufs = [hs.new_empty(rows, nv, dtype=hs.dtype if own else dt)
                for rows, dt, own in _workspace_rows(impl, num_t, w.shape[0], opts.get("chunk_size"),
                                                     opts.get("memory_budget"))]
        del bufs  # transient: freed before the op returns, as in the real kernel
    del stats
    return per_token, token_loss, clip_stats, dhs, dw


def divergence_via_op(impl: str):
    """A `fwd_bwd` callable for `GradInForwardDivergence` that goes through the custom op."""

    def fwd_bwd(hs, ht, w, tw, *, loss_weight, need_dh, need_dw, group, **opts):
        per_token, token_loss, clip_stats, dhs, dw = torch.ops.copsd.divergence_fwd_bwd(
            hs, ht, w, tw, loss_weight, impl, group_name(group), json.dumps(opts), bool(need_dh), bool(need_dw))
        clip = opts.get("clip") is not None
        return FwdBwdOut(per_token, token_loss if clip else None, clip_stats if clip else None,
                         dhs if need_dh else None, dw if need_dw else None)

    return fwd_bwd


def _logprob_kwargs(opts_json: str, group: str) -> dict:
    opts = json.loads(opts_json)
    return dict(temperature=opts["temperature"], tp_group=_group(group), vocab_start=opts["vocab_start"],
                valid_vocab=opts["valid_vocab"], chunk_size=opts["chunk_size"])


@torch.library.custom_op("copsd::linear_logprobs", mutates_args=())
def linear_logprobs(h: Tensor, w: Tensor, targets: Tensor, impl: str, group: str,
                    opts_json: str) -> tuple[Tensor, Tensor]:
    """(log-probs [T] fp32, entropy [T] fp32) of softmax(W h / tau) at the targets."""
    with torch.no_grad():
        res = _logprob_module(impl).fused_linear_logprobs(h, w, targets, return_entropy=True,
                                                          **_logprob_kwargs(opts_json, group))
    return res.logprobs, res.entropy


@linear_logprobs.register_fake
def _logprobs_fake(h, w, targets, impl, group, opts_json):
    num_t = h.shape[0]
    stats = h.new_empty(num_t, 3, dtype=torch.float32)
    del stats
    return h.new_empty(num_t, dtype=torch.float32), h.new_empty(num_t, dtype=torch.float32)


@torch.library.custom_op("copsd::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward(h: Tensor, w: Tensor, targets: Tensor, g_lp: Tensor, g_ent: Tensor, impl: str,
                             group: str, opts_json: str, need_dh: bool, need_dw: bool) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. h and w (recomputes the forward statistics; placeholders [0] where not needed)."""
    with torch.enable_grad():
        h_ = h.detach().requires_grad_(True)
        w_ = w.detach().requires_grad_(need_dw)
        res = _logprob_module(impl).fused_linear_logprobs(h_, w_, targets, return_entropy=True,
                                                          **_logprob_kwargs(opts_json, group))
        inputs = [h_] + ([w_] if need_dw else [])
        grads = torch.autograd.grad([res.logprobs, res.entropy], inputs, grad_outputs=[g_lp, g_ent])
    dh = grads[0] if need_dh else h.new_empty(0)
    dw = grads[1] if need_dw else w.new_empty(0)
    return dh, dw


@linear_logprobs_backward.register_fake
def _logprobs_backward_fake(h, w, targets, g_lp, g_ent, impl, group, opts_json, need_dh, need_dw):
    opts = json.loads(opts_json)
    nv = w.shape[0]
    if opts["valid_vocab"] is not None:
        nv = max(0, min(nv, int(opts["valid_vocab"]) - int(opts["vocab_start"])))
    dh32 = h.new_empty(h.shape, dtype=torch.float32)
    dw = w.new_empty(w.shape) if need_dw else w.new_empty(0)
    if nv > 0:
        rows, dt, own = _workspace_rows(impl, h.shape[0], w.shape[0], opts["chunk_size"])[0]
        dz = h.new_empty(rows, nv, dtype=h.dtype if own else dt)
        del dz
    dh = h.new_empty(h.shape) if need_dh else h.new_empty(0)
    del dh32
    return dh, dw


def _lp_setup(ctx, inputs, output):
    h, w, targets, impl, group, opts_json = inputs
    ctx.save_for_backward(h, w, targets)
    ctx.args = (impl, group, opts_json)


def _lp_backward(ctx, g_lp, g_ent):
    h, w, targets = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    g_lp = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device) if g_lp is None else g_lp.float()
    g_ent = torch.zeros_like(g_lp) if g_ent is None else g_ent.float()
    dh, dw = torch.ops.copsd.linear_logprobs_backward(h, w, targets, g_lp, g_ent, *ctx.args, need_dh, need_dw)
    return (dh if need_dh else None), (dw if need_dw else None), None, None, None, None


linear_logprobs.register_autograd(_lp_backward, setup_context=_lp_setup)


def logprobs_via_op(hidden, weight, target_ids, *, impl, temperature, tp_group, vocab_start, valid_vocab,
                    chunk_size):
    opts = json.dumps(dict(temperature=float(temperature), vocab_start=int(vocab_start),
                           valid_vocab=None if valid_vocab is None else int(valid_vocab), chunk_size=chunk_size))
    return torch.ops.copsd.linear_logprobs(hidden, weight, target_ids, impl, group_name(tp_group), opts)


def is_shape_only(x: Tensor) -> bool:
    """Meta tensors and fake tensors (FakeTensorMode, torch.compile tracing) carry no data."""
    if x.is_meta:
        return True
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor)
