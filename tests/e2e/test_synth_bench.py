"""The synthetic benchmark end to end, shortened: base model -> eval -> COPSD training -> eval -> report.

Uses the `smoke` mode (a smaller base model, a short COPSD run through the real trainer, real evaluation
with the embedded engine) and checks the report's structure and that training really moved the
target-language accuracy away from the base model's.
"""
from __future__ import annotations

import json

import pytest

from megatron_copsd.synthetic import run
from megatron_copsd.synthetic.presets import MODES

pytestmark = pytest.mark.e2e


def test_synth_bench_smoke(tmp_path):
    out = tmp_path / "bench"
    summary = run.bench(MODES["smoke"], out, tmp_path / "cache")

    # report structure: the eval layer's report + CSV + plots, and our side-by-side summary
    files = summary["files"]
    for key in ("summary", "metrics", "report", "scored generations", "base checkpoint"):
        assert key in files
    md = (out / "summary.md").read_text()
    assert "**Verdict:**" in md and "## accuracy" in md and "## format_rate" in md
    for lang in ("eng", "qge", "qva"):
        assert f"| {lang} |" in md
    assert (out / "report" / "report.md").is_file() and (out / "report" / "accuracy_per_language.png").is_file()
    js = json.loads((out / "summary.json").read_text())
    methods = {row["method"] for row in js["aggregate"]}
    assert methods == {"base", "copsd"}

    # the trained model was really evaluated and its target-language accuracy moved
    rows = {(r["model"], r["lang"]): r for r in summary["rows"]}
    for lang in ("qge", "qva"):
        assert rows[("base", lang)]["num_problems"] == rows[("copsd-s0", lang)]["num_problems"] > 0
    base_tgt = sum(rows[("base", lang)]["accuracy"] for lang in ("qge", "qva"))
    trained_tgt = sum(rows[("copsd-s0", lang)]["accuracy"] for lang in ("qge", "qva"))
    print(f"target-language accuracy (sum over qge, qva): base {base_tgt:.3f} -> COPSD {trained_tgt:.3f}")
    assert trained_tgt != base_tgt
    # the trainer wrote its per-step metrics
    metrics = (out / "runs" / "copsd-s0" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == MODES["smoke"].train.steps
