"""Group decisions: all-correct / all-wrong per settings, masks, teacher contexts, counters."""
import math

import pytest

from megatron_copsd.rosd.groups import (RosdGroup, RosdRollout, RosdSettings, RosdStats, finalize_group,
                                        plan_group)
from megatron_copsd.rosd.prompts import KEY_IDEA_HEADER, SOLUTION_HEADER
from tests.unit.rosd_cases import CORRECT, FAILED, PROBLEM, expected_token_index, tokenizer

ERR = FAILED.index("So the total")
REFERENCE = "4 boxes x 12 apples = 48 apples; 48 - 10 = 38. The answer is \\boxed{38}."


@pytest.fixture(scope="module")
def tok():
    return tokenizer("bpe")


def _group(tok, correct_flags, **kw):
    rolls = [RosdRollout(tok.encode(CORRECT if c else FAILED), c) for c in correct_flags]
    return RosdGroup(problem=PROBLEM, rollouts=rolls, gold_answer="38", system_prompt="Be brief.", **kw)


def _reflector(quote="So the  total is 12 × 4 = 46 apples", expl="Compute 12 x 4 = 48 first."):
    """Scripted reflection outputs per request kind."""
    def answer(req):
        if req.kind == "failed":
            q = "" if quote is None else f"<error_quote>{quote}</error_quote>\n"
            e = "" if expl is None else f"<explanation>{expl}</explanation>"
            return q + e
        return "" if expl is None else f"<explanation>Valid: {expl}</explanation>"
    return answer


def _run(tok, group, settings, reflector):
    plan = plan_group(tok, group, settings)
    texts = [reflector(r) for r in plan.requests]
    return plan, finalize_group(tok, plan, texts, settings)


def test_mixed_group_masks_and_teacher_prompts(tok):
    s = RosdSettings()
    plan, res = _run(tok, _group(tok, [True, False, False, True]), s, _reflector())
    assert plan.case == "mixed" and plan.action == "reflect"
    assert [r.kind for r in plan.requests] == ["success", "failed", "failed", "success"]
    # failed rollouts see successful siblings, round-robin
    assert [r.solution_source for r in plan.requests if r.kind == "failed"] == ["sibling:0", "sibling:3"]
    assert "## The correct final answer\n38" in plan.requests[1].prompt.text
    ids = tok.encode(FAILED)
    k = expected_token_index(tok, ids, ERR)
    assert k > 0
    for t in res.targets:
        L = len(tok.encode(CORRECT if t.correct else FAILED))
        assert t.num_tokens == L and t.distill and t.teacher_context == "explanation"
        if t.correct:
            assert t.mask == [1] * L
            assert f"{KEY_IDEA_HEADER}\nValid: Compute 12 x 4 = 48 first." in t.teacher_prompt.text
        else:
            assert t.distill_start == k and t.mask == [0] * k + [1] * (L - k)
            assert t.localization.method == "normalized"
            assert f"{KEY_IDEA_HEADER}\nCompute 12 x 4 = 48 first." in t.teacher_prompt.text
        assert t.teacher_prompt.text.startswith(tok.apply_chat([{"role": "system", "content": "Be brief."}])[:20])
    stats = RosdStats()
    stats.add(res)
    m = stats.metrics()
    assert m["rosd/quote_found_rate"] == 1.0 and m["rosd/reflection_parse_rate"] == 1.0
    assert m["rosd/failed_distilled_fraction"] == pytest.approx((len(ids) - k) / len(ids))
    assert m["rosd/train_accuracy/default"] == 0.5


@pytest.mark.parametrize("on_no_quote", ["whole", "skip"])
@pytest.mark.parametrize("quote", [None, "The bakery sold 250 croissants on Monday morning."])
def test_unmatched_quote_fallback(tok, on_no_quote, quote):
    s = RosdSettings(on_no_quote=on_no_quote)
    _, res = _run(tok, _group(tok, [True, False]), s, _reflector(quote=quote))
    t = res.targets[1]
    assert not t.correct and t.localization is not None and not t.localization.found
    if on_no_quote == "whole":
        assert t.distill and t.distill_start == 0 and t.mask == [1] * t.num_tokens
        assert t.teacher_prompt is not None
    else:
        assert not t.distill and t.mask == [0] * t.num_tokens and t.teacher_prompt is None
    stats = RosdStats()
    stats.add(res)
    m = stats.metrics()
    assert m["rosd/quote_found_rate"] == 0.0
    assert m[f"rosd/no_quote_{'distilled_whole' if on_no_quote == 'whole' else 'skipped'}"] == 1.0
    assert m["rosd/quote_parse_rate"] == (0.0 if quote is None else 1.0)


def test_no_explanation_falls_back_to_sibling_solution(tok):
    _, res = _run(tok, _group(tok, [True, False]), RosdSettings(), _reflector(expl=None))
    failed = res.targets[1]
    assert failed.teacher_context == "solution"
    assert f"{SOLUTION_HEADER}\n{CORRECT}" in failed.teacher_prompt.text
    assert KEY_IDEA_HEADER not in failed.teacher_prompt.text
    stats = RosdStats()
    stats.add(res)
    assert stats.metrics()["rosd/teacher_solution_fallback"] == 2.0


