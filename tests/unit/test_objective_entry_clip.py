"""The per-entry token clip (issue 12) in the objective layer: the teacher top-k variant, ROSD's top-k + tail
loss, the COPSD / ROSD loss metrics (clipped share of entries and of probability mass) and the config field
`objective.token_clip_mode`. Each loss is compared with a float64 autograd implementation of the formula
written out here (materialized terms, per-entry clamp, then the sum) at fp32 relative 1e-5."""
import math

import pytest
import torch

from megatron_copsd.config import ObjectiveConfig
from megatron_copsd.objective import copsd_loss
from megatron_copsd.objective.divergence import topk_divergence
from megatron_copsd.objective.rosd import rosd_loss

T, H, V = 23, 16, 97


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(T, H, generator=g)
    ht = hs + 0.8 * torch.randn(T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.5
    mask = (torch.rand(T, generator=g) > 0.2).float()
    return hs, ht, w, mask


def _terms(logp, logq, divergence, beta):
    """Float64 per-entry terms and the weighting probability (p, q or M); 0 log 0 = 0."""
    def xlog(lx, ly):
        x = lx.exp()
        return torch.where(x > 0, x * (lx - ly), torch.zeros_like(x))
    if divergence == "forward_kl":
        return xlog(logp, logq), logp.exp()
    if divergence == "reverse_kl":
        return xlog(logq, logp), logq.exp()
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    return beta * xlog(logp, logm) + (1 - beta) * xlog(logq, logm), logm.exp()


def _bins(logx, idx):
    rest = logx.scatter(-1, idx, float("-inf"))
    return torch.cat([logx.gather(-1, idx), torch.logsumexp(rest, -1, keepdim=True)], -1)


def _reference(hs, ht, w, lw, *, divergence, beta, tau, clip, mode, support):
    """support: ("teacher_topk", k) renormalised on the teacher's top-k, or ("student_topk_tail", k)."""
    hs_, w_ = hs.double().requires_grad_(), w.double().requires_grad_()
    zs, zt = hs_ @ w_.T / tau, (ht.double() @ w.double().T / tau)
    kind, k = support
    if kind == "teacher_topk":
        idx = zt.topk(k, -1).indices
        logp, logq = torch.log_softmax(zt.gather(-1, idx), -1), torch.log_softmax(zs.gather(-1, idx), -1)
    else:
        logq_full, logp_full = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
        idx = logq_full.detach().topk(k, -1).indices
        logp, logq = _bins(logp_full, idx), _bins(logq_full, idx)
    terms, prob = _terms(logp, logq, divergence, beta)
    div = terms.sum(-1)
    if mode == "entry":
        per = terms.clamp(max=clip).sum(-1)
        hit = terms.detach() > clip
    else:
        per = torch.where(div <= clip, div, div.detach().clamp(max=clip))
        hit = (div.detach() > clip)[:, None].expand_as(terms)
    loss = (per * lw.double()).sum()
    loss.backward()
    return loss.detach(), hs_.grad, w_.grad, hit.sum(-1).double(), (prob.detach() * hit).sum(-1)


def _rel(got, want, rtol=1e-5):
    got, want = got.double(), want.double()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


@pytest.mark.parametrize("mode", ["entry", "position"])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_teacher_topk_clip_matches_formula(divergence, beta, mode):
    hs, ht, w, mask = _inputs()
    lw = mask / mask.sum()
    want = _reference(hs, ht, w, lw, divergence=divergence, beta=beta, tau=1.1, clip=0.05, mode=mode,
                      support=("teacher_topk", 7))
    assert 0 < want[3].sum() < T * 7  # the clip bites on some entries only
    hs_, w_ = hs.clone().requires_grad_(), w.clone().requires_grad_()
    res = topk_divergence(hs_, ht, w_, k=7, divergence=divergence, beta=beta, temperature=1.1, token_clip=0.05,
                          loss_weight=lw, clip_mode=mode)
    res.loss.backward()
    _rel(res.loss.detach(), want[0])
    _rel(hs_.grad, want[1])
    _rel(w_.grad, want[2])
    assert torch.equal(res.clipped_count.double(), want[3])
    _rel(res.clipped_mass, want[4])


@pytest.mark.parametrize("mode", ["entry", "position"])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("jsd", 0.5)])
def test_rosd_topk_tail_clip_matches_formula(divergence, beta, mode):
    from megatron_copsd.rosd.topk_tail import topk_tail_divergence
    from tests.kernels.parity_cases import pick_clip
    hs, ht, w, mask = _inputs(1)
    clip = 0.02 if mode == "entry" else pick_clip(topk_tail_divergence(
        hs.double() @ w.double().T, ht.double() @ w.double().T, top_k=5, divergence=divergence, beta=beta,
        temperature=1.1))  # position mode: a clip between two tokens' divergences
    want = _reference(hs, ht, w, mask / 40.0, divergence=divergence, beta=beta, tau=1.1, clip=clip, mode=mode,
                      support=("student_topk_tail", 5))
    assert 0 < want[3].sum() < T * 6
    hs_, w_ = hs.clone().requires_grad_(), w.clone().requires_grad_()
    loss, m = rosd_loss(hs_, ht, w_, mask, 40.0, loss="topk_tail", top_k=5, divergence=divergence, beta=beta,
                        temperature=1.1, token_clip=clip, token_clip_mode=mode)
    loss.backward()
    _rel(loss.detach(), want[0])
    _rel(hs_.grad, want[1])
    _rel(w_.grad, want[2])
    torch.testing.assert_close(m["clipped_entry_frac_sum"].double(), (want[3] * mask).sum() / 6)
    torch.testing.assert_close(m["clipped_mass_sum"].double(), (want[4] * mask).sum(), rtol=1e-5, atol=1e-7)


