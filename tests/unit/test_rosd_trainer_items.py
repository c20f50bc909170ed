"""ROSD trainer glue without Megatron: config section, per-step items from scripted reflections, loss.

The reflections come from a scripted engine (defined here) that answers each reflection prompt with a
fixed text, so the masks / teacher prompts / counters can be checked exactly."""
from pathlib import Path

import pytest
import torch

from megatron_copsd.batching import TrainItem, collate, num_response_tokens
from megatron_copsd.config import config_from_dict, load_config
from megatron_copsd.data.loaders import Example
from megatron_copsd.experience import Rollout, prepare_examples
from megatron_copsd.rollout.types import Sample
from megatron_copsd.rosd.config import RosdConfig
from megatron_copsd.rosd.prompts import KEY_IDEA_HEADER, SOLUTION_HEADER
from megatron_copsd.rosd_step import RosdStep
from tests.unit.rosd_cases import CORRECT, FAILED, PROBLEM, expected_token_index, tokenizer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


# ------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("name", ["rosd_sciknoweval_biology", "rosd_sciknoweval_physics", "rosd_tooluse"])
def test_rosd_examples_load_without_data(name):
    cfg = load_config(EXAMPLES / f"{name}.yaml")  # data files are checked at start-up, not here
    assert cfg.objective.name == "rosd" and cfg.objective.divergence == "jsd" and cfg.objective.beta == 0.5
    assert cfg.data.format in ("sciknoweval", "tooluse") and cfg.rosd.loss == "full_vocab"
    assert cfg.rosd.settings().on_all_correct == "distill_whole"


def test_divergence_auto_is_per_objective():
    assert config_from_dict({"objective": {"name": "rosd"}}).objective.divergence == "jsd"
    assert config_from_dict({}).objective.divergence == "forward_kl"
    assert config_from_dict({"objective": {"name": "rosd", "divergence": "reverse_kl"}}).objective.divergence == "reverse_kl"


