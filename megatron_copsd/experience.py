"""From examples to graded rollouts to `TrainItem`s: prompts, data order, generation, grading.

    prepared = prepare_examples(examples, tok, include_problem_en=True, include_reference_solution_en=True,
                                max_prompt_tokens=1024, with_teacher=True)
    sampler = PromptSampler(len(prepared), seed=1234, shuffle=True)       # state_dict() / load_state_dict()
    batch = [prepared[i] for i in sampler.next_indices(4)]
    rollouts = generate_and_grade(engine, batch, sampling, grader, tok)  # rank 0 only
    items, stats = make_train_items(batch, rollouts, objective="grpo", n=4, std_normalize=True)

Rollouts are produced on one rank and broadcast (`broadcast_object`) so every rank trains on identical
data; the per-step sampling seed is `step_seed(seed, step)`, so a resumed run draws the same samples.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_copsd.batching import TrainItem


@dataclass
class PreparedExample:
    example: Any  # data.loaders.Example
    student_ids: list[int]
    teacher_ids: list[int]
    user_content: str = ""
    """The student's user message as rendered (ROSD reuses it as the problem in its prompts)."""
    system: Optional[str] = None
    """The student's system message (SciKnowEval: the answer-format instruction), if any."""
    assistant_prefix: str = ""
    """Text pre-filled into the student's (and teacher's) assistant turn (`data.reasoning_prefix`), if any."""
    enable_thinking: Optional[bool] = None
    """The chat template's `enable_thinking` the prompts were rendered with (ROSD's teacher prompts reuse it)."""


@dataclass
class Rollout:
    """One graded sample, as broadcast from the rollout rank."""

    prompt_pos: int  # index in the step's prompt batch
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str
    correct: bool
    formatted: bool
    extracted: Optional[str]


def step_seed(seed: int, step: int) -> int:
    """Sampling seed of a step: a hash of (seed, step), stable across runs and resumes."""
    h = hashlib.sha256(f"copsd-rollout:{seed}:{step}".encode()).digest()
    return int.from_bytes(h[:7], "little")


def _given_prompt(tok, ex):
    """SciKnowEval / ToolUse: the row's prompt is the user message as given (it carries its own format
    instruction; the COPSD target-language instruction would ask for \\boxed{}), the row's system prompt if any."""
    from megatron_copsd.data.prompts import PromptIds

    system = ex.meta.get("system") or None
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": ex.problem}]
    ids = tok.encode_chat(msgs)
    return PromptIds(ids=ids, text=tok.apply_chat(msgs), prefix_start=len(ids), user_content=ex.problem), system


def prepare_examples(examples, tok, *, include_problem_en: bool, include_reference_solution_en: bool,
                     max_prompt_tokens: int, with_teacher: bool, data_format: str = "copsd",
                     reasoning_prefix: bool = False) -> tuple[list[PreparedExample], int]:
    """Renders student (and COPSD teacher) prompts; drops examples whose prompts exceed the limit.
    `data_format` "copsd": target-language problem + instruction; otherwise the row's own prompt.
    `reasoning_prefix`: both prompts open the assistant turn with the language's reasoning prefix (inside
    `<think>` where the tokenizer knows it); ValueError where a language or the template cannot honour it.
    Returns (prepared, number dropped)."""
    from megatron_copsd.data.prompts import (assistant_prefix, copsd_teacher_prompt, reasoning_prefix_mode,
                                             student_prompt)

    if reasoning_prefix and data_format != "copsd":
        raise ValueError(f"data.reasoning_prefix needs data.format copsd, got {data_format!r}")
    modes: dict[str, Optional[bool]] = {}
    out, dropped = [], 0
    for ex in examples:
        think = {}
        if reasoning_prefix:
            if ex.lang not in modes:
                modes[ex.lang] = reasoning_prefix_mode(tok, ex.lang)
            think = dict(use_reasoning_prefix=True, enable_thinking=modes[ex.lang])
        if data_format == "copsd":
            sp, system = student_prompt(tok, ex.lang, ex.problem, **think), None
        else:
            sp, system = _given_prompt(tok, ex)
        s = sp.ids
        t = s
        if with_teacher:
            tp = copsd_teacher_prompt(tok, ex.lang, ex.problem, ex.problem_en, ex.solution_en,
                                      include_problem_en=include_problem_en,
                                      include_reference_solution_en=include_reference_solution_en, **think)
            if tp.ids[tp.prefix_start:] != s[sp.prefix_start:]:  # cannot happen: both encode the same prefix
                raise AssertionError(f"student/teacher assistant prefixes differ for language {ex.lang!r}")
            t = tp.ids
        if max(len(s), len(t)) > max_prompt_tokens:
            dropped += 1
            continue
        prefix = assistant_prefix(tok, ex.lang, **think) if think else ""
        out.append(PreparedExample(ex, s, t, sp.user_content, system, prefix, think.get("enable_thinking")))
    return out, dropped