def test_copsd_loss_clip_metrics_and_mode():
    from copsd_kernels import reference as ref
    hs, ht, w, mask = _inputs(2)
    probe = ref.fused_linear_divergence(hs.double(), ht.double(), w.double(), temperature=1.1, token_clip=0.01)
    loss_e, m = copsd_loss(hs, ht, w, mask, 30.0, temperature=1.1, token_clip=0.01)
    loss_p, m_p = copsd_loss(hs, ht, w, mask, 30.0, temperature=1.1, token_clip=0.01, token_clip_mode="position")
    md = mask.double()
    torch.testing.assert_close(m["clipped_entry_frac_sum"].double(), (probe.clipped_count * md).sum() / V)
    torch.testing.assert_close(m["clipped_mass_sum"].double(), (probe.clipped_mass * md).sum(), rtol=1e-5, atol=1e-7)
    assert m["clipped_tokens"] == ((probe.clipped_count > 0).double() * md).sum()
    assert 0 < float(m["clipped_entry_frac_sum"]) < float(mask.sum())
    # position mode: a clipped position counts all its entries and all its mass
    per = m_p["per_token_divergence"]
    assert m_p["clipped_tokens"] == ((per > 0.01).float() * mask).sum() == m_p["clipped_entry_frac_sum"]
    assert not torch.allclose(loss_e, loss_p)
    _, m0 = copsd_loss(hs, ht, w, mask, 30.0)
    assert m0["clipped_entry_frac_sum"] == 0 and m0["clipped_mass_sum"] == 0


def test_config_token_clip_mode():
    assert ObjectiveConfig().token_clip_mode == "entry"
    assert ObjectiveConfig(token_clip=0.05, token_clip_mode="position").token_clip_mode == "position"
    with pytest.raises(ValueError, match="objective.token_clip_mode"):
        ObjectiveConfig(token_clip_mode="token")


def test_trainer_logs_clipped_share():
    from megatron_copsd.train_step import METRIC_KEYS
    from megatron_copsd.trainer import _derived_metrics
    m = {k: 0.0 for k in METRIC_KEYS}
    m.update(tokens=10.0, clipped_tokens=4.0, clipped_entry_frac_sum=0.5, clipped_mass_sum=2.0)
    out = _derived_metrics(m, "copsd")
    assert out["clip_fraction"] == 0.4 and out["clip_entry_fraction"] == 0.05 and out["clip_mass"] == 0.2
