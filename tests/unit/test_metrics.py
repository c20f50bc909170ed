"""pass@k against closed forms, maj@k tie-breaking, grouping and the record reader."""
import json
import math
from itertools import combinations

import pytest

from megatron_copsd.data.loaders import DataError
from megatron_copsd.eval.metrics import (ScoredGeneration, compute_metrics, majority_vote, pass_at_k,
                                         read_scored_generations, write_scored_generations)


def rec(pid, idx, extracted, correct, *, model="base", lang="swa", domain="math", greedy=False, formatted=None,
        num_tokens=10):
    return ScoredGeneration(model=model, lang=lang, domain=domain, problem_id=pid, sample_idx=idx, greedy=greedy,
                            response="r", extracted=extracted, correct=correct,
                            formatted=extracted is not None if formatted is None else formatted,
                            num_tokens=num_tokens)


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 2 / 5),                       # pass@1 = c/n
    (5, 2, 2, 1 - 3 / 10),                  # C(3,2)/C(5,2) = 3/10
    (4, 1, 2, 1 - 3 / 6),                   # C(3,2)/C(4,2)
    (10, 3, 3, 1 - 35 / 120),               # C(7,3)/C(10,3)
    (5, 0, 3, 0.0), (5, 5, 1, 1.0), (5, 3, 3, 1.0),  # n-c < k -> 1
    (8, 1, 8, 1.0),
])
def test_pass_at_k_closed_forms(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_enumeration_and_comb():
    # the estimator equals the fraction of size-k subsets containing at least one correct sample
    samples = [1, 0, 0, 1, 0, 0, 0]
    for k in range(1, 8):
        subsets = list(combinations(range(7), k))
        frac = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(7, 2, k) == pytest.approx(frac, abs=1e-12)
    # large n stays finite and matches exact binomials
    n, c, k = 2000, 37, 64
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9)


def test_pass_at_k_validates():
    for args in ((3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)):
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(*args)


def test_majority_vote_ties_go_to_first_seen_answer():
    s = [rec("p", 0, "7", False), rec("p", 1, "5", True), rec("p", 2, "5", True), rec("p", 3, "7", False)]
    assert majority_vote(s).extracted == "7"  # 2-2 tie; "7" appeared first
    assert majority_vote(s[1:]).extracted == "5"
    assert majority_vote(list(reversed(s))).extracted == "7"  # reversed: "7" (idx 3) first again
    # numbers vote by value; missing answers do not vote
    s2 = [rec("p", 0, None, False), rec("p", 1, "1,000", True), rec("p", 2, "1000.0", True), rec("p", 3, "9", False)]
    assert majority_vote(s2).extracted == "1,000"
    assert majority_vote([rec("p", 0, None, False)]) is None


def test_compute_metrics_grouping_and_values():
    rs = []
    # problem a: samples correct pattern 1,0,0,1 ; problem b: 0,0,0,0 (no box on two)
    for i, (ext, ok) in enumerate([("3", True), ("4", False), ("4", False), ("3", True)]):
        rs.append(rec("a", i, ext, ok))
    for i, ext in enumerate(["1", None, None, "2"]):
        rs.append(rec("b", i, ext, False, num_tokens=30))
    rs += [rec("a", 0, "3", True, greedy=True), rec("b", 0, "1", False, greedy=True)]
    rs += [rec("a", 0, "3", True, greedy=True, lang="hau")]  # other language: separate row
    rs += [rec("a", 0, "3", False, greedy=True, model="trained")]
    rows = compute_metrics(rs)
    keys = [(r["model"], r["lang"]) for r in rows]
    assert keys == [("base", "hau"), ("base", "swa"), ("trained", "swa")]
    swa = rows[1]
    assert swa["num_problems"] == 2 and swa["num_samples"] == 4
    assert swa["accuracy"] == 0.5
    assert swa["mean@1"] == 0.5 and swa["mean@4"] == pytest.approx((0.5 + 0) / 2)
    assert swa["pass@2"] == pytest.approx((1 - 1 / 6 + 0) / 2)  # C(2,2)/C(4,2) = 1/6
    assert swa["pass@4"] == 0.5
    assert swa["maj@4"] == 1 / 2  # a: 3 vs 4 tie -> "3" first -> correct
    assert swa["maj@2"] == 1 / 2  # a: 3 vs 4 tie -> "3" first
    assert "maj@3" not in swa  # default ks: powers of two up to n
    assert compute_metrics(rs, ks=[3])[1]["maj@3"] == 0.0  # a: "4" wins 2-1
    assert swa["format_rate"] == pytest.approx(8 / 10)
    assert swa["mean_length"] == pytest.approx((4 * 10 + 4 * 30 + 2 * 10) / 10)
    assert "mean@1" not in rows[0] and rows[0]["accuracy"] == 1.0


def test_reader_validates_and_roundtrips(tmp_path):
    rs = [rec("a", 0, "3", True), rec("a", 1, None, False)]
    p = tmp_path / "s.jsonl"
    write_scored_generations(rs, p)
    assert read_scored_generations(p) == rs
    good = json.loads(p.read_text().splitlines()[0])
    cases = [({**good, "correct": "yes"}, "'correct': expected bool"),
             ({k: v for k, v in good.items() if k != "lang"}, "'lang': missing"),
             ({**good, "sample_idx": True}, "'sample_idx'"),
             ({**good, "sample_idx": -1}, "'sample_idx': must be >= 0"),
             ({**good, "extracted": 3}, "'extracted'"),
             ({**good, "model": " "}, "'model': empty")]
    for obj, msg in cases:
        p.write_text(json.dumps(good) + "\n" + json.dumps(obj) + "\n")
        with pytest.raises(DataError, match=f"s.jsonl:2: field {msg}"):
            read_scored_generations(p)
    p.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError, match="duplicate of line 1"):
        read_scored_generations(p)
    p.write_text("{oops\n")
    with pytest.raises(DataError, match=":1: invalid JSON"):
        read_scored_generations(p)
