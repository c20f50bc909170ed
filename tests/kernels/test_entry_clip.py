"""The reference's per-entry token clip (issue 12): loss_t = sum_v min(d_tv, c), checked against an independent
float64 autograd implementation of the COPSD reference code's formula (materialized [T, V] integrand from
`F.kl_div(..., reduction="none")`, clamp every entry, then the vocabulary sum), for the chunked path and
kernels/reference.py; plus `clip_mode="position"` against the previous formula (clamp of the per-position sum)
and a fixture where every position's divergence exceeds the clip (the position clip gives no gradient there,
the per-entry clip does). The Triton and TP=2 versions of the same checks live in test_triton_interpret.py
and tests/distributed/test_kernels_tp.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from copsd_kernels import fused_linear_divergence
from copsd_kernels import reference as ref
from tests.kernels.parity_cases import GRAD_OUT, make_inputs, pick_clip

pytestmark = pytest.mark.kernels

KINDS = [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.5)]  # (name, beta of the reference's JSD)
T, H, V, VALID = 41, 64, 1271, 1250
RTOL = 1e-5  # fp32 relative: elementwise rtol plus an atol of RTOL x the largest reference entry


def reference_code_terms(hs, ht, w, tw, tau, beta):
    """[T, V] float64 integrand as the reference code builds it (beta 0: forward KL, 1: reverse KL, else
    generalized JSD), plus the probability that weights each term (p, q or the mixture M)."""
    logq = torch.log_softmax(hs @ w.T / tau, -1)
    with torch.no_grad():
        logp = torch.log_softmax(ht @ tw.T / tau, -1)
    if beta == 0.0:
        return F.kl_div(logq, logp, reduction="none", log_target=True), logp.exp()
    if beta == 1.0:
        return F.kl_div(logp, logq, reduction="none", log_target=True), logq.exp()
    logm = torch.logsumexp(torch.stack([logq + math.log1p(-beta), logp + math.log(beta)]), 0)
    terms = beta * F.kl_div(logm, logp, reduction="none", log_target=True) + \
        (1 - beta) * F.kl_div(logm, logq, reduction="none", log_target=True)
    return terms, logm.exp()


def reference_code_loss(hs, ht, w, tw, lw, tau, beta, clip, valid=VALID):
    """(loss, per_token, clipped_count, clipped_mass, grad_hs, grad_w) in float64 through autograd."""
    hs_, w_ = hs.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    tw_ = w_.detach() if tw is None else tw.double()
    terms, prob = reference_code_terms(hs_, ht.double(), w_[:valid], tw_[:valid], tau, beta)
    clipped = terms if clip is None else terms.clamp(max=clip)
    loss = (clipped.sum(-1) * lw.double()).sum()
    (loss * GRAD_OUT).backward()
    hit = torch.zeros_like(terms, dtype=torch.bool) if clip is None else terms.detach() > clip
    return (loss.detach(), terms.detach().sum(-1), hit.sum(-1).double(), (prob * hit).sum(-1).detach(),
            hs_.grad, w_.grad, terms.detach())


def assert_rel(name, got, want, rtol=RTOL):
    got, want = got.double(), want.double()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()),
                               msg=lambda m: f"{name}: {m}")


def run_impl(impl, hs, ht, w, tw, lw, **kw):
    if impl == "reference":
        hs_, w_ = hs.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        out = ref.fused_linear_divergence(hs_, ht.double(), w_, teacher_weight=None if tw is None else tw.double(),
                                          loss_weight=lw.double(), **kw)
    else:
        hs_, w_ = hs.detach().requires_grad_(), w.detach().requires_grad_()
        out = fused_linear_divergence(hs_, ht, w_, teacher_weight=tw, loss_weight=lw, impl=impl, **kw)
    (out.loss * GRAD_OUT).backward()
    return out, hs_.grad, w_.grad


def check_entry_clip(impl, *, divergence, beta, tau, clip, T=T, H=H, V=V, valid=VALID, seed=0, **impl_kw):
    """The acceptance comparison for one case; returns the reference terms for further checks."""
    hs, ht, w, tw, lw = make_inputs(T, H, V, torch.float32, seed=seed)
    want = reference_code_loss(hs, ht, w, tw, lw, tau, beta, clip, valid)
    terms = want[-1]
    if clip is not None:  # the clip must bite on some entries only, and no entry may sit on the threshold
        assert 0 < int(want[2].sum()) < terms.numel()
        assert float((terms - clip).abs().min()) > 1e-6 * clip, "fixture has an entry on the clip threshold"
    out, ghs, gw = run_impl(impl, hs, ht, w, tw, lw, divergence=divergence, beta=0.5 if beta in (0, 1) else beta,
                            temperature=tau, token_clip=clip, valid_vocab=valid, **impl_kw)
    assert_rel("loss", out.loss.detach(), want[0])
    assert_rel("per_token", out.per_token, want[1])
    assert_rel("grad_student_hidden", ghs, want[4])
    assert_rel("grad_weight", gw, want[5])
    assert gw[valid:].abs().max() == 0  # vocabulary padding never enters a softmax
    if clip is None:
        assert out.clipped_count is None and out.clipped_mass is None
    else:
        assert torch.equal(out.clipped_count.double(), want[2])
        assert_rel("clipped_mass", out.clipped_mass, want[3])
    return want


@pytest.mark.parametrize("clip", [None, 0.01, 0.05], ids=["noclip", "clip0.01", "clip0.05"])
@pytest.mark.parametrize("tau", [1.0, 1.1])
@pytest.mark.parametrize("divergence,beta", KINDS, ids=[k for k, _ in KINDS])
def test_chunked_entry_clip_matches_reference_code_formula(divergence, beta, tau, clip):
    check_entry_clip("chunked", divergence=divergence, beta=beta, tau=tau, clip=clip, chunk_size=16)


@pytest.mark.parametrize("divergence,beta", KINDS, ids=[k for k, _ in KINDS])
def test_float64_reference_is_the_reference_code_formula(divergence, beta):
    check_entry_clip("reference", divergence=divergence, beta=beta, tau=1.1, clip=0.01)


def previous_position_clip(hs, ht, w, tw, lw, tau, divergence, beta, clip, valid=VALID):
    """The pre-issue-12 formula, written out: min(sum_v d_v, c) per position (float64 autograd)."""
    hs_, w_ = hs.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    tw_ = w_.detach() if tw is None else tw.double()
    per_token = ref.divergence_from_logits(hs_ @ w_[:valid].T / tau, ht.double() @ tw_[:valid].T / tau,
                                           divergence, beta)
    loss = (per_token.clamp(max=clip) * lw.double()).sum()
    (loss * GRAD_OUT).backward()
    return loss.detach(), per_token.detach(), hs_.grad, w_.grad


@pytest.mark.parametrize("impl", ["chunked", "reference"])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_position_mode_reproduces_the_previous_numbers(impl, divergence, beta):
    hs, ht, w, tw, lw = make_inputs(T, H, V, torch.float32, seed=1, separate_teacher=True)
    with torch.no_grad():
        probe = ref.fused_linear_divergence(hs.double(), ht.double(), w.double(), teacher_weight=tw.double(),
                                            divergence=divergence, beta=beta, temperature=1.1, valid_vocab=VALID)
    clip = pick_clip(probe.per_token)
    loss, pt, ghs, gw = previous_position_clip(hs, ht, w, tw, lw, 1.1, divergence, beta, clip)
    assert (pt > clip).any() and (pt < clip).any()
    out, o_ghs, o_gw = run_impl(impl, hs, ht, w, tw, lw, divergence=divergence, beta=beta, temperature=1.1,
                                token_clip=clip, valid_vocab=VALID, clip_mode="position")
    assert_rel("loss", out.loss.detach(), loss)
    assert_rel("grad_student_hidden", o_ghs, ghs)
    assert_rel("grad_weight", o_gw, gw)
    # clipped positions contribute no gradient: their rows of dH are exactly zero
    assert o_ghs[pt > clip].abs().max() == 0
    assert torch.equal(out.clipped_mass.double(), (pt > clip).double())
    assert torch.equal(out.clipped_count.double(), (pt > clip).double() * VALID)


def far_teacher_inputs(seed=5):
    """Teacher hidden states unrelated to the student's: every position's divergence is far above 0.05."""
    hs, ht, w, tw, lw = make_inputs(T, H, V, torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    return hs, torch.randn(T, H, generator=g) * 1.5, w, tw, lw


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.0), ("jsd", 0.5)])
def test_every_position_above_clip_still_gives_the_reference_gradient(divergence, beta):
    hs, ht, w, tw, lw = far_teacher_inputs()
    want = reference_code_loss(hs, ht, w, tw, lw, 1.1, beta, 0.05)
    assert float(want[1].min()) > 0.05, "fixture: every position's divergence must exceed the clip"
    out, ghs, gw = run_impl("chunked", hs, ht, w, tw, lw, divergence=divergence, beta=0.5, temperature=1.1,
                            token_clip=0.05, valid_vocab=VALID, chunk_size=16)
    assert float(ghs.abs().max()) > 1e-3 * float(want[4].abs().max()) > 0
    assert (ghs[lw > 0].abs().sum(1) > 0).all(), "every weighted position keeps a gradient"
    assert_rel("loss", out.loss.detach(), want[0])
    assert_rel("grad_student_hidden", ghs, want[4])
    assert_rel("grad_weight", gw, want[5])
    # the previous (position) clip drops every position: no gradient at all
    _, p_ghs, p_gw = run_impl("chunked", hs, ht, w, tw, lw, divergence=divergence, beta=0.5, temperature=1.1,
                              token_clip=0.05, valid_vocab=VALID, clip_mode="position")
    assert p_ghs.abs().max() == 0 and p_gw.abs().max() == 0
