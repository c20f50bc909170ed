"""GRPO baseline (methods.md §3): group-normalised advantages, clipped ratio, optional k3 KL and TIS.

    adv = group_advantages(rewards, group_size=n, std_normalize=True)     # [N] per rollout
    loss, metrics = grpo_loss(logprobs, old_logprobs, token_adv, mask, num_global_tokens, ...)

Per rollout i of a group: `A_i = (r_i - mean(r)) / (std(r) + eps)` (population std; `std_normalize=False`
keeps only the centring), the same for every token. Per token:
`-min(rho A, clip(rho, 1-eps_lo, 1+eps_hi) A)` with `rho = exp(logprobs - old_logprobs)`, plus
`kl_coef * k3` where `k3 = exp(ref - logp) - (ref - logp) - 1`, and the whole token term multiplied by the
truncated importance weight `min(exp(old_logprobs - rollout_logprobs), C)` (detached) when `tis_cap` is
set. Differences from common implementations: one token mean over the *global* batch (not per
sequence, not per micro-batch); groups with identical rewards get zero advantage but stay in the token
count (no silent filtering).
Pure torch: no Megatron imports, no config reads.
"""
from __future__ import annotations

from typing import Optional

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, *, std_normalize: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """rewards [N] ordered group by group (N = num_groups * group_size) -> advantages [N]."""
    rewards = rewards.float()
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if std_normalize:
        centred = centred / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centred.reshape(-1)


def grpo_loss(
    logprobs: torch.Tensor,  # [T] current policy log-probs of the sampled tokens (differentiable)
    old_logprobs: torch.Tensor,  # [T] behaviour policy log-probs (trainer recompute before the update)
    advantages: torch.Tensor,  # [T] per-token advantage (the rollout's A_i broadcast)
    mask: torch.Tensor,  # [T]
    num_global_tokens: float,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    ref_logprobs: Optional[torch.Tensor] = None,  # [T]
    kl_coef: float = 0.0,
    rollout_logprobs: Optional[torch.Tensor] = None,  # [T]
    tis_cap: Optional[float] = None,
) -> tuple[torch.Tensor, dict]:
    if num_global_tokens <= 0:
        raise ValueError(f"num_global_tokens must be > 0, got {num_global_tokens}")
    mask = mask.float()
    logprobs = logprobs.float()
    old = old_logprobs.detach().float()
    adv = advantages.detach().float()
    ratio = torch.exp(logprobs - old)
    clipped_ratio = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    surr = torch.minimum(ratio * adv, clipped_ratio * adv)
    per_token = -surr
    is_clipped = (ratio * adv > clipped_ratio * adv).float()  # the clipped branch is active
    metrics = {"tokens": mask.sum(), "clipped_tokens": (is_clipped * mask).sum(),
               "ratio_sum": (ratio.detach() * mask).sum()}
    if kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        log_r = ref_logprobs.detach().float() - logprobs
        k3 = torch.exp(log_r) - log_r - 1.0
        per_token = per_token + kl_coef * k3
        metrics["kl_sum"] = (k3.detach() * mask).sum()
    if tis_cap is not None:
        if rollout_logprobs is None:
            raise ValueError("tis_cap needs rollout_logprobs")
        w = torch.exp(old - rollout_logprobs.detach().float()).clamp(max=tis_cap)
        per_token = per_token * w
        metrics["tis_weight_sum"] = (w * mask).sum()
    loss = (per_token * mask).sum() / float(num_global_tokens)
    return loss, metrics
