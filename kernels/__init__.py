"""copsd_kernels: exact full-vocabulary divergence and log-probs from hidden states and a vocab-parallel
LM head, without [T, V] logits. See docs/kernels.md; implementations: triton (GPU), chunked (pure torch,
CPU / fallback), reference (naive float64, tests and benchmarks)."""
from .api import fused_linear_divergence, fused_linear_logprobs
from .types import DivergenceResult, LogprobResult

__all__ = ["fused_linear_divergence", "fused_linear_logprobs", "DivergenceResult", "LogprobResult"]
