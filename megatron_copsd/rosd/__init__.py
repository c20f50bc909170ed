"""ROSD: reflective, error-localized self-distillation (docs/methods.md section 2).

Pure, config-free pieces: `prompts` (reflection and teacher prompts with middle truncation), `parse`
(tag parsing), `localize` (quote -> response token index), `groups` (per-group decisions, masks,
counters) and `topk_tail` (the paper's top-k + tail-bin loss option and the importance weight).
"""
from .groups import (GroupPlan, GroupResult, ReflectionRequest, RolloutTarget, RosdGroup, RosdRollout,
                     RosdSettings, RosdStats, display_text, finalize_group, plan_group, reflection_prompt_ids,
                     split_reflections, warn_on_settings)
from .localize import LocalizeResult, localize_in_response, localize_quote, normalize_with_map
from .parse import Reflection, parse_reflection
from .prompts import (RosdPrompt, failed_reflection_prompt, success_reflection_prompt, teacher_prompt,
                      truncate_middle)
from .topk_tail import topk_tail_divergence, truncated_importance_weight

__all__ = [
    "GroupPlan", "GroupResult", "LocalizeResult", "Reflection", "ReflectionRequest", "RolloutTarget",
    "RosdGroup", "RosdPrompt", "RosdRollout", "RosdSettings", "RosdStats", "display_text", "failed_reflection_prompt",
    "finalize_group", "localize_in_response", "localize_quote", "normalize_with_map", "parse_reflection",
    "plan_group", "reflection_prompt_ids", "split_reflections", "success_reflection_prompt", "teacher_prompt", "topk_tail_divergence", "truncate_middle",
    "truncated_importance_weight", "warn_on_settings",
]
