"""The synthetic benchmark end to end, shortened: base model -> eval -> COPSD training -> eval -> report.

Uses the `smoke` mode (a smaller base model, a short COPSD run through the real trainer, real evaluation
with the embedded engine) and checks the report's structure and that training really moved the
target-language accuracy away from the base model's.

Measured margin (seed 0, 1 CPU thread, torch 2.13 CPU): target-language greedy accuracy, mean over qge and
qva (2 x 48 problems), base 0.198 -> COPSD 0.271, i.e. +0.073 = 7 problems (qge +3, qva +4). The test
asks for a move of at least MIN_MOVE = 0.04 (4 problems) in either direction: a difference the base
model's own greedy decoding cannot produce (it is deterministic), with room for float differences on
other CPUs. Runtime: ~166 CPU-s (about 2.5-3 min on an idle 2-core machine; 5.5 min at load ~6).
"""
from __future__ import annotations

import json

import pytest

from megatron_copsd.synthetic import run
from megatron_copsd.synthetic.presets import MODES

pytestmark = pytest.mark.e2e

MIN_MOVE = 0.04


def test_synth_bench_smoke(tmp_path):
    out = tmp_path / "bench"
    summary = run.bench(MODES["smoke"], out, tmp_path / "cache")

    # report structure: the eval layer's report + CSV + plots, and our side-by-side summary
    files = summary["files"]
    for key in ("summary", "metrics", "report", "scored generations", "base checkpoint"):
        assert key in files
    md = (out / "summary.md").read_text()
    assert "**Verdict:**" in md and "## accuracy" in md and "## format_rate" in md
    assert "## Objective settings per method" in md and "| copsd |" in md
    for lang in ("eng", "qge", "qva"):
        assert f"| {lang} |" in md
    assert (out / "report" / "report.md").is_file() and (out / "report" / "accuracy_per_language.png").is_file()
    # pass@k / maj@k per method (mean over seeds, a panel per language) beside the accuracy and curves
    for metric in ("pass", "maj"):
        assert (out / f"{metric}_at_k_per_method.png").stat().st_size > 1000
        assert f"![{metric}@k per method]({metric}_at_k_per_method.png)" in md
    js = json.loads((out / "summary.json").read_text())
    methods = {row["method"] for row in js["aggregate"]}
    assert methods == {"base", "copsd"}

    # the trained model was really evaluated and its target-language accuracy moved
    rows = {(r["model"], r["lang"]): r for r in summary["rows"]}
    for lang in ("qge", "qva"):
        assert rows[("base", lang)]["num_problems"] == rows[("copsd-s0", lang)]["num_problems"] > 0
    # Greedy accuracy over both target languages (2 x 48 problems, so one problem is 0.0104).
    base_tgt = sum(rows[("base", lang)]["accuracy"] for lang in ("qge", "qva")) / 2
    trained_tgt = sum(rows[("copsd-s0", lang)]["accuracy"] for lang in ("qge", "qva")) / 2
    print(f"target-language greedy accuracy (mean of qge, qva): base {base_tgt:.3f} -> COPSD {trained_tgt:.3f}")
    assert abs(trained_tgt - base_tgt) >= MIN_MOVE, (base_tgt, trained_tgt)
    # the COPSD premise holds in the smoke base: the teacher prompt (English problem + solution) is measured
    assert set(js["info"]["teacher_greedy_accuracy"]) == {"qge", "qva"}
    # the trainer wrote its per-step metrics
    metrics = (out / "runs" / "copsd-s0" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == MODES["smoke"].train.steps
