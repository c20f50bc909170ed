"""Report rendering from a fixture of scored generations (Markdown, CSV, PNG plots) and the CLI."""
import csv
import random

import pytest

from megatron_copsd.eval.cli import main as eval_main
from megatron_copsd.eval.metrics import ScoredGeneration, write_scored_generations
from megatron_copsd.eval.report import write_report

LANGS = {"swa": 0.35, "hau": 0.15, "yor": 0.2, "eng": 0.7}


def fixture_records(seed=0, num_problems=8, num_samples=8):
    """base vs trained on math (4 languages) + one SciKnowEval domain; trained is better by construction."""
    rng = random.Random(seed)
    out = []
    for model, boost in (("base", 0.0), ("trained", 0.2)):
        for domain, langs in (("math", LANGS), ("chemistry", {"eng": 0.4})):
            for lang, p in langs.items():
                for j in range(num_problems):
                    q = min(1.0, p + boost + rng.uniform(-0.1, 0.1))
                    for i in range(-1, num_samples):
                        ok = rng.random() < q
                        fmt = ok or rng.random() < 0.6 + boost
                        ext = ("42" if ok else str(rng.randint(0, 3))) if fmt else None
                        out.append(ScoredGeneration(model=model, lang=lang, domain=domain, problem_id=f"p{j}",
                                                    sample_idx=max(i, 0), greedy=i < 0, response="...",
                                                    extracted=ext, correct=ok and fmt, formatted=fmt,
                                                    num_tokens=rng.randint(50, 400)))
    return out


def test_write_report_files_and_tables(tmp_path):
    recs = fixture_records()
    paths = write_report(recs, tmp_path / "rep", title="Fixture report")
    for key in ("csv", "markdown", "accuracy_png", "pass_png", "maj_png"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
        if key.endswith("png"):
            assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert paths[key].stat().st_size > 10_000  # a real figure, not an empty canvas
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 2 * (len(LANGS) + 1)  # per model x domain x language, never merged
    assert {"pass@8", "maj@8", "mean@1", "accuracy", "format_rate"} <= set(rows[0])
    by = {(r["model"], r["domain"], r["lang"]): r for r in rows}
    assert float(by[("trained", "math", "hau")]["pass@8"]) >= float(by[("trained", "math", "hau")]["pass@1"])
    md = paths["markdown"].read_text()
    assert md.startswith("# Fixture report") and "## math" in md and "## chemistry" in md
    assert "![accuracy_per_language](accuracy_per_language.png)" in md
    assert not list((tmp_path / "rep").glob("*.tmp"))


def test_greedy_only_report_has_no_curves(tmp_path):
    recs = [r for r in fixture_records(num_problems=3, num_samples=1) if r.greedy]
    paths = write_report(recs, tmp_path)
    assert "pass_png" not in paths and paths["accuracy_png"].is_file()
    with pytest.raises(ValueError, match="no records"):
        write_report([], tmp_path)


def test_cli_report(tmp_path, capsys):
    recs = fixture_records(num_problems=4, num_samples=4)
    base = tmp_path / "base.jsonl"
    trained = tmp_path / "trained.jsonl"
    write_scored_generations([r for r in recs if r.model == "base"], base)
    write_scored_generations([r for r in recs if r.model == "trained"], trained)
    out = tmp_path / "out"
    assert eval_main(["report", "--generations", str(base), str(trained), "--out", str(out), "--ks", "1,2,4"]) == 0
    assert (out / "report.md").is_file() and "pass@4" in (out / "metrics.csv").read_text()
    base.write_text('{"model": "x"}\n')
    assert eval_main(["report", "--generations", str(base), "--out", str(out)]) == 1
    assert "base.jsonl:1: field 'lang': missing" in capsys.readouterr().err


def test_cli_score_then_report(tmp_path, capsys):
    import json
    raw = tmp_path / "raw.jsonl"
    rows = []
    for i, (resp, gold) in enumerate([(r"... \boxed{2,125}", "2125"), ("no box", "7"), (r"\boxed{025}", "25")]):
        rows.append({"model": "base", "lang": "swa", "domain": "math", "problem_id": f"p{i}", "sample_idx": 0,
                     "greedy": True, "response": resp, "num_tokens": 5, "answer": gold})
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = tmp_path / "scored.jsonl"
    assert eval_main(["score", "--generations", str(raw), "--task", "math", "--out", str(scored)]) == 0
    from megatron_copsd.eval.metrics import read_scored_generations
    recs = read_scored_generations(scored)
    assert [(r.correct, r.formatted) for r in recs] == [(True, True), (False, False), (True, True)]
    raw.write_text(json.dumps({**rows[0], "answer": None}) + "\n")
    assert eval_main(["score", "--generations", str(raw), "--task", "math", "--out", str(scored)]) == 1
    assert "raw.jsonl:1: field 'answer'" in capsys.readouterr().err
