"""Reflection and teacher prompts: content, exact teacher wording, middle truncation keeps instructions."""
import pytest

from megatron_copsd.rosd.prompts import (EXPLANATION_PLACEHOLDER, KEY_IDEA_HEADER, QUOTE_PLACEHOLDER,
                                         SOLUTION_HEADER, TRUNCATION_MARKER, failed_reflection_prompt,
                                         success_reflection_prompt, teacher_prompt, truncate_middle)
from tests.unit.rosd_cases import CORRECT, FAILED, PROBLEM, tokenizer

INSTRUCTIONS_TAIL = "instead of only stating the result."


@pytest.fixture(params=["bpe", "sp"])
def tok(request):
    return tokenizer(request.param)


def test_failed_prompt_content(tok):
    p = failed_reflection_prompt(tok, PROBLEM, CORRECT, FAILED, gold_answer="38")
    assert p.ids == tok.encode(p.text)
    for part in (PROBLEM, CORRECT, FAILED, "## The correct final answer\n38", f"<error_quote>{QUOTE_PLACEHOLDER}"
                 "</error_quote>", f"<explanation>{EXPLANATION_PLACEHOLDER}</explanation>"):
        assert part in p.text
    # content first, then the format instructions right before the assistant turn
    assert p.text.index(FAILED) < p.text.index("## How to reply") < p.text.index(INSTRUCTIONS_TAIL)
    assert p.text.endswith("<|im_start|>assistant\n") or "<|im_start|>assistant\n" in p.text[-40:]
    assert p.truncated_fields == ()


def test_reflector_answer_switch(tok):
    p = failed_reflection_prompt(tok, PROBLEM, CORRECT, FAILED, gold_answer=None)
    assert "correct final answer" not in p.text and CORRECT in p.text


def _long(tag, n):
    return "\n".join(f"{tag} line {i}: we multiply 12 by 4 and keep going." for i in range(n))


def _base(tok, answer=None):
    """Prompt length with a one-character solution and response (the tiny tokenizers are not trained on
    the instruction wording, so the fixed part is long)."""
    return len(failed_reflection_prompt(tok, PROBLEM, "x", "y", gold_answer=answer).ids)


@pytest.mark.parametrize("extra", [200, 600])
def test_middle_truncation_keeps_instructions(tok, extra):
    budget = _base(tok, "38") + extra
    sol, resp = _long("SOL", 200), _long("RESP", 300)
    p = failed_reflection_prompt(tok, PROBLEM, sol, resp, gold_answer="38", max_prompt_tokens=budget)
    assert len(p.ids) <= budget and p.ids == tok.encode(p.text)
    assert set(p.truncated_fields) == {"solution", "response"}
    assert p.text.count(TRUNCATION_MARKER.strip()) == 2
    assert PROBLEM in p.text and "## The correct final answer\n38" in p.text
    assert f"<error_quote>{QUOTE_PLACEHOLDER}</error_quote>" in p.text and INSTRUCTIONS_TAIL in p.text
    # heads and tails survive
    for s in ("SOL line 0:", "RESP line 0:", "SOL line 199:", "RESP line 299:"):
        assert s in p.text
    assert "RESP line 150:" not in p.text
    # the budget is used, not wasted
    assert len(p.ids) >= budget - 40


def test_short_part_is_kept_whole(tok):
    resp = _long("RESP", 300)
    budget = _base(tok) + 400
    p = failed_reflection_prompt(tok, PROBLEM, CORRECT, resp, max_prompt_tokens=budget)
    assert CORRECT in p.text and p.truncated_fields == ("response",) and len(p.ids) <= budget


def test_problem_cut_only_as_last_resort(tok):
    long_problem = _long("PROB", 200)
    budget = _base(tok) + 150
    p = failed_reflection_prompt(tok, long_problem, _long("SOL", 100), _long("RESP", 100), max_prompt_tokens=budget)
    assert len(p.ids) <= budget and "problem" in p.truncated_fields and INSTRUCTIONS_TAIL in p.text


def test_budget_below_instructions_raises(tok):
    with pytest.raises(ValueError, match="max_prompt_tokens=64"):
        failed_reflection_prompt(tok, PROBLEM, CORRECT, FAILED, max_prompt_tokens=64)


def test_success_prompt(tok):
    p = success_reflection_prompt(tok, PROBLEM, CORRECT)
    assert CORRECT in p.text and "<explanation>" in p.text and "<error_quote>" not in p.text
    budget = len(success_reflection_prompt(tok, PROBLEM, "y").ids) + 150
    q = success_reflection_prompt(tok, PROBLEM, _long("RESP", 300), max_prompt_tokens=budget)
    assert len(q.ids) <= budget and q.truncated_fields == ("response",) and "</explanation>" in q.text


def test_teacher_prompt_exact(tok):
    sys_prompt = "Answer inside <answer></answer>."
    t = teacher_prompt(tok, PROBLEM, explanation="Multiply 12 by 4 to get 48, then subtract 10.",
                       system_prompt=sys_prompt, assistant_prefix="Let me think.")
    user = (f"{PROBLEM}\n\n{KEY_IDEA_HEADER}\nMultiply 12 by 4 to get 48, then subtract 10.\n\n"
            "Using this idea, solve the question above correctly, reasoning step by step on your own.")
    assert KEY_IDEA_HEADER == "The key idea to solve the question:"
    msgs = [{"role": "system", "content": sys_prompt}, {"role": "user", "content": user}]
    assert t.text == tok.apply_chat(msgs) + "Let me think."
    assert t.ids == tok.encode_chat(msgs, assistant_prefix="Let me think.")


def test_teacher_prompt_fallback_solution(tok):
    t = teacher_prompt(tok, PROBLEM, explanation="  ", fallback_solution=CORRECT)
    user = (f"{PROBLEM}\n\n{SOLUTION_HEADER}\n{CORRECT}\n\nUsing this solution as a guide, solve the question "
            "above correctly, reasoning step by step on your own.")
    assert t.text == tok.apply_chat([{"role": "user", "content": user}])
    with pytest.raises(ValueError, match="explanation or a fallback_solution"):
        teacher_prompt(tok, PROBLEM)


def test_truncate_middle_direct(tok):
    text = _long("X", 100)
    assert truncate_middle(tok, text, 10_000) == text
    cut = truncate_middle(tok, text, 60)
    head, tail = cut.split(TRUNCATION_MARKER)
    assert text.startswith(head) and text.endswith(tail) and head and tail
    assert len(tok.encode(cut)) <= 60 + 4  # seams may merge differently by a token or two
