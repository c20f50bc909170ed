"""Top-k + tail-bin divergence and the truncated importance weight."""
import math

import pytest
import torch

from megatron_copsd.rosd.topk_tail import topk_tail_divergence, truncated_importance_weight

torch.set_num_threads(1)


def _full(s, t, divergence, beta):
    """Plain full-vocabulary divergences, written out independently (p teacher, q student)."""
    logq, logp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    p, q = logp.exp(), logq.exp()
    if divergence == "forward_kl":
        return (p * (logp - logq)).sum(-1)
    if divergence == "reverse_kl":
        return (q * (logq - logp)).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (logp - m.log())).sum(-1) + (1 - beta) * (q * (logq - m.log())).sum(-1)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
def test_all_bins_equals_full_divergence(divergence, beta):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 33, generator=g, dtype=torch.float64), torch.randn(7, 33, generator=g, dtype=torch.float64)
    got = topk_tail_divergence(s, t, top_k=33, divergence=divergence, beta=beta)
    torch.testing.assert_close(got.double(), _full(s, t, divergence, beta), rtol=1e-5, atol=1e-6)
    got = topk_tail_divergence(s, t, top_k=1000, divergence=divergence, beta=beta)  # k > V is clamped
    torch.testing.assert_close(got.double(), _full(s, t, divergence, beta), rtol=1e-5, atol=1e-6)


def test_topk_tail_by_hand():
    s = torch.tensor([[3.0, 1.0, 0.0, -1.0, 2.0]])
    t = torch.tensor([[0.0, 2.0, 1.0, 0.5, 1.0]])
    q, p = torch.softmax(s, -1)[0], torch.softmax(t, -1)[0]
    top = [0, 4]  # student's two most likely tokens
    rest = [1, 2, 3]
    qb = torch.stack([q[0], q[4], q[rest].sum()])
    pb = torch.stack([p[0], p[4], p[rest].sum()])
    m = 0.5 * pb + 0.5 * qb
    want = 0.5 * (pb * (pb / m).log()).sum() + 0.5 * (qb * (qb / m).log()).sum()
    got = topk_tail_divergence(s, t, top_k=len(top), divergence="jsd", beta=0.5)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # fewer bins lose information: the binned JSD is at most the full one
    assert got.item() <= _full(s.double(), t.double(), "jsd", 0.5).item() + 1e-9


def test_gradient_reaches_student_only_and_temperature():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 50, generator=g, requires_grad=True)
    t = torch.randn(5, 50, generator=g, requires_grad=True)
    out = topk_tail_divergence(s, t, top_k=10, temperature=2.0)
    out.sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    same = topk_tail_divergence(s.detach() / 2.0, t.detach() / 2.0, top_k=10)
    torch.testing.assert_close(out.detach(), same)
    # identical distributions: zero divergence
    assert topk_tail_divergence(s.detach(), s.detach(), top_k=10).abs().max().item() < 1e-6


def test_valid_vocab_drops_padding():
    s, t = torch.randn(3, 10), torch.randn(3, 10)
    padded_s = torch.cat([s, torch.full((3, 6), 50.0)], -1)  # huge padding logits would dominate if used
    padded_t = torch.cat([t, torch.zeros(3, 6)], -1)
    torch.testing.assert_close(topk_tail_divergence(padded_s, padded_t, top_k=4, valid_vocab=10),
                               topk_tail_divergence(s, t, top_k=4))


def test_input_checks():
    with pytest.raises(ValueError, match="top_k"):
        topk_tail_divergence(torch.zeros(2, 3), torch.zeros(2, 3), top_k=0)
    with pytest.raises(ValueError, match="equal"):
        topk_tail_divergence(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="divergence"):
        topk_tail_divergence(torch.zeros(2, 3), torch.zeros(2, 3), divergence="tv")


def test_truncated_importance_weight():
    train = torch.tensor([-1.0, -2.0, -0.1, -5.0], requires_grad=True)
    roll = torch.tensor([-1.0, -1.0, -3.0, -4.0])
    w = truncated_importance_weight(train, roll, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, math.exp(-1.0), 2.0, math.exp(-1.0)]))
    assert not w.requires_grad
    with pytest.raises(ValueError, match="shapes"):
        truncated_importance_weight(train, roll[:2])


def test_convention_matches_kernel_reference():
    # same divergence convention as the fused kernel (so switching loss options changes bins, not meaning)
    from copsd_kernels.reference import divergence_from_logits

    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 21, generator=g, dtype=torch.float64), torch.randn(4, 21, generator=g, dtype=torch.float64)
    for div, beta in [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]:
        torch.testing.assert_close(topk_tail_divergence(s, t, top_k=21, divergence=div, beta=beta).double(),
                                   divergence_from_logits(s, t, div, beta), rtol=1e-5, atol=1e-6)
