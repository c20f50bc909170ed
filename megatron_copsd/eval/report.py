"""Evaluation report: Markdown + CSV tables and PNG plots from scored generations.

    from megatron_copsd.eval.report import write_report
    paths = write_report(records, "reports/swa", title="COPSD vs base")

Files: `report.md`, `metrics.csv` (one row per model x domain x language), `accuracy_per_language.png`
(grouped bars, one bar per model label, one panel per domain; greedy accuracy, or mean@1 when a group
has no greedy records), and `pass_at_k.png` / `maj_at_k.png` (curves over k, one line per model and
language, one panel per domain) when sampled records exist. Every file is written atomically.
"""
from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from megatron_copsd.eval.metrics import ScoredGeneration, compute_metrics


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if v <= 1.0 else f"{v:.1f}"
    return str(v)


def _columns(rows: Sequence[dict]) -> list[str]:
    base = ["model", "domain", "lang", "num_problems", "num_samples", "accuracy", "format_rate", "mean_length"]
    ks = sorted({int(c.split("@")[1]) for r in rows for c in r if "@" in c})
    return base + [f"{m}@{k}" for m in ("mean", "pass", "maj") for k in ks]


def _headline(row: dict):
    return row["accuracy"] if row["accuracy"] is not None else row.get("mean@1")


def save_figure(fig, path: Path) -> None:
    """Writes a matplotlib figure as PNG atomically (a reader never sees half a file) and closes it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, buf.getvalue())


def k_axis(ax, ks) -> None:
    """An x axis for metric@k curves: k on a log2 scale, ticks exactly at the measured k."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("k")


def _plot_accuracy(rows, models, domains, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(domains), 1, figsize=(max(6, 0.9 * max(
        len({r["lang"] for r in rows if r["domain"] == d}) for d in domains) * len(models) ** 0.5 + 2),
        3.4 * len(domains)), squeeze=False)
    width = 0.8 / len(models)
    for ax, dom in zip(axes[:, 0], domains):
        langs = sorted({r["lang"] for r in rows if r["domain"] == dom})
        for j, m in enumerate(models):
            vals = []
            for lang in langs:
                row = next((r for r in rows if (r["model"], r["domain"], r["lang"]) == (m, dom, lang)), None)
                v = _headline(row) if row else None
                vals.append(float("nan") if v is None else v)
            xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(langs))]
            bars = ax.bar(xs, vals, width=width, label=m)
            for b, v in zip(bars, vals):
                if v == v:  # skip NaN
                    ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom",
                            fontsize=7)
        ax.set_xticks(range(len(langs)), langs)
        ax.set_ylim(0, 1.08)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{dom}: accuracy per language")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, title="model")
    save_figure(fig, path)


def _plot_curves(rows, models, domains, metric: str, path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(f"{metric}@1" in r for r in rows):
        return False
    fig, axes = plt.subplots(1, len(domains), figsize=(6.2 * len(domains), 4.2), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, dom in zip(axes[0], domains):
        langs = sorted({r["lang"] for r in rows if r["domain"] == dom})
        # tab20 pairs neighbouring colours; use it only when tab10 runs out
        cmap = plt.get_cmap("tab10" if len(langs) <= 10 else "tab20")
        for li, lang in enumerate(langs):
            for mi, m in enumerate(models):
                row = next((r for r in rows if (r["model"], r["domain"], r["lang"]) == (m, dom, lang)), None)
                if row is None:
                    continue
                ks = sorted(int(c.split("@")[1]) for c in row if c.startswith(f"{metric}@"))
                if not ks:
                    continue
                ax.plot(ks, [row[f"{metric}@{k}"] for k in ks], styles[mi % len(styles)], marker="o",
                        markersize=3, color=cmap(li % cmap.N), label=f"{m} / {lang}")
        all_ks = sorted({int(c.split("@")[1]) for r in rows if r["domain"] == dom for c in r
                         if c.startswith(f"{metric}@")})
        k_axis(ax, all_ks)
        ax.set_ylabel(f"{metric}@k")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{dom}: {metric}@k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, handlelength=3.5, title="model / language", title_fontsize=7)
    save_figure(fig, path)
    return True


def write_report(records: Iterable[ScoredGeneration], out_dir, *, title: str = "Evaluation report",
                 ks: Sequence[int] | None = None) -> dict[str, Path]:
    """Writes the report files into `out_dir`; returns {name: path}."""
    records = list(records)
    if not records:
        raise ValueError("write_report: no records")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = compute_metrics(records, ks)
    models = list(dict.fromkeys(r.model for r in records))  # order of first appearance (e.g. base, trained)
    domains = sorted({r.domain for r in records})
    cols = _columns(rows)
    paths = {}

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    paths["csv"] = out_dir / "metrics.csv"
    _atomic_write(paths["csv"], buf.getvalue().encode())

    paths["accuracy_png"] = out_dir / "accuracy_per_language.png"
    _plot_accuracy(rows, models, domains, paths["accuracy_png"])
    for metric in ("pass", "maj"):
        p = out_dir / f"{metric}_at_k.png"
        if _plot_curves(rows, models, domains, metric, p):
            paths[f"{metric}_png"] = p

    md = [f"# {title}", "", f"{len(records)} scored generations; models: {', '.join(models)}; "
          f"domains: {', '.join(domains)}. Groups are per model, domain and language (never merged).", "",
          "accuracy = greedy; mean@k / pass@k (unbiased) / maj@k over sampled responses; format_rate = "
          "share of responses with a parsable final answer; mean_length in tokens.", ""]
    for dom in domains:
        drows = sorted((r for r in rows if r["domain"] == dom), key=lambda r: (r["lang"], models.index(r["model"])))
        dcols = [c for c in cols if c != "domain" and any(r.get(c) is not None for r in drows)]
        md += [f"## {dom}", "", "| " + " | ".join(dcols) + " |", "|" + "---|" * len(dcols)]
        md += ["| " + " | ".join(_fmt(r.get(c)) for c in dcols) + " |" for r in drows]
        md.append("")
    md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for k, p in paths.items() if k.endswith("png")] + [""]
    paths["markdown"] = out_dir / "report.md"
    _atomic_write(paths["markdown"], "\n".join(md).encode())
    return paths
