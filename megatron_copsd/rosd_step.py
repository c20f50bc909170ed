"""One ROSD step between grading and the Megatron passes: reflections -> masks + teacher prompts -> TrainItems.

    rosd = RosdStep(cfg.rosd, tok, seed=cfg.train.seed)
    rosd.warn_at_startup(train_examples)                                 # once
    items, stats, summary = rosd.make_items(engine, batch, rollouts, step)   # rollout rank only

Per prompt of the step (methods.md §2): the graded rollouts form a `RosdGroup` (the problem as the
student saw it, its system prompt, the example's reference solution / gold answer / domain);
`plan_group` decides the group's case and builds the reflection prompts; all reflection prompts of the
step go to the rollout engine in ONE generate call with the `rosd.reflection_*` sampling parameters
(current policy weights: the engine is synced after every optimizer step; seed derived from
(train.seed, step), so a resumed run draws the same reflections); `finalize_group` parses, localizes
and builds the teacher prompts. Every rollout with `distill=True` becomes a `TrainItem` with the
student prompt, its own teacher prompt, the response, the rollout log-probs and the per-token
`loss_mask` (1 on the distilled tokens [k, L)); rollouts that are not distilled (skipped groups,
`on_no_quote=skip`) give no item. The loss is then the global token mean over the masked-in tokens.

The rollout rank runs this and broadcasts (items, stats, summary), so every rank trains on identical
data (the reflection texts are sampled, so they cannot be recomputed elsewhere).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

from megatron_copsd.batching import TrainItem
from megatron_copsd.experience import PreparedExample, Rollout, rollout_stats
from megatron_copsd.rollout.types import SamplingParams
from megatron_copsd.rosd import (GroupResult, RosdGroup, RosdRollout, RosdStats, finalize_group, plan_group,
                                 reflection_prompt_ids, split_reflections, warn_on_settings)
from megatron_copsd.rosd.config import RosdConfig


def reflection_seed(seed: int, step: int) -> int:
    """Sampling seed of a step's reflections (distinct from the rollout seed of the same step)."""
    h = hashlib.sha256(f"rosd-reflection:{seed}:{step}".encode()).digest()
    return int.from_bytes(h[:7], "little")


def build_groups(batch: Sequence[PreparedExample], rollouts: Sequence[Rollout]) -> tuple[list[RosdGroup], list[list[int]]]:
    """One `RosdGroup` per prompt of the batch (rollouts in sampling order), and for each group the
    indices of its rollouts in `rollouts`."""
    members: list[list[int]] = [[] for _ in batch]
    for i, r in enumerate(rollouts):
        members[r.prompt_pos].append(i)
    groups = []
    for p, idx in zip(batch, members):
        ex = p.example
        sol = ex.solution_en if ex.solution_en and ex.solution_en.strip() else None
        groups.append(RosdGroup(
            problem=p.user_content or ex.problem, rollouts=[RosdRollout(rollouts[i].response_ids, rollouts[i].correct) for i in idx],
            system_prompt=p.system, reference_solution=sol, gold_answer=ex.answer, domain=ex.domain,
            assistant_prefix=p.assistant_prefix, enable_thinking=p.enable_thinking))  # as the student's prompt
    return groups, members


def items_from_results(batch: Sequence[PreparedExample], rollouts: Sequence[Rollout], results: Sequence[GroupResult],
                       members: Sequence[Sequence[int]]) -> list[TrainItem]:
    """TrainItems of the distilled rollouts: student prompt / ROSD teacher prompt / response / loss mask."""
    items = []
    for p, res, idx in zip(batch, results, members):
        for t in res.targets:
            if not t.distill:
                continue
            i = idx[t.rollout_index]
            r = rollouts[i]
            items.append(TrainItem(p.student_ids, list(t.teacher_prompt.ids), list(r.response_ids),
                                   rollout_logprobs=list(r.logprobs), index=i, loss_mask=[float(m) for m in t.mask]))
    return items


class RosdStep:
    """The ROSD settings of a run plus the per-step work (see the module docstring)."""

    def __init__(self, cfg: RosdConfig, tok, *, seed: int) -> None:
        self.cfg, self.tok, self.seed = cfg, tok, seed
        self.settings = cfg.settings()

    def warn_at_startup(self, examples) -> None:
        """`warn_on_settings` once: e.g. on_all_wrong=reference_solution on data without solutions."""
        has_ref = any(ex.solution_en and ex.solution_en.strip() for ex in examples)
        warn_on_settings(self.settings, data_has_reference_solutions=has_ref)

    def sampling(self, step: int) -> SamplingParams:
        c = self.cfg
        return SamplingParams(max_new_tokens=c.reflection_max_new_tokens, temperature=c.reflection_temperature,
                              top_p=c.reflection_top_p, n=1, stop_token_ids=tuple(self.tok.stop_token_ids),
                              seed=reflection_seed(self.seed, step))

    def reflect(self, engine, plans, step: int) -> tuple[list[list[str]], dict]:
        """Generates every reflection of the step in one call; texts regrouped per plan, and stats."""
        prompts = reflection_prompt_ids(plans)
        samples = engine.generate(prompts, self.sampling(step)) if prompts else []
        texts = [self.tok.decode(s[0].response_ids, skip_special_tokens=True) for s in samples]
        lens = [len(s[0].response_ids) for s in samples]
        stats = {"rosd/reflection_len": sum(lens) / len(lens) if lens else 0.0,
                 "rosd/reflection_truncated_frac": (sum(s[0].finish_reason == "length" for s in samples) / len(samples)
                                                    if samples else 0.0)}
        return split_reflections(plans, texts), stats

    def make_items(self, engine, batch: Sequence[PreparedExample], rollouts: Sequence[Rollout],
                   step: int) -> tuple[list[TrainItem], dict, str]:
        """(items, metrics, one-line summary of the groups) for one step; call on the rollout rank."""
        groups, members = build_groups(batch, rollouts)
        plans = [plan_group(self.tok, g, self.settings) for g in groups]
        per_plan, refl_stats = self.reflect(engine, plans, step)
        results = [finalize_group(self.tok, p, t, self.settings) for p, t in zip(plans, per_plan)]
        rstats = RosdStats()
        for res in results:
            rstats.add(res)
        items = items_from_results(batch, rollouts, results, members)
        stats = {**rollout_stats(rollouts), **rstats.metrics(), **refl_stats}
        return items, stats, f"step {step + 1}: {rstats.summary()}"
