"""`copsd eval score` / `report`: raw generations -> scored records -> report, and bad rows named."""
import json

import pytest

from megatron_copsd.data.loaders import DataError
from megatron_copsd.eval.cli import main, score_file


def _raw(i, response, answer="42", lang="swa"):
    return {"model": "base", "lang": lang, "domain": "math", "problem_id": f"p{i}", "sample_idx": 0,
            "greedy": True, "response": response, "answer": answer, "num_tokens": 5}


def test_score_then_report(tmp_path):
    raw = tmp_path / "raw.jsonl"
    rows = [_raw(0, r"so \boxed{42}"), _raw(1, "no box 42"), _raw(2, r"\boxed{41}", lang="eng")]
    raw.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recs = score_file(raw, "math")
    assert [(r.correct, r.formatted) for r in recs] == [(True, True), (False, False), (False, True)]
    scored = tmp_path / "scored.jsonl"
    assert main(["score", "--generations", str(raw), "--task", "math", "--out", str(scored)]) == 0
    assert main(["report", "--generations", str(scored), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").read_text().count("swa") >= 1


def test_score_names_file_row_and_field(tmp_path):
    raw = tmp_path / "raw.jsonl"
    bad = _raw(1, r"\boxed{1}")
    del bad["answer"]
    raw.write_text(json.dumps(_raw(0, r"\boxed{42}")) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as e:
        score_file(raw, "math")
    msg = str(e.value)
    assert "raw.jsonl" in msg and "2" in msg and "answer" in msg
