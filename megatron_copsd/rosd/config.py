"""The `rosd:` section of the trainer config (read only when `objective.name: rosd`).

    rosd:
      on_all_wrong: skip            # -> RosdSettings (groups.py) via RosdConfig.settings()
      reflection_max_new_tokens: 2048
      loss: full_vocab              # or topk_tail with top_k

Fields shared with the other objectives stay in `objective:` and mean the same there: `divergence` /
`beta` (the paper's JSD alpha; `divergence: auto` resolves to jsd for rosd), `temperature`,
`token_clip`, `teacher` (the paper: fixed = frozen initial model) and `tis_cap` (the per-token weight
`min(pi_train(y_t) / pi_rollout(y_t), tis_cap)`, detached; null turns it off).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from .groups import RosdSettings


def _fail(name: str, msg: str) -> None:
    raise ValueError(f"config field rosd.{name}: {msg}")


@dataclass
class RosdConfig:
    on_all_wrong: str = "skip"
    """Groups without a correct rollout: `skip` drops them; `reference_solution` reflects on the failures with
    the example's reference solution (examples without one are still dropped, counted as
    rosd/groups_skipped_all_wrong_no_reference; SciKnowEval and ToolUse have none)."""
    on_all_correct: str = "distill_whole"
    """Groups without a wrong rollout: `distill_whole` reflects on every rollout and distills whole responses
    (the reference code dropped them silently); `skip` drops them (counted as rosd/groups_skipped_all_correct)."""
    on_no_quote: str = "whole"
    """Failed rollout whose error quote is missing or not found in the response: `whole` distills the whole
    response, `skip` leaves it out of the loss (counted as rosd/no_quote_distilled_whole / _skipped)."""
    reflector_sees_answer: bool = True
    """Show the gold final answer to a failed rollout's reflector (the paper does; the answer can then leak
    into the teacher context through the explanation)."""
    correct_solution_source: str = "sibling"
    """Correct solution shown to a failed rollout's reflector: `sibling` (a successful rollout of the group,
    round-robin) or `reference` (the example's reference solution, else a sibling)."""
    fuzzy_threshold: float = 0.75
    """Minimum similarity (1 - edit cost / quote length) accepted for a fuzzy quote match, in (0, 1]."""
    min_fuzzy_chars: int = 8
    """Normalized quotes shorter than this are only matched exactly / after normalization."""
    max_reflection_prompt_tokens: Optional[int] = 4096
    """Token budget of a reflection prompt; solutions / responses are shortened in the middle, the format
    instructions never (null: unlimited)."""
    max_teacher_prompt_tokens: Optional[int] = None
    """Token budget of a teacher prompt (explanation shortened in the middle; null: unlimited)."""
    reflection_enable_thinking: Optional[bool] = None
    """Chat-template thinking switch for reflection prompts (null: template default)."""
    accept_unclosed_tags: bool = True
    """Use a tag block cut off by the reflection length limit (no closing tag)."""
    reflection_max_new_tokens: int = 1024
    """Length limit of a generated reflection."""
    reflection_temperature: float = 1.0
    """Sampling temperature of reflections (0: greedy)."""
    reflection_top_p: float = 1.0
    """Nucleus mass of reflections; 1.0 disables."""
    loss: str = "full_vocab"
    """`full_vocab`: exact full-vocabulary divergence through the fused kernel (our default);
    `topk_tail`: the paper's student top-k tokens plus one tail bin (materializes logits chunk by chunk)."""
    top_k: int = 100
    """k of `loss: topk_tail` (the paper: 100); ignored for full_vocab."""
    log_group_decisions: bool = True
    """Print one line per step saying what happened to the groups (mixed / all-correct / all-wrong,
    skipped, quotes found) besides the rosd/* metrics."""

    def __post_init__(self) -> None:
        try:
            self.settings()
        except ValueError as e:  # RosdSettings names the field first: "on_all_wrong must be ..."
            name, _, msg = str(e).partition(" ")
            _fail(name, msg)
        if self.reflection_max_new_tokens < 1:
            _fail("reflection_max_new_tokens", f"must be >= 1, got {self.reflection_max_new_tokens!r}")
        if self.reflection_temperature < 0:
            _fail("reflection_temperature", f"must be >= 0, got {self.reflection_temperature!r}")
        if not 0 < self.reflection_top_p <= 1:
            _fail("reflection_top_p", f"must be in (0, 1], got {self.reflection_top_p!r}")
        if self.loss not in ("full_vocab", "topk_tail"):
            _fail("loss", f"must be one of ['full_vocab', 'topk_tail'], got {self.loss!r}")
        if self.top_k < 1:
            _fail("top_k", f"must be >= 1, got {self.top_k!r}")

    def settings(self) -> RosdSettings:
        """The pure per-group switches (megatron_copsd.rosd.groups.RosdSettings)."""
        names = {f.name for f in fields(RosdSettings)}
        return RosdSettings(**{k: getattr(self, k) for k in names})