class PromptSampler:
    """Epoch-wise (optionally shuffled) order over the training prompts; resumable."""

    def __init__(self, num: int, *, seed: int, shuffle: bool = True) -> None:
        if num < 1:
            raise ValueError("no training examples left (check data.train_path, data.langs, data.max_prompt_tokens)")
        self.num, self.seed, self.shuffle = num, seed, shuffle
        self.epoch, self.pos = 0, 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.num))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_indices(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            order = self._order(self.epoch)
            take = min(k - len(out), self.num - self.pos)
            out += order[self.pos:self.pos + take]
            self.pos += take
            if self.pos == self.num:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "num": self.num}

    def load_state_dict(self, state: dict) -> None:
        if state["num"] != self.num:
            raise ValueError(f"resume: the checkpoint saw {state['num']} training prompts, this run has {self.num}")
        self.epoch, self.pos = state["epoch"], state["pos"]


def generate_and_grade(engine, batch: Sequence[PreparedExample], sampling, grader: Callable, tok) -> list[Rollout]:
    """Samples `sampling.n` responses per prompt and grades them (call on the rollout rank only)."""
    samples = engine.generate([p.student_ids for p in batch], sampling)
    out = []
    for pos, per_prompt in enumerate(samples):
        for s in per_prompt:
            text = tok.decode(s.response_ids, skip_special_tokens=True)
            g = grader(text, batch[pos].example.answer)
            out.append(Rollout(pos, list(s.response_ids), list(s.logprobs), s.finish_reason, text,
                               bool(g.correct), bool(g.formatted), g.extracted))
    return out


def broadcast_object(obj, src: int = 0):
    """`obj` from global rank `src` to every rank (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def make_train_items(batch: Sequence[PreparedExample], rollouts: Sequence[Rollout], *, objective: str, n: int,
                     std_normalize: bool = True) -> tuple[list[TrainItem], dict]:
    """Training items (empty responses dropped) and rollout statistics for the metrics."""
    from megatron_copsd.objective import group_advantages

    rewards = torch.tensor([1.0 if r.correct else 0.0 for r in rollouts])
    adv = group_advantages(rewards, n, std_normalize=std_normalize) if objective == "grpo" else torch.zeros(len(rollouts))
    items = []
    for i, (r, a) in enumerate(zip(rollouts, adv.tolist())):
        if not r.response_ids:
            continue
        p = batch[r.prompt_pos]
        items.append(TrainItem(p.student_ids, p.teacher_ids, r.response_ids, rollout_logprobs=r.logprobs,
                               advantage=a, index=i))
    stats = rollout_stats(rollouts)
    if n >= 2 and len(rollouts) % n == 0 and rollouts:
        # Groups whose samples all got the same reward: GRPO learns nothing from them (logged for every
        # objective, so a benchmark can show how sparse GRPO's signal would be on the same rollouts).
        groups = rewards.view(-1, n)
        zero = int((groups.max(1).values == groups.min(1).values).sum())
        stats["zero_adv_groups"] = zero
        stats["zero_adv_share"] = zero / groups.shape[0]
    return items, stats


def rollout_stats(rollouts: Sequence[Rollout]) -> dict:
    """Reward / format / length statistics of a step's graded rollouts (every objective logs these)."""
    num = max(1, len(rollouts))
    acc = sum(r.correct for r in rollouts) / num
    return {
        "reward": acc,
        "accuracy": acc,
        "format_rate": sum(r.formatted for r in rollouts) / num,
        "response_len": sum(len(r.response_ids) for r in rollouts) / num,
        "truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / num,
        "num_rollouts": len(rollouts),
    }


def sft_items(batch: Sequence[PreparedExample], tok) -> list[TrainItem]:
    """Supervised items: the student prompt followed by the example's reference solution and a stop token."""
    items = []
    stop = tok.stop_token_ids[0] if tok.stop_token_ids else tok.eos_token_id
    for i, p in enumerate(batch):
        sol = p.example.solution_en
        if not sol:
            raise ValueError(f"objective.name=sft needs solutions; example {p.example.id!r} has none")
        items.append(TrainItem(p.student_ids, p.student_ids, tok.encode(sol) + [stop], index=i))
    return items
