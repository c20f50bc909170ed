"""Tensor-parallel statistics exchange shared by the chunked and the Triton paths.

Each rank reduces its vocabulary shard to a few fp32 numbers per token; `gather_stats` all-gathers them
([T, k] -> [TP, T, k], rank order) and the `combine_*` functions merge them in that fixed order, so every
rank computes bitwise-identical per-token results. With `group=None` (or a group of one) nothing is sent.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def tp_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def gather_stats(stats: torch.Tensor, group) -> torch.Tensor:
    """[T, k] local statistics -> [TP, T, k] (one all_gather)."""
    if tp_size(group) == 1:
        return stats[None]
    parts = [torch.empty_like(stats) for _ in range(tp_size(group))]
    dist.all_gather(parts, stats.contiguous(), group=group)
    return torch.stack(parts, 0)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    if tp_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def shard_weights(lse_local: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(l^r - lse): each rank's share of the probability mass ([TP, T]); 0 for empty (-inf) shards."""
    return torch.exp(lse_local - lse[None]).nan_to_num(0.0)


def combine_kl(gathered: torch.Tensor, kind: str):
    """gathered [TP, T, 3] = (l_a, l_b, E) per rank, E = local E_p[b - a] (forward KL) or E_q[a - b]
    (reverse KL; for JSD E is unused). Returns (lse_a, lse_b, divergence or None)."""
    la, lb, e = gathered.unbind(-1)
    lse_a, lse_b = torch.logsumexp(la, 0), torch.logsumexp(lb, 0)
    if kind == "forward_kl":
        return lse_a, lse_b, (shard_weights(lb, lse_b) * e.nan_to_num(0.0)).sum(0) - lse_b + lse_a
    if kind == "reverse_kl":
        return lse_a, lse_b, (shard_weights(la, lse_a) * e.nan_to_num(0.0)).sum(0) - lse_a + lse_b
    return lse_a, lse_b, None


def combine_jsd(sums: torch.Tensor, beta: float):
    """sums [T, 4] = (sum p log p, sum q log q, sum M log M, sum q log M), already summed over ranks.
    Returns (JSD_beta, KL(q || M))."""
    spp, sqq, smm, sqm = sums.unbind(-1)
    return beta * spp + (1 - beta) * sqq - smm, sqq - sqm


def combine_logprob(gathered: torch.Tensor):
    """gathered [TP, T, 3] = (l_a, target logit or 0 if another rank owns it, local E_q[a]).
    Returns (lse, target logprob, entropy)."""
    la, ay, ea = gathered.unbind(-1)
    lse = torch.logsumexp(la, 0)
    mean_a = (shard_weights(la, lse) * ea.nan_to_num(0.0)).sum(0)
    return lse, ay.sum(0) - lse, lse - mean_a
