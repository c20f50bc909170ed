"""Next-token cross-entropy on given texts (supervised fine-tuning / pretraining of small models).

    loss, metrics = sft_loss(logprobs, mask, num_global_tokens)

`logprobs` are the model's log-probs of the target tokens (from `fused_linear_logprobs`, so no logits are
materialised); one global token mean. Pure torch.
"""
from __future__ import annotations

import torch


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor, num_global_tokens: float) -> tuple[torch.Tensor, dict]:
    if num_global_tokens <= 0:
        raise ValueError(f"num_global_tokens must be > 0, got {num_global_tokens}")
    mask = mask.float()
    nll = -(logprobs.float() * mask)
    return nll.sum() / float(num_global_tokens), {"tokens": mask.sum(), "nll_sum": nll.detach().sum()}
