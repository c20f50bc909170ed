"""Paired bootstrap confidence intervals for the difference between two methods on the same problems and seeds.

    d = correctness(records, "copsd", langs=["qge"]) - correctness(records, "grpo", langs=["qge"])   # [seeds, problems]
    ci = paired_bootstrap(d, num_resamples=10_000, seed=0)     # Interval(estimate, low, high, ...)
    rows = compare_methods(records, ["base", "copsd", "grpo"], target_langs=["qge", "qva"])

Design: every method is evaluated on the same problems, and every trained method is run with the same
trainer seeds, so the natural unit is the paired difference `d[s, p] = a[s, p] - b[s, p]` (greedy
correctness of problem p after training with seed s). The statistic is the mean of `d`. One bootstrap
resample draws the seeds and the problems independently with replacement (a crossed two-way bootstrap:
problems are a sample of the problem distribution, seeds a sample of training randomness), so the
interval reflects both sources of noise; with one seed it reduces to the usual paired bootstrap over
problems. The interval is the percentile interval of the resampled means.

Pairing across languages: a problem exists in every language (the same underlying problem rendered per
language), so a pooled "target languages" comparison averages each problem's correctness over the target
languages first and resamples underlying problems, which keeps the languages' correlation.

A method without seeds (the base model: label "base", no "-s<seed>") is paired with every seed of the other
method (its row is repeated). A winner is named only when the interval excludes 0.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Interval:
    """Mean paired difference and its bootstrap percentile interval."""

    estimate: float
    low: float
    high: float
    confidence: float
    num_seeds: int
    num_problems: int
    num_resamples: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def split_label(label: str) -> tuple[str, Optional[int]]:
    """'copsd-s3' -> ('copsd', 3); 'base' -> ('base', None)."""
    head, sep, tail = label.rpartition("-s")
    if sep and tail.isdigit():
        return head, int(tail)
    return label, None


def correctness(records: Iterable, method: str, langs: Sequence[str]) -> tuple[np.ndarray, list[Optional[int]], list[str]]:
    """Greedy correctness of `method` as a [seeds, problems] float array (the mean over `langs` per problem),
    with the seed list (None for a method without seeds) and the problem ids (sorted).

    Raises ValueError when a (seed, language) misses problems another has: pairing needs the same problems."""
    langs = list(langs)
    table: dict = defaultdict(dict)  # seed -> {(lang, problem_id): correct}
    for r in records:
        if not r.greedy or r.lang not in langs:
            continue
        m, s = split_label(r.model)
        if m == method:
            table[s][(r.lang, r.problem_id)] = float(r.correct)
    if not table:
        raise ValueError(f"no greedy records of method {method!r} in languages {langs}")
    seeds = sorted(table, key=lambda s: -1 if s is None else s)
    problems = sorted({p for t in table.values() for (_, p) in t})
    out = np.zeros((len(seeds), len(problems)))
    for i, s in enumerate(seeds):
        for j, p in enumerate(problems):
            vals = [table[s].get((lang, p)) for lang in langs]
            if any(v is None for v in vals):
                missing = [lang for lang, v in zip(langs, vals) if v is None]
                raise ValueError(f"method {method!r} seed {s}: problem {p!r} has no greedy record in {missing}")
            out[i, j] = sum(vals) / len(vals)
    return out, seeds, problems


def paired_bootstrap(diff: np.ndarray, *, num_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0,
                     resample_seeds: bool = True) -> Interval:
    """Percentile interval of the mean of `diff` ([seeds, problems], or [problems]) under resampling of
    problems (and of seeds when `resample_seeds` and there are several) with replacement."""
    d = np.asarray(diff, dtype=np.float64)
    if d.ndim == 1:
        d = d[None, :]
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"diff must be a non-empty [seeds, problems] array, got shape {np.shape(diff)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if num_resamples < 100:
        raise ValueError(f"num_resamples must be >= 100, got {num_resamples}")
    S, P = d.shape
    rng = np.random.default_rng(seed)
    # Multinomial counts instead of index draws: the mean over the resampled (seed, problem) grid is
    # c_s^T d c_p / (S P). Chunks of resamples bound the memory ([chunk, P] counts).
    chunk = max(1, min(num_resamples, 4_000_000 // P))
    stats = []
    for start in range(0, num_resamples, chunk):
        b = min(chunk, num_resamples - start)
        cp = rng.multinomial(P, np.full(P, 1.0 / P), size=b).astype(np.float64)  # [b, P]
        if resample_seeds and S > 1:
            cs = rng.multinomial(S, np.full(S, 1.0 / S), size=b).astype(np.float64)  # [b, S]
        else:
            cs = np.ones((b, S))
        stats.append(np.einsum("bp,bp->b", cs @ d, cp) / (S * P))
    stats = np.concatenate(stats)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return Interval(float(d.mean()), float(low), float(high), confidence, S, P, num_resamples)


def paired_difference(records: Sequence, a: str, b: str, langs: Sequence[str]) -> tuple[np.ndarray, list]:
    """d[s, p] = correctness(a) - correctness(b) on the problems both have, paired by seed (a method
    without seeds is repeated over the other's seeds); returns (d, seeds)."""
    xa, sa, pa = correctness(records, a, langs)
    xb, sb, pb = correctness(records, b, langs)
    if pa != pb:
        raise ValueError(f"methods {a!r} and {b!r} were evaluated on different problems ({len(pa)} vs {len(pb)})")
    if sa == [None] and sb != [None]:
        xa, sa = np.repeat(xa, len(sb), axis=0), sb
    elif sb == [None] and sa != [None]:
        xb, sb = np.repeat(xb, len(sa), axis=0), sa
    if sa != sb:
        common = [s for s in sa if s in sb]
        if not common:
            raise ValueError(f"methods {a!r} and {b!r} share no seed ({sa} vs {sb})")
        xa = xa[[sa.index(s) for s in common]]
        xb = xb[[sb.index(s) for s in common]]
        sa = common
    return xa - xb, sa


def compare_methods(records: Sequence, methods: Sequence[str], *, langs: Sequence[str],
                    target_langs: Sequence[str] = (), num_resamples: int = 10_000, confidence: float = 0.95,
                    seed: int = 0) -> list[dict]:
    """Every pair of methods (a before b in `methods`), per language and pooled over `target_langs`:
    {a, b, lang, diff, low, high, num_seeds, num_problems, winner} with winner = a, b or None (the
    interval contains 0)."""
    scopes = [(lang, [lang]) for lang in langs]
    if len(target_langs) > 1:
        scopes.append(("targets", list(target_langs)))
    rows = []
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            for name, ls in scopes:
                d, _ = paired_difference(records, a, b, ls)
                ci = paired_bootstrap(d, num_resamples=num_resamples, confidence=confidence, seed=seed)
                winner = (a if ci.estimate > 0 else b) if ci.excludes_zero else None
                rows.append(dict(a=a, b=b, lang=name, diff=ci.estimate, low=ci.low, high=ci.high,
                                 num_seeds=ci.num_seeds, num_problems=ci.num_problems, winner=winner))
    return rows


def method_intervals(records: Sequence, method: str, langs: Sequence[str], *, num_resamples: int = 10_000,
                     confidence: float = 0.95, seed: int = 0) -> Interval:
    """Accuracy of one method with its bootstrap interval (the same resampling, on correctness itself)."""
    x, _, _ = correctness(records, method, langs)
    return paired_bootstrap(x, num_resamples=num_resamples, confidence=confidence, seed=seed)
