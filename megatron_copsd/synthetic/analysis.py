"""What the benchmark reports beyond accuracy: answer script, sparse-reward share, learning curves.

    rates = script_rates(records, ["qge", "qva"])          # {(method, lang): share of Latin-script answers}
    curves = training_curves({"copsd-s0": run_dir, ...})    # {metric: {method: [[value per step] per seed]}}
    plot_learning_curves(curves["accuracy"], out / "learning_curves.png")
    at_k = at_k_curves(rows, "pass")                        # {(method, lang): [(k, mean over seeds)]}
    plot_at_k(rows, "maj", ["eng", "qge", "qva"], out / "maj_at_k.png")

Script: the grader accepts an answer whatever language the reasoning is written in, so a method could gain
accuracy by drifting to English. The target languages are written in the Ge'ez and Vai blocks; a greedy
response counts as "Latin script" when more than half of its letters are Latin (English words, the
`\\boxed` markup excluded).

Curves come from each trainer run's `metrics.jsonl`: `accuracy` is the share of correct rollouts of the
step (sampled at the rollout temperature, on training prompts), `zero_adv_share` the share of prompts
whose samples all got the same reward (no GRPO signal).

pass@k / maj@k per method: the per-model rows of `megatron_copsd.eval.metrics.compute_metrics` (one per
seed) averaged over seeds, one panel per language, one line per method (the per-seed curves are in the
eval report).
"""
from __future__ import annotations

import json
import statistics
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from megatron_copsd.eval.report import k_axis, save_figure
from megatron_copsd.eval.stats import split_label

CURVE_METRICS = ("accuracy", "zero_adv_share")


def latin_share(text: str) -> float | None:
    """Share of the letters of `text` that are Latin script (None when it has no letters)."""
    text = text.replace("\\boxed", "")
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return None
    latin = sum(1 for c in letters if unicodedata.name(c, "").startswith("LATIN "))
    return latin / len(letters)


def script_rates(records: Iterable, langs: Sequence[str]) -> dict:
    """{(method, lang): (mean over seeds of the share of greedy answers in Latin script, num seeds)}."""
    per: dict = defaultdict(lambda: [0, 0])  # (label, lang) -> [latin, total]
    for r in records:
        if r.greedy and r.lang in langs:
            share = latin_share(r.response)
            per[(r.model, r.lang)][0] += int(share is not None and share > 0.5)
            per[(r.model, r.lang)][1] += 1
    by_method: dict = defaultdict(list)
    for (label, lang), (latin, total) in per.items():
        by_method[(split_label(label)[0], lang)].append(latin / total)
    return {k: (statistics.fmean(v), len(v)) for k, v in by_method.items()}


def training_curves(run_dirs: Mapping[str, str | Path], metrics: Sequence[str] = CURVE_METRICS) -> dict:
    """{metric: {method: [per-seed list of per-step values]}} from each run's metrics.jsonl (missing
    runs or metrics are skipped)."""
    out: dict = {m: defaultdict(list) for m in metrics}
    for label, run_dir in run_dirs.items():
        path = Path(run_dir) / "metrics.jsonl"
        if not path.is_file():
            continue
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        recs.sort(key=lambda r: r.get("step", 0))
        method = split_label(label)[0]
        for m in metrics:
            values = [float(r[m]) for r in recs if isinstance(r.get(m), (int, float))]
            if values:
                out[m][method].append(values)
    return {m: dict(v) for m, v in out.items()}


def curve_band(runs: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[float]]:
    """Per step: mean, min and max over seeds (steps beyond the shortest run are dropped)."""
    steps = min(len(r) for r in runs)
    cols = [[r[i] for r in runs] for i in range(steps)]
    return [statistics.fmean(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (per-step rollout accuracy of a few prompts is noisy)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_learning_curves(curves: Mapping[str, Sequence[Sequence[float]]], path: Path, *, ylabel: str,
                         window: int = 4) -> Path | None:
    """Mean over seeds (moving average of `window` steps) with a min-max band; None when no curves."""
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method, runs in sorted(curves.items()):
        mean, lo, hi = curve_band([smooth(r, window) for r in runs])
        steps = list(range(1, len(mean) + 1))
        ax.plot(steps, mean, label=f"{method} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        if len(runs) > 1:
            ax.fill_between(steps, lo, hi, alpha=0.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return path


def at_k_curves(rows: Sequence[dict], metric: str) -> dict:
    """{(method, lang): [(k, mean over seeds of metric@k, num seeds)]} from `compute_metrics` rows."""
    per: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        method = split_label(r["model"])[0]
        for key, v in r.items():
            if key.startswith(f"{metric}@") and isinstance(v, (int, float)):
                per[(method, r["lang"])][int(key.split("@")[1])].append(float(v))
    return {mk: [(k, statistics.fmean(v), len(v)) for k, v in sorted(ks.items())] for mk, ks in per.items()}


def plot_at_k(rows: Sequence[dict], metric: str, langs: Sequence[str], path: Path) -> Path | None:
    """One panel per language, `metric`@k against k per method (mean over seeds); None without samples."""
    curves = at_k_curves(rows, metric)
    langs = [lang for lang in langs if any(lg == lang for _, lg in curves)]
    if not langs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(m for m, _ in curves))
    fig, axes = plt.subplots(1, len(langs), figsize=(4.2 * len(langs), 3.8), squeeze=False, sharey=True)
    for ax, lang in zip(axes[0], langs):
        for method in methods:
            pts = curves.get((method, lang))
            if pts:
                seeds = max(n for _, _, n in pts)
                ax.plot([k for k, _, _ in pts], [v for _, v, _ in pts], marker="o", markersize=3,
                        label=f"{method} ({seeds} seed{'s' if seeds > 1 else ''})")
        ks = sorted({k for pts in curves.values() for k, _, _ in pts})
        k_axis(ax, ks)
        ax.set_title(f"{lang}: {metric}@k")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{metric}@k (mean over seeds)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return path
