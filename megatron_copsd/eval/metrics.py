"""Evaluation metrics over scored generations, grouped per (model, domain, language), never merged.

The scored-generation record (one JSON object per line, written by evaluation runs, read by
`read_scored_generations`):

    {"model": "base",            label of the model/checkpoint (the report compares labels)
     "lang": "swa",              language code (as in the registry; kept as written)
     "domain": "math",           task or SciKnowEval domain ("math", "biology", "tooluse", ...)
     "problem_id": "mgsm-17",    id of the problem (string)
     "sample_idx": 0,            index of the sample for this problem (0-based int; greedy uses 0)
     "greedy": false,            true for the greedy decode (accuracy), false for samples (@k metrics)
     "response": "...",          decoded response text
     "extracted": "18" | null,   the grader's extracted answer
     "correct": true, "formatted": true,   the grader's verdicts
     "num_tokens": 123}          response length in tokens

Metrics per group: `accuracy` (mean correctness of greedy records; None without any), over sampled
records `mean@k` (mean correctness of each problem's first k samples), `pass@k` (unbiased
estimator 1 - C(n-c, k)/C(n, k) per problem, computed as a product), `maj@k` (majority vote over the
first k extracted answers), and over all records `format_rate` and `mean_length`.

maj@k tie-breaking: answers are compared after normalization (numbers by value, so "1,000" and
"1000" vote together; other strings with whitespace collapsed). Samples without an extracted answer do
not vote. Among the answers with the most votes, the one seen first (lowest sample_idx) wins. A problem
with no votes counts as wrong.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from megatron_copsd.data.graders import normalize_number
from megatron_copsd.data.loaders import DataError, iter_json_records


@dataclass(frozen=True)
class ScoredGeneration:
    model: str
    lang: str
    domain: str
    problem_id: str
    sample_idx: int
    greedy: bool
    response: str
    extracted: str | None
    correct: bool
    formatted: bool
    num_tokens: int


_TYPES = {"model": str, "lang": str, "domain": str, "problem_id": str, "sample_idx": int, "greedy": bool,
          "response": str, "extracted": (str, type(None)), "correct": bool, "formatted": bool,
          "num_tokens": int}


def record_from_dict(obj, file="<record>", row: int | None = None) -> ScoredGeneration:
    """Validates one record (see the module docstring); DataError names file, row and field."""
    if not isinstance(obj, dict):
        raise DataError(file, row, None, f"expected a JSON object, got {type(obj).__name__}")
    for k, t in _TYPES.items():
        if k not in obj:
            raise DataError(file, row, k, "missing")
        v = obj[k]
        bad_bool = t is int and isinstance(v, bool)
        if bad_bool or not isinstance(v, t):
            raise DataError(file, row, k, f"expected {getattr(t, '__name__', 'string or null')}, got {v!r:.40}")
    if obj["sample_idx"] < 0 or obj["num_tokens"] < 0:
        raise DataError(file, row, "sample_idx" if obj["sample_idx"] < 0 else "num_tokens", "must be >= 0")
    for k in ("model", "lang", "domain", "problem_id"):
        if not obj[k].strip():
            raise DataError(file, row, k, "empty")
    return ScoredGeneration(**{k: obj[k] for k in _TYPES})


def read_scored_generations(path) -> list[ScoredGeneration]:
    """Reads and validates a scored-generation JSONL file (duplicates of a sample are an error)."""
    path = Path(path)
    out, seen = [], {}
    for i, obj in iter_json_records(path):
        r = record_from_dict(obj, path, i)
        key = (r.model, r.domain, r.lang, r.problem_id, r.greedy, r.sample_idx)
        if key in seen:
            raise DataError(path, i, "sample_idx", f"duplicate of line {seen[key]} for {key}")
        seen[key] = i
        out.append(r)
    return out


def write_scored_generations(records: Iterable[ScoredGeneration | dict], path) -> None:
    """Writes records as JSONL atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in records:
            d = asdict(r) if isinstance(r, ScoredGeneration) else asdict(record_from_dict(r))
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), as a product (no huge binomials)."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k)/C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def vote_key(extracted: str | None) -> str | None:
    if extracted is None or not extracted.strip():
        return None
    num = normalize_number(extracted)
    return f"#num:{num}" if num is not None else " ".join(extracted.split())


def majority_vote(samples: Sequence[ScoredGeneration]) -> ScoredGeneration | None:
    """The winning sample among `samples` (in sample order); None when nobody voted. Rule: module docstring."""
    counts: dict[str, int] = {}
    first: dict[str, ScoredGeneration] = {}
    for s in samples:
        key = vote_key(s.extracted)
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, s)
    if not counts:
        return None
    best = max(counts.values())
    # dicts keep insertion order = order of first appearance, so the first maximal key wins ties
    winner = next(k for k, v in counts.items() if v == best)
    return first[winner]


def default_ks(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if n >= 1 and ks[-1] != n:
        ks.append(n)
    return ks


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def group_metrics(records: Sequence[ScoredGeneration], ks: Sequence[int] | None = None) -> dict:
    """Metrics of one group of records (one model, domain and language)."""
    greedy = [r for r in records if r.greedy]
    by_problem: dict[str, list[ScoredGeneration]] = defaultdict(list)
    for r in records:
        if not r.greedy:
            by_problem[r.problem_id].append(r)
    for v in by_problem.values():
        v.sort(key=lambda r: r.sample_idx)
    problems = {r.problem_id for r in records}
    n_min = min((len(v) for v in by_problem.values()), default=0)
    ks = [k for k in (ks if ks is not None else default_ks(n_min)) if 1 <= k <= n_min]
    out = {"num_problems": len(problems), "num_samples": n_min,
           "accuracy": _mean(float(r.correct) for r in greedy),
           "format_rate": _mean(float(r.formatted) for r in records),
           "mean_length": _mean(r.num_tokens for r in records)}
    for k in ks:
        out[f"mean@{k}"] = _mean(_mean(float(s.correct) for s in v[:k]) for v in by_problem.values())
        out[f"pass@{k}"] = _mean(pass_at_k(len(v), sum(s.correct for s in v), k) for v in by_problem.values())
        out[f"maj@{k}"] = _mean(float(bool((w := majority_vote(v[:k])) and w.correct))
                                for v in by_problem.values())
    return out


def compute_metrics(records: Iterable[ScoredGeneration], ks: Sequence[int] | None = None) -> list[dict]:
    """One row per (model, domain, lang), sorted, each with `model`, `domain`, `lang` + `group_metrics`."""
    groups: dict[tuple[str, str, str], list[ScoredGeneration]] = defaultdict(list)
    for r in records:
        groups[(r.model, r.domain, r.lang)].append(r)
    return [{"model": m, "domain": d, "lang": l, **group_metrics(groups[(m, d, l)], ks)}
            for (m, d, l) in sorted(groups)]