@pytest.mark.parametrize("on_all_correct", ["distill_whole", "skip"])
def test_all_correct_group(tok, on_all_correct):
    s = RosdSettings(on_all_correct=on_all_correct)
    plan, res = _run(tok, _group(tok, [True, True, True]), s, _reflector())
    assert plan.case == "all_correct"
    stats = RosdStats()
    stats.add(res)
    m = stats.metrics()
    if on_all_correct == "skip":
        assert plan.action == "skip" and plan.requests == [] and "on_all_correct=skip" in plan.reason
        assert not any(t.distill for t in res.targets) and m["rosd/groups_skipped_all_correct"] == 1.0
    else:
        assert plan.action == "reflect" and len(plan.requests) == 3
        assert all(t.distill and t.mask == [1] * t.num_tokens for t in res.targets)
        assert m["rosd/groups_all_correct"] == 1.0 and "rosd/groups_skipped_all_correct" not in m
    assert "all-correct 1" in stats.summary()


@pytest.mark.parametrize("on_all_wrong,reference", [("skip", REFERENCE), ("reference_solution", REFERENCE),
                                                    ("reference_solution", None)])
def test_all_wrong_group(tok, on_all_wrong, reference):
    s = RosdSettings(on_all_wrong=on_all_wrong)
    plan, res = _run(tok, _group(tok, [False, False], reference_solution=reference), s, _reflector())
    stats = RosdStats()
    stats.add(res)
    m = stats.metrics()
    assert plan.case == "all_wrong"
    if on_all_wrong == "reference_solution" and reference:
        assert plan.action == "reflect" and all(r.solution_source == "reference" for r in plan.requests)
        assert REFERENCE in plan.requests[0].prompt.text
        assert all(t.distill and t.distill_start > 0 for t in res.targets)
    else:
        assert plan.action == "skip" and not any(t.distill for t in res.targets)
        key = "groups_skipped_all_wrong" if reference else "groups_skipped_all_wrong_no_reference"
        assert m[f"rosd/{key}"] == 1.0
        assert ("no reference solution" in plan.reason) == (reference is None)
        assert math.isnan(m["rosd/quote_found_rate"])


def test_stop_tokens_are_not_pasted_into_prompts(tok):
    eos = tok.eos_token_id
    rolls = [RosdRollout(tok.encode(CORRECT) + [eos], True), RosdRollout(tok.encode(FAILED) + [eos], False)]
    g = RosdGroup(problem=PROBLEM, rollouts=rolls)
    plan, res = _run(tok, g, RosdSettings(), _reflector())
    end_turn = tok.decode([eos])
    assert plan.display_texts == [CORRECT, FAILED] and plan.response_texts[1] == FAILED + end_turn
    prompt = plan.requests[1].prompt
    assert prompt.text.count(end_turn) == tok.apply_chat([{"role": "user", "content": "x"}]).count(end_turn)
    t = res.targets[1]  # offsets still refer to the full response (stop token distilled too)
    assert t.num_tokens == len(rolls[1].response_ids) and t.mask[-1] == 1 and t.distill_start > 0


def test_reference_source_and_hidden_answer(tok):
    s = RosdSettings(correct_solution_source="reference", reflector_sees_answer=False)
    plan = plan_group(tok, _group(tok, [True, False], reference_solution=REFERENCE), s)
    req = plan.requests[1]
    assert req.solution_source == "reference" and REFERENCE in req.prompt.text
    assert "correct final answer" not in req.prompt.text


def test_per_domain_accuracy_and_length_check(tok):
    stats = RosdStats()
    for dom, flags in [("biology", [True, False]), ("physics", [False, False])]:
        _, res = _run(tok, _group(tok, flags, domain=dom), RosdSettings(), _reflector())
        stats.add(res)
    m = stats.metrics()
    assert (m["rosd/train_accuracy/biology"], m["rosd/train_accuracy/physics"]) == (0.5, 0.0)
    plan = plan_group(tok, _group(tok, [True, False]), RosdSettings())
    with pytest.raises(ValueError, match="reflection texts"):
        finalize_group(tok, plan, ["x"], RosdSettings())


def test_flatten_and_split_reflections(tok):
    from megatron_copsd.rosd.groups import reflection_prompt_ids, split_reflections

    plans = [plan_group(tok, _group(tok, f), RosdSettings()) for f in ([True, False], [False, False], [True])]
    ids = reflection_prompt_ids(plans)
    assert len(ids) == 3 and ids[0] == plans[0].requests[0].prompt.ids and ids[2] == plans[2].requests[0].prompt.ids
    assert split_reflections(plans, ["a", "b", "c"]) == [["a", "b"], [], ["c"]]
    with pytest.raises(ValueError, match="3 reflection requests"):
        split_reflections(plans, ["a"])


def test_settings_validation():
    with pytest.raises(ValueError, match="on_all_wrong"):
        RosdSettings(on_all_wrong="drop")
    with pytest.raises(ValueError, match="fuzzy_threshold"):
        RosdSettings(fuzzy_threshold=0.0)