@pytest.mark.parametrize("override,needle", [
    ("rosd.on_all_wrong=drop", "rosd.on_all_wrong"), ("rosd.on_all_correct=keep", "rosd.on_all_correct"),
    ("rosd.on_no_quote=x", "rosd.on_no_quote"), ("rosd.fuzzy_threshold=0", "rosd.fuzzy_threshold"),
    ("rosd.max_reflection_prompt_tokens=10", "rosd.max_reflection_prompt_tokens"),
    ("rosd.reflection_top_p=0", "rosd.reflection_top_p"), ("rosd.loss=topk", "rosd.loss"),
    ("rosd.top_k=0", "rosd.top_k"), ("rosd.reflection_max_new_tokens=0", "rosd.reflection_max_new_tokens"),
    ("data.format=csv", "data.format"), ("data.format=sciknoweval", "data.task"),
])
def test_bad_rosd_values_name_the_field(override, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        config_from_dict({}, [override])


# ------------------------------------------------------------------------------------------ items

class ScriptedEngine:
    """Answers every reflection prompt with `reply(prompt_text)`; records the prompts it saw."""

    def __init__(self, tok, reply):
        self.tok, self.reply, self.seen = tok, reply, []

    def generate(self, prompts, params):
        out = []
        for i, p in enumerate(prompts):
            text = self.tok.decode(p)
            self.seen.append((text, params))
            ids = self.tok.encode(self.reply(text))
            out.append([Sample(i, ids, [0.0] * len(ids), "stop")])
        return out


def make_batch(tok, outcomes, *, solution=None, domain="biology"):
    ex = Example(id="q1", lang="eng", problem=PROBLEM, answer="38", solution_en=solution, domain=domain,
                 meta={"system": "Reason, then give the number."})
    batch, _ = prepare_examples([ex], tok, include_problem_en=False, include_reference_solution_en=False,
                                max_prompt_tokens=4096, with_teacher=False, data_format="sciknoweval")
    rollouts = []
    for ok in outcomes:
        ids = tok.encode(CORRECT if ok else FAILED) + [tok.eos_token_id]
        rollouts.append(Rollout(0, ids, [-0.5] * len(ids), "stop", "", ok, True, None))
    return batch, rollouts


def quote_reply(quote):
    def reply(text):
        if "<error_quote>" in text:
            return f"<error_quote>{quote}</error_quote>\n<explanation>12 times 4 is 48, not 46.</explanation>"
        return "<explanation>It multiplies first, then subtracts.</explanation>"
    return reply


@pytest.mark.parametrize("tok_name", ["bpe", "sp"])
def test_mask_starts_at_localized_token(tok_name):
    tok = tokenizer(tok_name)
    quote = "$12 \\times 4 = 46$"
    batch, rollouts = make_batch(tok, [True, False])
    engine = ScriptedEngine(tok, quote_reply(quote))
    step = RosdStep(RosdConfig(reflection_max_new_tokens=64, reflection_temperature=0.7), tok, seed=1)
    items, stats, summary = step.make_items(engine, batch, rollouts, step=0)
    assert len(engine.seen) == 2 and engine.seen[0][1].max_new_tokens == 64 and engine.seen[0][1].temperature == 0.7
    assert [it.index for it in items] == [0, 1]
    correct, failed = items
    assert correct.loss_mask == [1.0] * len(correct.response)
    k = failed.loss_mask.index(1.0)
    assert k == expected_token_index(tok, failed.response, FAILED.index(quote))
    assert failed.loss_mask == [0.0] * k + [1.0] * (len(failed.response) - k)
    for it in items:  # teacher: the problem + the key idea; student: the row's own prompt
        teacher_text = tok.decode(it.teacher_prompt)
        assert KEY_IDEA_HEADER in teacher_text and PROBLEM in teacher_text
        assert "Reason, then give the number." in teacher_text  # the student's system prompt kept
        assert it.student_prompt == batch[0].student_ids and it.rollout_logprobs == rollouts[it.index].logprobs
    assert stats["rosd/quote_found_rate"] == 1.0 and stats["rosd/reflection_parse_rate"] == 1.0
    assert stats["rosd/failed_distilled_fraction"] == pytest.approx((len(failed.response) - k) / len(failed.response))
    assert stats["rosd/train_accuracy/biology"] == 0.5 and stats["accuracy"] == 0.5
    assert num_response_tokens(items) == len(correct.response) + len(failed.response) - k
    assert "quotes found 1/1" in summary


def test_unmatched_quote_takes_fallback():
    tok = tokenizer("bpe")
    batch, rollouts = make_batch(tok, [True, False])
    engine = ScriptedEngine(tok, quote_reply("the moon is made of cheese and rockets"))
    whole, stats, _ = RosdStep(RosdConfig(on_no_quote="whole"), tok, seed=1).make_items(engine, batch, rollouts, 0)
    assert whole[1].loss_mask == [1.0] * len(whole[1].response) and stats["rosd/no_quote_distilled_whole"] == 1
    skip, stats, _ = RosdStep(RosdConfig(on_no_quote="skip"), tok, seed=1).make_items(engine, batch, rollouts, 0)
    assert [it.index for it in skip] == [0] and stats["rosd/no_quote_skipped"] == 1
    assert stats["rosd/quote_found_rate"] == 0.0


def test_no_explanation_falls_back_to_sibling_solution():
    tok = tokenizer("bpe")
    batch, rollouts = make_batch(tok, [True, False])
    items, stats, _ = RosdStep(RosdConfig(), tok, seed=1).make_items(ScriptedEngine(tok, lambda t: "no tags"),
                                                                     batch, rollouts, 0)
    assert len(items) == 2 and stats["rosd/teacher_solution_fallback"] == 2
    assert SOLUTION_HEADER in tok.decode(items[1].teacher_prompt)
    assert "48$ apples" in tok.decode(items[1].teacher_prompt)  # the correct sibling's response


@pytest.mark.parametrize("setting,expect_items", [("distill_whole", 2), ("skip", 0)])
def test_all_correct_groups_follow_the_setting(setting, expect_items):
    tok = tokenizer("bpe")
    batch, rollouts = make_batch(tok, [True, True])
    engine = ScriptedEngine(tok, quote_reply("x"))
    items, stats, summary = RosdStep(RosdConfig(on_all_correct=setting), tok, seed=1).make_items(
        engine, batch, rollouts, 0)
    assert len(items) == expect_items and stats["rosd/groups_all_correct"] == 1
    if setting == "skip":
        assert engine.seen == [] and stats["rosd/groups_skipped_all_correct"] == 1
        assert "all-correct 1" in summary.split("skipped:")[1]
    else:
        assert len(engine.seen) == 2 and "rosd/groups_skipped_all_correct" not in stats
        assert all(it.loss_mask == [1.0] * len(it.response) for it in items)


@pytest.mark.parametrize("setting,solution,expect", [
    ("skip", "48 - 10 = 38", "skipped_all_wrong"),
    ("reference_solution", None, "skipped_all_wrong_no_reference"),
    ("reference_solution", "12 * 4 = 48 and 48 - 10 = 38.", "reflect"),
])
def test_all_wrong_groups_follow_the_setting(setting, solution, expect):
    tok = tokenizer("bpe")
    batch, rollouts = make_batch(tok, [False, False], solution=solution)
    engine = ScriptedEngine(tok, quote_reply("$12 \\times 4 = 46$"))
    items, stats, summary = RosdStep(RosdConfig(on_all_wrong=setting), tok, seed=1).make_items(
        engine, batch, rollouts, 0)
    assert stats["rosd/groups_all_wrong"] == 1
    if expect == "reflect":
        assert len(items) == 2 and len(engine.seen) == 2
        assert all(solution in text for text, _ in engine.seen)  # the reference solution is shown
        assert all(0 < it.loss_mask.index(1.0) for it in items)
    else:
        assert items == [] and engine.seen == [] and stats[f"rosd/groups_{expect}"] == 1
        assert ("without reference 1" if "no_reference" in expect else "all-wrong 1,") in summary


def test_rosd_config_warns_when_setting_cannot_act():
    tok = tokenizer("bpe")
    ex = Example(id="a", lang="eng", problem="p", answer="A")
    with pytest.warns(UserWarning, match="on_all_wrong=reference_solution"):
        RosdStep(RosdConfig(on_all_wrong="reference_solution"), tok, seed=0).warn_at_startup([ex])


# ------------------------------------------------------------------------------------------ loss

def test_loss_mask_collates_and_counts():
    a = TrainItem([1, 2], [3], [4, 5, 6], loss_mask=[0.0, 1.0, 1.0], index=0)
    b = TrainItem([1], [3, 3], [7, 8], index=1)
    mb = collate([a, b], pad_id=0)
    assert mb.mask.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0] and num_response_tokens([a, b]) == 4
    with pytest.raises(ValueError, match="loss-mask"):
        TrainItem([1], [1], [2, 3], loss_mask=[1.0])


