"""Shared case builders for the kernel parity tests (chunked, Triton-interpreted, TP): random inputs, the
float64 reference from copsd_kernels.reference, and comparisons with stated tolerances."""
from __future__ import annotations

import torch

from copsd_kernels import fused_linear_divergence, fused_linear_logprobs
from copsd_kernels import reference as ref

# (dtype, atol, rtol) for values and gradients vs the float64 reference on the same (rounded) inputs.
# fp32: the kernels accumulate in fp32; errors are ~1e-6 relative to the logit scale, 1e-4 leaves room for
# the lse-difference cancellation in KL = E[b-a] - lse_b + lse_a at |logits| ~ 10.
# bf16: inputs are bf16 but every GEMM accumulates in fp32 and the statistics are fp32, so values stay
# fp32-accurate; only the returned gradients are rounded to bf16 (8 bits of mantissa -> rtol 1/64).
TOLS = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-3, 1.6e-2)}
# Triton with bf16 inputs stores dZ in bf16 (the GPU feeds bf16 GEMMs for dH and dW): one more rounding of
# every logit gradient plus cancellation in sum_v dZ W -> gradients within ~1% (values keep TOLS).
TRITON_BF16_GRAD_TOL = (1e-2, 3e-2)
GRAD_OUT = 1.7  # grad_output != 1 checks that backward scales the precomputed gradients


def make_inputs(T, H, V, dtype, *, seed=0, separate_teacher=False, mask_frac=0.3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(T, H, generator=g)
    ht = hs + 0.7 * torch.randn(T, H, generator=g)
    w = torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)
    tw = w + 0.3 * torch.randn(V, H, generator=g) / H ** 0.5 if separate_teacher else None
    lw = (torch.rand(T, generator=g) > mask_frac).float() / T  # mask + global-count normalizer
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hs), cast(ht), cast(w), cast(tw), lw.to(device)


def pick_clip(per_token):
    """A clip value in the widest gap near the median, so no token sits on the threshold."""
    s, _ = per_token.sort()
    n = len(s)
    lo, hi = n // 4, max(n // 4 + 1, 3 * n // 4)
    i = lo + int((s[lo + 1:hi + 1] - s[lo:hi]).argmax())
    return float((s[i] + s[i + 1]) / 2)


def run_divergence(impl, hs, ht, w, tw, lw, **kw):
    """Returns (loss, per_token, grad_hs, grad_w) for `impl` (or the float64 reference for impl=None)."""
    if impl is None:
        leaf = lambda x: None if x is None else x.detach().double().requires_grad_()  # noqa: E731
        hs_, w_ = leaf(hs), leaf(w)
        out = ref.fused_linear_divergence(hs_, ht.double(), w_, teacher_weight=None if tw is None else tw.double(),
                                          loss_weight=None if lw is None else lw.double(), **kw)
    else:
        hs_, w_ = hs.detach().requires_grad_(), w.detach().requires_grad_()
        out = fused_linear_divergence(hs_, ht, w_, teacher_weight=tw, loss_weight=lw, impl=impl, **kw)
    (out.loss * GRAD_OUT).backward()
    return out.loss.detach().double(), out.per_token.double(), hs_.grad.double(), w_.grad.double()


def assert_close(name, got, want, atol, rtol):
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def check_divergence(impl, *, T, H, V, dtype, divergence, beta=0.5, temperature=1.0, clip=False,
                     separate_teacher=False, valid_vocab=None, seed=0, grad_tol=None, device="cpu", clip_mode="entry",
                     **impl_kw):
    """clip: False (none), True (a per-token-divergence quantile from pick_clip) or a number."""
    hs, ht, w, tw, lw = make_inputs(T, H, V, dtype, seed=seed, separate_teacher=separate_teacher, device=device)
    kw = dict(divergence=divergence, beta=beta, temperature=temperature, valid_vocab=valid_vocab,
              clip_mode=clip_mode)
    if not isinstance(clip, bool):
        kw["token_clip"] = clip
    elif clip:
        probe = ref.fused_linear_divergence(hs.double(), ht.double(), w.double(),
                                            teacher_weight=None if tw is None else tw.double(), **kw)
        kw["token_clip"] = pick_clip(probe.per_token)
    want = run_divergence(None, hs, ht, w, tw, lw, **kw)
    got = run_divergence(impl, hs, ht, w, tw, lw, **kw, **impl_kw)
    atol, rtol = TOLS[dtype]
    for i, (name, g_, w_) in enumerate(zip(("loss", "per_token", "grad_student_hidden", "grad_weight"), got, want)):
        assert_close(name, g_, w_, *(grad_tol if grad_tol and i >= 2 else (atol, rtol)))
    if valid_vocab is not None:  # padding rows never enter a softmax, so they get exactly zero gradient
        assert got[3][valid_vocab:].abs().max() == 0
    return got, want


def check_logprobs(impl, *, T, H, V, dtype, temperature=1.0, valid_vocab=None, return_entropy=True, seed=0,
                   grad_tol=None, device="cpu", **impl_kw):
    hs, _, w, _, _ = make_inputs(T, H, V, dtype, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(0, valid_vocab or V, (T,), generator=g).to(device)
    g_lp, g_ent = torch.randn(T, generator=g, dtype=torch.float64), torch.randn(T, generator=g, dtype=torch.float64)
    g_lp, g_ent = g_lp.to(device), g_ent.to(device)
    results = []
    for which in (None, impl):
        if which is None:
            h_, w_ = hs.detach().double().requires_grad_(), w.detach().double().requires_grad_()
            out = ref.fused_linear_logprobs(h_, w_, targets, temperature=temperature, valid_vocab=valid_vocab,
                                            return_entropy=return_entropy)
        else:
            h_, w_ = hs.detach().requires_grad_(), w.detach().requires_grad_()
            out = fused_linear_logprobs(h_, w_, targets, temperature=temperature, valid_vocab=valid_vocab,
                                        return_entropy=return_entropy, impl=which, **impl_kw)
        total = (out.logprobs.double() * g_lp).sum()
        if return_entropy:
            total = total + (out.entropy.double() * g_ent).sum()
        total.backward()
        ent = out.entropy.detach().double() if return_entropy else torch.zeros(T, dtype=torch.float64, device=device)
        results.append((out.logprobs.detach().double(), ent, h_.grad.double(), w_.grad.double()))
    atol, rtol = TOLS[dtype]
    for i, (name, g_, w_) in enumerate(zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), results[1],
                                           results[0])):
        assert_close(name, g_, w_, *(grad_tol if grad_tol and i >= 2 else (atol, rtol)))
