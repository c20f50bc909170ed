"""Training objectives as pure torch functions: tensors in, (loss, metrics) out.

No Megatron imports and no config reads; each module's docstring says where it differs from the papers.
Losses are already divided by the global valid-token count the caller passes; metrics are sums.
"""
from .copsd import copsd_loss
from .divergence import token_divergence, topk_divergence
from .grpo import group_advantages, grpo_loss
from .rosd import rosd_loss
from .sampled_kl import sampled_kl_loss
from .sft import sft_loss

__all__ = ["copsd_loss", "token_divergence", "topk_divergence", "group_advantages", "grpo_loss",
           "rosd_loss", "sampled_kl_loss", "sft_loss"]