@pytest.mark.parametrize("divergence,beta", [("jsd", 0.5), ("forward_kl", 0.5)])
def test_rosd_loss_weights_and_variants(divergence, beta):
    from megatron_copsd.objective import rosd_loss
    from megatron_copsd.rosd.topk_tail import topk_tail_divergence

    torch.manual_seed(0)
    T, H, V = 7, 8, 19
    hs = torch.randn(T, H, requires_grad=True)
    ht, w = torch.randn(T, H), torch.randn(V, H)
    mask = torch.tensor([0, 0, 1, 1, 1, 0, 1], dtype=torch.float32)
    iw = torch.rand(T) * 2
    ref_tok = topk_tail_divergence(hs @ w.T, ht @ w.T, top_k=V, divergence=divergence, beta=beta)  # k=V: exact
    expected = (mask * iw * ref_tok).sum() / 10.0
    full, m = rosd_loss(hs, ht, w, mask, 10.0, importance_weight=iw, divergence=divergence, beta=beta)
    assert full.item() == pytest.approx(expected.item(), rel=1e-4)
    assert m["tokens"].item() == 4 and m["tis_weight_sum"].item() == pytest.approx((iw * mask).sum().item())
    tail, _ = rosd_loss(hs, ht, w, mask, 10.0, importance_weight=iw, loss="topk_tail", top_k=V,
                        divergence=divergence, beta=beta)
    assert tail.item() == pytest.approx(expected.item(), rel=1e-4)
    small, _ = rosd_loss(hs, ht, w, mask, 10.0, loss="topk_tail", top_k=3, divergence=divergence, beta=beta)
    exp_small = (mask * topk_tail_divergence(hs @ w.T, ht @ w.T, top_k=3, divergence=divergence, beta=beta)).sum() / 10
    assert small.item() == pytest.approx(exp_small.item(), rel=1e-4)
    (g,) = torch.autograd.grad(small, hs)
    assert torch.all(g[mask == 0] == 0) and g[mask == 1].abs().sum() > 0  # masked tokens give no gradient
