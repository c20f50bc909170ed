"""Graders: boxed extraction, numeric normalization, MCQ letters, multi-call tool answers."""
import json

import pytest

from megatron_copsd.data.graders import (extract_last_boxed, extract_last_number, get_grader, grade_math,
                                         grade_math_number, grade_mcq, grade_tooluse, normalize_number,
                                         parse_tool_calls)


@pytest.mark.parametrize("text,expected", [
    (r"\boxed{\frac{a}{b^{2}}}", r"\frac{a}{b^{2}}"),
    (r"first \boxed{1}, finally \boxed{ {2} + {3} }", " {2} + {3} "),
    (r"\boxed{5} and a broken \boxed{6", "5"),  # unbalanced last one is ignored
    (r"\boxed {7}", "7"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    ("no answer here", None),
])
def test_extract_last_balanced_boxed(text, expected):
    assert extract_last_boxed(text) == expected


def test_boxed_far_from_the_end_is_found():
    # the reference code only looked at the last 100 characters
    resp = r"So the answer is \boxed{42}." + " Let me double-check everything once more." * 10
    assert grade_math(resp, "42") == grade_math(resp, "42.0")
    assert grade_math(resp, "42").correct


@pytest.mark.parametrize("pred,gold,correct", [
    ("2,125", "2125", True), ("2125", "2,125", True), ("1,234,567", "1234567", True),
    ("025", "25", True), ("25", "025", True), ("0025", "25", True), ("250", "025", False),
    ("18.0", "18", True), ("18.00", "18", True), ("18.5", "18", False),
    (r"\frac{1}{2}", "0.5", True), (r"\dfrac{3}{4}", "0.75", True), ("3/4", "0.75", True),
    (r"\frac{1}{3}", "0.33", False), (r"\$18", "18", True), (r"50\%", "50", True),
    (r"18 \text{ dollars}", "18", True), ("x = 5", "5", True), ("-3", "3", False),
    ("x+1", "1+x", True), (r"\sqrt{2}", r"\sqrt{2}", True), ("1,2", "12", False),
])
def test_math_equivalence(pred, gold, correct):
    g = grade_math(rf"reasoning ... \boxed{{{pred}}}", gold)
    assert g.formatted and g.correct is correct, (pred, gold, g)


def test_missing_or_empty_boxed_is_unformatted():
    for resp in ("The answer is 18.", r"\boxed{}", r"\boxed{ }", r"\boxed{18"):
        g = grade_math(resp, "18")
        assert not g.formatted and not g.correct


@pytest.mark.parametrize("resp,gold,correct,formatted,extracted", [
    # SmolLM2-135M's real answers (real-bench): no box, the number last
    ("Hugo has 8 shells.\n\nThe answer is 8 + 3 = 11.", "11", True, True, "11"),
    ("Ben has 7 seeds. 8 more seeds = 7 + 8 = 15 seeds\nBen has 15 seeds now.", "15", True, True, "15"),
    ("10\n\nThe answer is 10.", "17", False, True, "10"),
    ("Juma a 9 pierres de plus. Combien de pierres ?", "17", False, True, "9"),
    ("Hugo a des coquillages.", "11", False, False, None),
    # a box wins over later numbers; an empty box falls back to the last number
    ("So \\boxed{12}. Check: 5 + 7 = 13", "12", True, True, "12"),
    ("La réponse est \\boxed{}, soit 4.", "4", True, True, "4"),
    ("Total: 1,234 coins.", "1234", True, True, "1,234"),
    ("It is -3.", "-3", True, True, "-3"),
])
def test_math_number(resp, gold, correct, formatted, extracted):
    g = grade_math_number(resp, gold)
    assert (g.correct, g.formatted, g.extracted) == (correct, formatted, extracted)


def test_math_number_registered_and_no_digits():
    assert get_grader("math_number") is grade_math_number
    assert extract_last_number("no digits") is None


def test_normalize_number():
    assert normalize_number("1,000") == 1000 and normalize_number("007") == 7
    assert normalize_number(r"\frac{6}{4}") * 2 == 3 and normalize_number("abc") is None
    assert normalize_number(r"\frac{1}{0}") is None


@pytest.mark.parametrize("resp,gold,correct,formatted,extracted", [
    ("<reasoning>..</reasoning>\n<answer>\nB\n</answer>", "B", True, True, "B"),
    ("<answer>A</answer> no wait <answer>(C)</answer>", "C", True, True, "C"),
    ("<answer>D. 0.45</answer>", "D", True, True, "D"),
    ("<answer>D</answer>", "B", False, True, "D"),
    ("The answer is B.", "B", False, False, None),
    ("<answer>I think it is B</answer>", "B", False, False, "I think it is B"),
])
def test_mcq(resp, gold, correct, formatted, extracted):
    assert grade_mcq(resp, gold) == (grade_mcq(resp, gold).__class__)(correct, formatted, extracted)


NESTED_GOLD = json.dumps([
    {"Action": "search", "Action_Input": json.dumps({"q": "axolotl", "filters": {"color": ["wild", "albino"],
                                                                                   "page": {"n": 2}}})},
    {"Action": "getFacts", "Action_Input": "{}"},
    {"Action": "getFacts", "Action_Input": "{}"},
])


def test_tooluse_multi_call_nested_json():
    resp = ("Thought: search first\nAction: search\nAction Input: {\"filters\": {\"page\": {\"n\": 2}, "
            "\"color\": [\"wild\", \"albino\"]}, \"q\": \"axolotl\"}\nObservation: ...\n"
            "Thought: facts\nAction: getFacts\nAction Input: {}\nAction: getFacts\nAction Input: ```json\n{}\n```\n")
    g = grade_tooluse(resp, NESTED_GOLD)
    assert g.correct and g.formatted
    assert len(json.loads(g.extracted)) == 3


def test_tooluse_multiset_not_set_and_not_merged():
    once = "Action: search\nAction Input: {\"q\": \"axolotl\", \"filters\": {\"color\": [\"wild\", \"albino\"], " \
           "\"page\": {\"n\": 2}}}\nAction: getFacts\nAction Input: {}\n"
    assert not grade_tooluse(once, NESTED_GOLD).correct  # getFacts needed twice
    # arguments must belong to their own call: swapping them fails
    gold = json.dumps([{"Action": "a", "Action_Input": {"x": 1}}, {"Action": "b", "Action_Input": {"y": 2}}])
    swapped = "Action: a\nAction Input: {\"y\": 2}\nAction: b\nAction Input: {\"x\": 1}\n"
    right = "Action: b\nAction Input: {\"y\": 2}\nAction: a\nAction Input: {\"x\": 1}\n"
    assert not grade_tooluse(swapped, gold).correct and grade_tooluse(right, gold).correct


def test_tooluse_format_flags():
    gold = json.dumps([{"Action": "a", "Action_Input": "{}"}])
    assert grade_tooluse("I would call a.", gold) == (False, False, None) or \
        not grade_tooluse("I would call a.", gold).formatted
    bad = grade_tooluse("Action: a\nAction Input: {not json}\n", gold)
    assert not bad.formatted and not bad.correct
    no_input = parse_tool_calls("Action: a\nThought: hmm\n")
    assert no_input == ([], False)
    with pytest.raises(ValueError, match="gold"):
        grade_tooluse("Action: a\nAction Input: {}", "not json")


def test_get_grader():
    assert get_grader("math") is grade_math and get_grader("mcq") is grade_mcq
    assert get_grader("tooluse") is grade_tooluse
    with pytest.raises(ValueError, match="unknown grading task"):
        get_grader("code")


def test_real_tooluse_gold_answers_grade_themselves(shared_data):
    from megatron_copsd.data.loaders import load_tooluse
    for ex in load_tooluse(shared_data / "rosd" / "tooluse_test.json"):
        calls = json.loads(ex.answer)
        resp = "".join(f"Thought: t\nAction: {c['Action']}\nAction Input: {c['Action_Input'] if isinstance(c['Action_Input'], str) else json.dumps(c['Action_Input'])}\n"
                       for c in reversed(calls))
        assert grade_tooluse(resp, ex.answer).correct, ex.id


@pytest.fixture
def shared_data():
    from pathlib import Path
    d = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    if not (d / "rosd" / "tooluse_test.json").is_file():
        pytest.skip(f"real data not found at {d} (../shared/data next to the repo)")
    return d.resolve()
