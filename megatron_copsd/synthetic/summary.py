"""The benchmark's own report: methods side by side per language, with paired bootstrap 95% intervals.

Accuracy of each method is given with its interval (resampling problems and seeds); every pair of methods
gets the paired difference and its interval (`megatron_copsd.eval.stats`), per language and pooled over the
target languages, and a winner is named only where the interval excludes 0. The verdict (COPSD vs GRPO on
the target languages) follows the same rule. Then: the objective settings each method ran with, the share
of Latin-script answers to target-language prompts, and training curves (rollout accuracy and the share
of zero-advantage groups per step, with seed bands). The per-model Markdown/CSV/PNG details come from
`megatron_copsd.eval.report.write_report`.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Sequence

HEADLINE = ("accuracy", "format_rate")

# The recipe's measured history (seed 0 unless stated), so a reader of any report knows why the settings
# are what they are and what else was tried.
RECIPE_NOTES = (
    "Base corpus: with 2000 English and 150 teacher-layout documents per language the privileged-context "
    "teacher was no better than the student (greedy 0.21/0.10 vs 0.23/0.40 on qge/qva), so COPSD had "
    "nothing to distil; with 1200 English and 500 teacher-layout documents it is 0.85/0.90 vs 0.42/0.48.",
    "Pretraining batches: length-bucketed batches (one document kind per batch) trained a much weaker base "
    "(English 0.08) than mixed batches at the same steps (0.73-0.83); documents are now packed into rows "
    "with a block-diagonal causal mask.",
    "Trainer: at lr 3e-4 with rollout temperature 1.0 every method lost target-language accuracy in 16 "
    "steps (COPSD 0.42/0.48 -> 0.31/0.33, GRPO -> 0.27/0.13; sampled-token KL rose to 0.69/0.77); at lr 1e-4 "
    "with temperature 0.7 COPSD rose to 0.52/0.69 and GRPO to 0.42/0.56 (those runs used loss temperature "
    "1.0; the loss temperature now follows the rollout temperature). Without `--tune` every method runs at "
    "the mode's lr (1e-4) and its own default knob; with it, each method's lr and main knob are chosen on "
    "the dev split (the tuning table, when present).",
    "COPSD token clip, chosen on the dev split (quick budget, lr 1e-4, 128 dev problems per target language, "
    "greedy): without the clip 0.477 / 0.496 (seeds 0 / 1), with the reference's per-entry clip 0.05 0.141 / "
    "0.195. With the clip the clipped loss went negative and the unclipped divergence to the teacher rose "
    "(0.21 -> 0.38 in 16 steps), so `copsd` runs without it (loss temperature = sampling temperature, as the "
    "reference) and `copsd_ref` (in `--ablation`) runs the reference's settings as they are.",
)


def method_of(label: str) -> str:
    """'copsd-s1' -> 'copsd'; 'base' -> 'base'."""
    return label.rsplit("-s", 1)[0] if "-s" in label else label


def aggregate(rows: Sequence[dict]) -> dict:
    """{(method, lang): {metric: (mean, std, num_seeds)}} from `compute_metrics` rows (one per label)."""
    acc: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("num_problems", "num_samples"):
                acc[(method_of(r["model"]), r["lang"])][k].append(float(v))
    out = {}
    for key, metrics in acc.items():
        out[key] = {k: (statistics.fmean(v), statistics.pstdev(v) if len(v) > 1 else 0.0, len(v))
                    for k, v in metrics.items()}
    return out


def _cell(stat) -> str:
    if stat is None:
        return "-"
    mean, std, n = stat
    return f"{mean:.3f}" if n == 1 else f"{mean:.3f} ± {std:.3f}"


def verdict(comparisons: Sequence[dict], target_langs: Sequence[str], a: str = "copsd", b: str = "grpo") -> str:
    """One sentence on `a` vs `b` over the target languages, from the paired bootstrap interval: a winner
    only when the 95% interval of the difference excludes 0."""
    scope = "targets" if len(target_langs) > 1 else target_langs[0]
    row = next((r for r in comparisons if {r["a"], r["b"]} == {a, b} and r["lang"] == scope), None)
    if row is None:
        return f"{a} and {b} were not both run, so this report makes no claim about which is better."
    diff, lo, hi = row["diff"], row["low"], row["high"]
    if row["a"] != a:  # orient as a - b
        diff, lo, hi = -diff, -hi, -lo
    where = "the target languages (pooled)" if scope == "targets" else scope
    ci = (f"{a} - {b} = {diff:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}] ({row['num_seeds']} seed(s) x "
          f"{row['num_problems']} problems, paired bootstrap)")
    caveat = ("" if row["num_seeds"] > 1 else " With one seed the interval covers problem sampling only, not "
              "training randomness: run `--mode full` (5 seeds) before trusting an ordering.")
    if row["winner"] is None:
        return f"No winner on {where}: {ci} contains 0.{caveat}"
    return f"{row['winner']} wins on {where}: {ci} excludes 0.{caveat}"


def _ci(x) -> str:
    return f"{x.estimate:.3f} [{x.low:.3f}, {x.high:.3f}]"


def statistics_sections(records: Sequence, methods: Sequence[str], langs: Sequence[str],
                        target_langs: Sequence[str], *, num_resamples: int = 10_000) -> tuple[list[str], list[dict]]:
    """Markdown lines (accuracy with intervals, pairwise differences) and the comparison rows."""
    from megatron_copsd.eval.stats import compare_methods, method_intervals

    md = ["## Greedy accuracy with 95% intervals", "",
          "Mean over seeds and problems; interval: bootstrap over problems and seeds. `targets`: the target "
          "languages pooled per problem.", "", "| lang | " + " | ".join(methods) + " |",
          "|---|" + "---|" * len(methods)]
    scopes = [(lang, [lang]) for lang in langs] + ([("targets", list(target_langs))] if len(target_langs) > 1 else [])
    for name, ls in scopes:
        cells = [_ci(method_intervals(records, m, ls, num_resamples=num_resamples)) for m in methods]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    comparisons = compare_methods(records, methods, langs=langs, target_langs=target_langs,
                                  num_resamples=num_resamples)
    md += ["", "## Paired differences (a - b) with 95% intervals", "",
           "Same problems, same seeds; a winner is named only where the interval excludes 0.", "",
           "| a | b | lang | a - b | 95% CI | seeds x problems | winner |", "|---|---|---|---|---|---|---|"]
    for r in comparisons:
        md.append(f"| {r['a']} | {r['b']} | {r['lang']} | {r['diff']:+.3f} | [{r['low']:+.3f}, {r['high']:+.3f}] | "
                  f"{r['num_seeds']} x {r['num_problems']} | {r['winner'] or 'none (CI contains 0)'} |")
    return md + [""], comparisons


def analysis_sections(records: Sequence, methods: Sequence[str], target_langs: Sequence[str],
                      run_dirs: dict, out_dir: Path, *, script: bool = True) -> tuple[list[str], dict]:
    """Markdown lines for answer script (`script`: the targets are written in a non-Latin script) and
    training curves; returns (lines, files written)."""
    from megatron_copsd.synthetic.analysis import plot_learning_curves, script_rates, training_curves

    md = []
    if script:
        rates = script_rates(records, target_langs)
        md += ["## Answer script", "",
               "Share of greedy answers to target-language prompts written mostly in Latin script (English): the "
               "grader accepts them, so a method could gain by drifting to English.", "",
               "| lang | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for lang in target_langs:
            md.append(f"| {lang} | " + " | ".join(f"{rates[(m, lang)][0]:.3f}" if (m, lang) in rates else "-"
                                                 for m in methods) + " |")
        md.append("")
    files = {}
    curves = training_curves(run_dirs)
    acc, zero = curves.get("accuracy", {}), curves.get("zero_adv_share", {})
    if acc:
        md += ["## Training curves", "",
               "Per optimizer step, from each run's metrics.jsonl: rollout accuracy (sampled on training "
               "prompts) and the share of prompts whose samples all got the same reward (zero GRPO advantage). "
               "Mean over the run's steps, mean over seeds:", "",
               "| method | rollout accuracy, first step | last step | mean zero-advantage share |", "|---|---|---|---|"]
        for m in sorted(acc):
            first = sum(r[0] for r in acc[m]) / len(acc[m])
            last = sum(r[-1] for r in acc[m]) / len(acc[m])
            z = [v for r in zero.get(m, []) for v in r]
            md.append(f"| {m} | {first:.3f} | {last:.3f} | " + (f"{sum(z) / len(z):.3f}" if z else "-") + " |")
        md.append("")
        for key, runs, label in (("learning curves", acc, "rollout accuracy (moving average of 4 steps)"),
                                 ("zero-advantage share", zero, "share of zero-advantage groups")):
            name = key.replace(" ", "_").replace("-", "_") + ".png"
            path = plot_learning_curves(runs, out_dir / name, ylabel=label)
            if path is not None:
                files[key] = str(path)
                md.append(f"![{key}]({name})")
        md.append("")
    return md, files


ABLATION_REFERENCE = "copsd"


def ablation_table(comparisons: Sequence[dict], records: Sequence, methods: Sequence[str],
                   settings: dict, target_langs: Sequence[str], *, num_resamples: int = 10_000) -> list[str]:
    """Markdown lines: the divergence ablation (COPSD's forward KL, reverse KL, JSD, the sampled-token
    objective) on the target languages pooled, each row against `copsd` (forward KL) with its paired
    interval. Empty unless the run has `copsd` and at least one other COPSD divergence."""
    from megatron_copsd.eval.stats import method_intervals

    variants = [m for m in methods if m != "base"]
    others = [m for m in variants if m != ABLATION_REFERENCE
              and (settings.get(m) or {}).get("objective") == "copsd"]
    if ABLATION_REFERENCE not in variants or not others or not records:
        return []
    scope = "targets" if len(target_langs) > 1 else target_langs[0]
    md = ["## Divergence ablation", "",
          "Same budget, seeds and problems; the COPSD rows share the loss temperature and differ in the divergence "
          "(and the token clip where the loss column names one). Accuracy: greedy, target languages pooled, with its 95% interval; the "
          f"difference to `{ABLATION_REFERENCE}` (forward KL) is paired, a winner only where its interval excludes 0.",
          "", "| method | loss | accuracy (targets) | - copsd (forward KL) | 95% CI | winner |",
          "|---|---|---|---|---|---|"]
    for m in variants:
        s = settings.get(m) or {}
        loss = s.get("divergence", "") if s.get("objective") == "copsd" else s.get("objective", m)
        if s.get("objective") == "copsd" and s.get("token_clip") is not None:
            loss += f", token clip {s['token_clip']:g} ({s.get('token_clip_mode', 'entry')})"
        if s.get("objective") == "sampled_kl":
            loss = "sampled-token KL"
        acc = _ci(method_intervals(records, m, list(target_langs), num_resamples=num_resamples))
        if m == ABLATION_REFERENCE:
            md.append(f"| {m} | {loss} | {acc} | - | - | - |")
            continue
        row = next((r for r in comparisons if {r["a"], r["b"]} == {m, ABLATION_REFERENCE} and r["lang"] == scope), None)
        if row is None:
            continue
        diff, lo, hi = row["diff"], row["low"], row["high"]
        if row["a"] != m:  # orient as m - copsd
            diff, lo, hi = -diff, -hi, -lo
        diff, lo, hi = diff + 0.0, lo + 0.0, hi + 0.0  # no "-0.000"
        md.append(f"| {m} | {loss} | {acc} | {diff:+.3f} | [{lo:+.3f}, {hi:+.3f}] | "
                  f"{row['winner'] or 'none (CI contains 0)'} |")
    return md + [""]


def settings_table(settings: dict) -> list[str]:
    """Markdown lines: one row per method with the objective settings it ran with ('-': not applicable)."""
    if not settings:
        return []
    keys = list(dict.fromkeys(k for s in settings.values() for k in s if k != "objective"))

    def fmt(v) -> str:
        return "none" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))

    md = ["## Objective settings per method", "",
          "As the trainer resolved them (loss temperature `auto` = the rollout temperature); '-': does not apply.", "",
          "| method | " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for method, s in settings.items():
        md.append(f"| {method} | " + " | ".join(fmt(s[k]) if k in s else "-" for k in keys) + " |")
    reference = [m for m, s in settings.items() if s.get("objective") == "copsd" and s.get("token_clip") == 0.05
                 and s.get("token_clip_mode") == "entry" and s.get("loss_temperature") == s.get("rollout_temperature")]
    if reference:
        md += ["", "COPSD reference settings (per-entry token clip 0.05, loss temperature = sampling temperature): "
               + ", ".join(reference) + "."]
    departures = [m for m, s in settings.items() if s.get("objective") == "copsd" and m not in reference]
    if departures:
        md += ["Departures from the reference settings: " + ", ".join(departures) + " (the notes below say how "
               "they were chosen)."]
    return md + [""]


def write_summary(rows: Sequence[dict], out_dir: Path, *, target_langs: Sequence[str], info: dict,
                  report_files: dict, records: Sequence = (), run_dirs: dict | None = None,
                  num_resamples: int = 10_000) -> Path:
    """Writes `summary.md` and `summary.json` in `out_dir`; returns the Markdown path. `records`: the scored
    generations (for the intervals and the script metric); `run_dirs`: label -> trainer run folder (curves)."""
    agg = aggregate(rows)
    methods = list(dict.fromkeys(method_of(r["model"]) for r in rows))
    langs = list(dict.fromkeys(r["lang"] for r in rows))
    stats_md, comparisons = statistics_sections(records, methods, langs, target_langs,
                                                num_resamples=num_resamples) if records else ([], [])
    word = verdict(comparisons, target_langs)
    languages = info.get("languages") or ("target languages are *synthetic* constructed languages written in the "
                                          "Ge'ez (qge) and Vai (qva) scripts (see megatron_copsd/synthetic/languages.py)")
    md = [f"# Crosslingual benchmark ({info.get('mode')} mode)", "",
          f"Problems: seeded multi-step arithmetic word problems; {languages}, "
          "English (eng) is the high-resource language. Every method: same base model, training problems, "
          f"seeds {list(info.get('seeds', []))} and rollout budget ({info.get('budget')}). "
          f"Eval: {info.get('num_eval', '?')} problems per language from the generator's eval split (never "
          "trained on).", "", "**Verdict:** " + word, ""]
    if info.get("teacher_greedy_accuracy"):
        md += ["COPSD teacher check (base model, teacher prompt with the English problem and solution, greedy): "
               + ", ".join(f"{k} {v:.3f}" for k, v in info["teacher_greedy_accuracy"].items())
               + ". COPSD can only help where this teacher is better than the base student.", ""]
    md += stats_md
    ks = sorted({int(k.split("@")[1]) for r in rows for k in r if k.startswith("pass@")})
    metrics = list(HEADLINE) + ([f"pass@{ks[-1]}", f"maj@{ks[-1]}"] if ks else [])
    for metric in metrics:
        md += [f"## {metric} (mean ± std over seeds)", "", "| lang | " + " | ".join(methods) + " |",
               "|---|" + "---|" * len(methods)]
        for lang in langs:
            md.append(f"| {lang} | " + " | ".join(_cell(agg.get((m, lang), {}).get(metric)) for m in methods) + " |")
        md.append("")
    md += settings_table(info.get("objective_settings") or {})
    if records:
        md += ablation_table(comparisons, records, methods, info.get("objective_settings") or {}, target_langs,
                             num_resamples=num_resamples)
    from megatron_copsd.synthetic.tuning import tuning_table

    md += tuning_table(info.get("tuning") or {})
    if records:
        analysis_md, plots = analysis_sections(records, methods, target_langs, run_dirs or {}, out_dir,
                                               script=info.get("script_metric", True))
        md += analysis_md
        report_files = {**report_files, **plots}
    at_k = []
    for metric in ("pass", "maj"):
        from megatron_copsd.synthetic.analysis import plot_at_k

        name = f"{metric}_at_k_per_method.png"
        if plot_at_k(rows, metric, langs, out_dir / name) is not None:
            report_files = {**report_files, f"{metric}@k per method": str(out_dir / name)}
            at_k.append(f"![{metric}@k per method]({name})")
    if at_k:
        md += ["## pass@k and maj@k per method", "",
               "Sampled answers (eval temperature) on the first problems of each language; mean over seeds, one "
               "panel per language.", ""] + at_k + [""]
    cpu = info.get("cpu_seconds", {})
    md += ["## Notes: what was tried", ""] + [f"- {n}" for n in RECIPE_NOTES] + [""]
    md += ["## Timing", "", f"Wall seconds (CPU seconds of this process and its trainer runs); load average at the end "
           f"(1/5/15 min): {info.get('load_average', 'unknown')}. Other processes on the machine inflate wall time.", ""]
    md += [f"- {k}: {v:.0f} s" + (f" ({cpu[k]:.0f} CPU-s)" if k in cpu else "")
           for k, v in info.get("timings", {}).items()] + [""]
    md += ["## Files", ""] + [f"- {k}: `{v}`" for k, v in report_files.items()] + [""]
    path = out_dir / "summary.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(md), encoding="utf-8")
    tmp.replace(path)
    js = {"info": info, "verdict": word, "comparisons": comparisons,
          "aggregate": [{"method": m, "lang": l, **{k: {"mean": v[0], "std": v[1], "num_seeds": v[2]}
                                                     for k, v in stats.items()}}
                        for (m, l), stats in sorted(agg.items())]}
    tmpj = out_dir / "summary.json.tmp"
    tmpj.write_text(json.dumps(js, indent=2, default=str))
    tmpj.replace(out_dir / "summary.json")
    return path
