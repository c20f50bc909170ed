import math

import pytest
import torch

from megatron_copsd.objective import copsd_loss, group_advantages, grpo_loss, sampled_kl_loss, sft_loss
from megatron_copsd.objective.divergence import topk_divergence


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    a = group_advantages(r, 4, std_normalize=True, eps=1e-6)
    # group 1: mean 0.5, population std 0.5 -> +-0.5 / (0.5 + 1e-6); group 2: all equal -> 0
    expect = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (0.5 + 1e-6)
    torch.testing.assert_close(a, expect)
    b = group_advantages(r, 4, std_normalize=False)
    torch.testing.assert_close(b, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    a3 = group_advantages(torch.tensor([2.0, 0.0, 1.0]), 3)
    std = math.sqrt(2 / 3)
    torch.testing.assert_close(a3, torch.tensor([1 / (std + 1e-6), -1 / (std + 1e-6), 0.0]))
    with pytest.raises(ValueError):
        group_advantages(torch.ones(5), 2)


def test_grpo_clipped_loss_hand_computed():
    ratio = torch.tensor([1.5, 0.5, 1.0, 1.1, 0.5])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0])
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.0])
    lp = (old + ratio.log()).requires_grad_(True)
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])
    loss, m = grpo_loss(lp, old, adv, mask, 4.0, clip_eps_low=0.2, clip_eps_high=0.2)
    # per token -min(rho A, clip(rho) A): -1.2 (clipped), -0.5, +1.0, (masked), +0.8 (clipped: min(-0.5,-0.8))
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.0 + 0.8) / 4, abs=1e-6)
    assert m["clipped_tokens"].item() == 2 and m["tokens"].item() == 4
    loss.backward()
    # d/dlogp of -rho*A = -rho*A on unclipped tokens; 0 on clipped / masked ones
    torch.testing.assert_close(lp.grad, torch.tensor([0.0, -0.5, 1.0, 0.0, 0.0]) / 4)


def test_grpo_kl_and_tis():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    old = lp.detach().clone()
    ref = torch.tensor([-1.5, -1.0])
    roll = torch.tensor([-1.0 - math.log(4.0), -2.0 + math.log(2.0)])  # pi_train/pi_rollout = 4, 0.5
    adv = torch.tensor([1.0, -1.0])
    loss, m = grpo_loss(lp, old, adv, torch.ones(2), 2.0, ref_logprobs=ref, kl_coef=0.1,
                        rollout_logprobs=roll, tis_cap=2.0)
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    expect = ((-1.0 + 0.1 * k3[0]) * 2.0 + (1.0 + 0.1 * k3[1]) * 0.5) / 2
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    assert m["tis_weight_sum"].item() == pytest.approx(2.5)


def test_sampled_kl_gradient_is_reverse_kl_gradient():
    """E_{y~q}[grad of -A_y log q(y)] == grad KL(q||p) for a categorical q = softmax(theta)."""
    torch.manual_seed(0)
    theta = torch.randn(7, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(torch.randn(7, dtype=torch.float64), 0)
    logq = torch.log_softmax(theta, 0)
    exact = torch.autograd.grad((logq.exp() * (logq - logp)).sum(), theta, retain_graph=True)[0]
    # Exact expectation over the sampled token: enumerate every y with weight q(y) (detached).
    ys = torch.arange(7)
    loss, m = sampled_kl_loss(logq[ys], logp[ys], logq.detach().exp(), 1.0)
    est = torch.autograd.grad(loss, theta)[0]
    torch.testing.assert_close(est, exact)
    assert m["divergence_sum"].item() == pytest.approx((logq.exp() * (logq - logp)).sum().item())


def test_sampled_kl_value_and_mask():
    lq = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    lp = torch.tensor([-0.5, -3.0, -9.0])
    loss, _ = sampled_kl_loss(lq, lp, torch.tensor([1.0, 1.0, 0.0]), 2.0)
    # A = [0.5, -1.0]; loss = -(0.5 * -1 + -1 * -2) / 2
    assert loss.item() == pytest.approx(-(0.5 * -1.0 + -1.0 * -2.0) / 2)
    loss.backward()
    torch.testing.assert_close(lq.grad, torch.tensor([-0.25, 0.5, 0.0]))


def test_sft_loss():
    lp = torch.tensor([-1.0, -3.0, -2.0])
    loss, m = sft_loss(lp, torch.tensor([1.0, 0.0, 1.0]), 4.0)
    assert loss.item() == pytest.approx(0.75) and m["tokens"].item() == 2


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_copsd_loss_matches_naive_logits(divergence, beta):
    torch.manual_seed(1)
    t, h, v = 6, 8, 37
    hs = torch.randn(t, h, requires_grad=True)
    ht = torch.randn(t, h)
    w = torch.randn(v, h, requires_grad=True)
    mask = torch.tensor([1.0, 1, 0, 1, 1, 1])
    loss, m = copsd_loss(hs, ht, w, mask, 10.0, divergence=divergence, beta=beta, temperature=1.3)
    logq = torch.log_softmax(hs @ w.T / 1.3, -1)
    logp = torch.log_softmax(ht @ w.detach().T / 1.3, -1)
    if divergence == "forward_kl":
        div = (logp.exp() * (logp - logq)).sum(-1)
    elif divergence == "reverse_kl":
        div = (logq.exp() * (logq - logp)).sum(-1)
    else:
        logm = torch.logaddexp(logp + math.log(beta), logq + math.log(1 - beta))
        div = beta * (logp.exp() * (logp - logm)).sum(-1) + (1 - beta) * (logq.exp() * (logq - logm)).sum(-1)
    naive = (div * mask).sum() / 10.0
    torch.testing.assert_close(loss, naive, atol=1e-5, rtol=1e-5)
    g1 = torch.autograd.grad(loss, (hs, w))
    g2 = torch.autograd.grad(naive, (hs, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert m["divergence_sum"].item() == pytest.approx((div * mask).sum().item(), rel=1e-5)


def test_topk_divergence_full_k_equals_exact_and_clip():
    torch.manual_seed(2)
    hs, ht, w = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4), torch.randn(11, 4)
    full = copsd_loss(hs, ht, w, torch.ones(5), 5.0)[0]
    topk = copsd_loss(hs, ht, w, torch.ones(5), 5.0, teacher_top_k=11)[0]
    torch.testing.assert_close(full, topk, atol=1e-5, rtol=1e-5)
    res = topk_divergence(hs, ht, w, k=3, token_clip=1e-4, clip_mode="position")
    res.loss.backward()
    # position clip: every token's top-3 divergence exceeds the tiny clip -> no gradient flows
    assert (res.per_token > 1e-4).all() and hs.grad.abs().max().item() == 0.0
    res2 = topk_divergence(hs, ht, w, k=3, valid_vocab=9)
    assert torch.isfinite(res2.per_token).all()
