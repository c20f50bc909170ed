"""What every rollout engine speaks: sampling parameters in, samples out.

Log-prob convention (shared by the embedded engine, the SGLang client and the trainer): the log-prob
of a sampled token is `log_softmax(logits / temperature)[token]` over the *full* (unpadded) vocabulary,
before top-k / top-p truncation. That is what SGLang reports and what the trainer recomputes, so the
rollout/trainer log-prob gap is meaningful.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings for one generate call."""

    max_new_tokens: int = 256
    """Upper bound on response tokens per sample."""
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 disables."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation stops after emitting any of these (the EOS id is always a stop token)."""
    n: int = 1
    """Samples per prompt."""
    seed: int | None = None
    """Base seed; sample j of prompt i uses a generator derived from (seed, i, j) where supported."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


@dataclass
class Sample:
    """One sampled response."""

    prompt_index: int
    """Index of the prompt in the generate call."""
    response_ids: list[int]
    """Generated token ids, including the stop token if one ended the sample."""
    logprobs: list[float]
    """Engine's log-prob of each response token (see module docstring); len == len(response_ids)."""
    finish_reason: str
    """"stop" (EOS / stop token), "length" (max_new_tokens) or "abort"."""
    weight_version: int = 0
    """Version of the weights that produced this sample."""
    meta: dict = field(default_factory=dict)
    """Engine-specific extras (latency, cached tokens, ...)."""


@runtime_checkable
class RolloutEngine(Protocol):
    """Anything that turns token-id prompts into samples and accepts new weights."""

    @property
    def weight_version(self) -> int: ...

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Sample]]:
        """Returns, per prompt, `params.n` complete samples (never a partial batch)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new weights, given in Hugging Face parameter names, and tag later samples `version`."""
        ...

    def health(self) -> bool: ...
