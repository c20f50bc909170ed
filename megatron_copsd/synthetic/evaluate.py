"""Evaluates a checkpoint on the benchmark's held-out problems: greedy + sampled generations, graded.

    records = evaluate_checkpoint(hf_dir, examples, label="base", num_samples=8)

Generation runs on the embedded engine (`megatron_copsd.rollout.embedded.EmbeddedEngine`) with the
student prompt of each example's language (`megatron_copsd.data.prompts.student_prompt`); grading is
`megatron_copsd.data.graders.grade_math` (last balanced `\\boxed{}`; `EvalSettings.task` picks another
grader); the records are the eval layer's `ScoredGeneration`s, so `megatron_copsd.eval.metrics` / `report`
compute accuracy, format adherence, pass@k and maj@k per language.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch


@dataclass(frozen=True)
class EvalSettings:
    """How each checkpoint is evaluated (the same for every method and seed)."""

    num_samples: int = 8
    """Sampled responses per problem for pass@k / maj@k (plus one greedy)."""
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 72
    """Solutions of the easy families are ~40 tokens; the cap bounds runaway generations."""
    seed: int = 1234
    max_batch_size: int = 64
    sample_problems: Optional[int] = None
    """Sampled generations only for the first N problems of each language (None: all); greedy covers all.
    Keeps pass@k / maj@k affordable when the greedy eval set is large."""
    task: str = "math"
    """Grader (`megatron_copsd.data.graders`): math (last \\boxed{}) or math_number (box, else last number)."""


def evaluate_checkpoint(hf_dir: str | Path, examples: Sequence[dict], *, label: str,
                        settings: EvalSettings = EvalSettings(), teacher_prompt: bool = False,
                        log: Callable[[str], None] = print) -> list:
    """Scored generations (greedy sample_idx 0, then `num_samples` sampled) for every example.

    `teacher_prompt=True` generates from the COPSD teacher prompt (problem + English problem + English
    solution) instead: a diagnostic of how good the privileged-context teacher is before training."""
    from megatron_copsd.data.graders import get_grader
    from megatron_copsd.data.prompts import copsd_teacher_prompt, student_prompt
    from megatron_copsd.data.tokenizer import load_tokenizer
    from megatron_copsd.eval.metrics import ScoredGeneration
    from megatron_copsd.rollout.embedded import EmbeddedEngine
    from megatron_copsd.rollout.types import SamplingParams
    from megatron_copsd.synthetic.languages import register_synthetic_languages

    register_synthetic_languages()
    grade = get_grader(settings.task)
    t0 = time.time()
    tok = load_tokenizer(hf_dir)
    engine = EmbeddedEngine(str(hf_dir), eos_token_ids=tok.stop_token_ids, pad_token_id=tok.pad_token_id,
                            valid_vocab=tok.vocab_size, max_batch_size=settings.max_batch_size)
    if teacher_prompt:
        prompts = [copsd_teacher_prompt(tok, ex["lang"], ex["problem"], ex["problem_en"], ex["solution_en"]).ids
                   for ex in examples]
    else:
        prompts = [student_prompt(tok, ex["lang"], ex["problem"]).ids for ex in examples]
    everything = list(range(len(examples)))
    runs = [(True, everything, SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=0.0, n=1))]
    if settings.num_samples > 0:
        seen: dict = {}
        sampled = [i for i, ex in enumerate(examples)
                   if settings.sample_problems is None or _count(seen, ex["lang"]) < settings.sample_problems]
        runs.append((False, sampled, SamplingParams(max_new_tokens=settings.max_new_tokens,
                                                    temperature=settings.temperature, top_p=settings.top_p,
                                                    n=settings.num_samples, seed=settings.seed)))
    records = []
    with torch.inference_mode():
        for greedy, subset, params in runs:
            outs = engine.generate([prompts[i] for i in subset], params)
            for ex, samples in zip([examples[i] for i in subset], outs):
                for j, s in enumerate(samples):
                    text = tok.decode(s.response_ids, skip_special_tokens=True)
                    g = grade(text, ex["answer"])
                    records.append(ScoredGeneration(
                        model=label, lang=ex["lang"], domain=ex.get("domain", "math"), problem_id=str(ex["id"]).rsplit("-", 1)[0],
                        sample_idx=j, greedy=greedy, response=text, extracted=g.extracted, correct=bool(g.correct),
                        formatted=bool(g.formatted), num_tokens=len(s.response_ids)))
    n_sampled = len(runs[1][1]) if len(runs) > 1 else 0
    log(f"  evaluated {label}: {len(examples)} problems greedy, {n_sampled} x {settings.num_samples} samples "
        f"in {time.time() - t0:.0f}s")
    return records


def _count(seen: dict, key) -> int:
    """Returns how often `key` was seen before, and counts this one."""
    seen[key] = seen.get(key, 0) + 1
    return seen[key] - 1


def greedy_accuracy(records: Sequence, lang: str) -> float:
    """Greedy accuracy of one language (for progress lines and tests)."""
    xs = [r.correct for r in records if r.greedy and r.lang == lang]
    if not xs:
        raise ValueError(f"no greedy records for language {lang!r}")
    return sum(xs) / len(xs)
