"""End-to-end ROSD on CPU: real loop (embedded engine, Megatron passes, optimizer) on a tiny random model
and a small two-domain MCQ fixture written by the test (no shared data needed).

A random model never writes `<answer>X</answer>`, so every group would be all-wrong and skipped; the
run's grader is therefore replaced by a deterministic test grader (a hash of the response text) that
makes groups mixed. Reflections come from the real engine in the first test (noise: nothing parses, so
the fallbacks act); the second test scripts the reflector on top of the real engine so that quotes are
found, and checks the loss masks of the trained items against the quotes' token positions.
"""
import hashlib
import json
import os
import re

import pytest
import torch

from megatron_copsd.config import config_from_dict
from megatron_copsd.data.graders import Grade
from megatron_copsd.metrics_log import read_metrics

pytestmark = pytest.mark.e2e

SYSTEM = "Answer with the letter inside <answer>...</answer> after your reasoning."
QUESTIONS = {
    "biology": ["Which organelle makes ATP?", "Which molecule carries genes?", "What do ribosomes build?"],
    "physics": ["What is the unit of force?", "What is the speed of light close to?", "What does a lens bend?"],
}


def write_mcq_fixture(path, per_domain: int = 4):
    rows = []
    for dom, qs in QUESTIONS.items():
        for i in range(per_domain):
            q = qs[i % len(qs)]
            rows.append({"idx": len(rows), "kind": "mcq", "domain": dom, "answer": "ABCD"[i % 4], "system": SYSTEM,
                         "prompt": f"{q}\n\nA: one\nB: two\nC: three\nD: four\nPlease reason step by step."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hash_grader(text: str, gold) -> Grade:
    """Deterministic stand-in for grade_mcq on noise: about half the responses count as correct."""
    ok = hashlib.sha256(text.encode()).digest()[0] % 2 == 0
    return Grade(ok, True, gold if ok else None)


def tiny_cfg(tmp_path, name, overrides=()):
    data = write_mcq_fixture(tmp_path / "mcq_train.jsonl")
    base = {
        "model": {"hf_path": "tiny:qwen3", "tiny_overrides": {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                                              "num_kv_heads": 1, "max_position_embeddings": 1024}},
        "data": {"train_path": str(data), "eval_path": str(data), "format": "sciknoweval", "task": "mcq",
                 "prompts_per_step": 3, "max_prompt_tokens": 400},
        "rollout": {"n": 3, "max_new_tokens": 12},
        "objective": {"name": "rosd", "teacher": "fixed", "tis_cap": 2.0},
        "rosd": {"reflection_max_new_tokens": 12, "max_reflection_prompt_tokens": 500,
                 "max_teacher_prompt_tokens": 400},
        "optim": {"lr": 1e-3},
        "train": {"steps": 3, "micro_batch_tokens": 2048, "output_dir": str(tmp_path / name)},
        "checkpoint": {"save_every": 0, "export_hf": False},
        "eval": {"every": 0, "num_examples": 8, "num_samples": 1, "max_new_tokens": 6},
        "logging": {"tensorboard": False, "progress_bar": False},
    }
    return config_from_dict(base, list(overrides))


class ScriptedReflector:
    """Wraps the real engine: rollouts and everything else are sampled by the model; reflection requests
    (recognised by their reply instructions) get a scripted reply quoting the reviewed response from its
    `quote_at` fraction on, so the quote is always found."""

    def __init__(self, engine, tok, quote_at=0.5):
        self.engine, self.tok, self.quote_at, self.quotes = engine, tok, quote_at, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, params):
        from megatron_copsd.rollout.types import Sample

        texts = [self.tok.decode(p) for p in prompts]
        if not any("<error_quote>" in t or "<explanation>" in t for t in texts):
            return self.engine.generate(prompts, params)
        out = []
        for i, t in enumerate(texts):
            m = re.search(r"## Attempted answer \(incorrect\)\n(.*)\n\n## How to reply", t, re.S)
            if m and len(m.group(1).strip()) >= 12:
                resp = m.group(1)
                start = int(len(resp) * self.quote_at)
                quote = resp[start:start + 24].strip()
                self.quotes.append(quote)
                reply = f"<error_quote>{quote}</error_quote>\n<explanation>check the options again</explanation>"
            else:
                reply = "<explanation>the reasoning matches option logic</explanation>"
            ids = self.tok.encode(reply)
            out.append([Sample(i, ids, [0.0] * len(ids), "stop")])
        return out


def run(cfg, *, scripted=False, capture=None):
    from megatron_copsd.megatron.dist import destroy_distributed
    from megatron_copsd.testing.multiproc import free_port
    from megatron_copsd.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # restored by conftest
    torch.set_num_threads(1)
    try:
        trainer = Trainer(cfg)
        trainer.grader = hash_grader
        if scripted:
            trainer.engine = ScriptedReflector(trainer.engine, trainer.tok)
        if capture is not None:  # keep every step's items to check their masks
            make = trainer.make_items

            def keep(step, batch, rollouts):
                items, stats = make(step, batch, rollouts)
                capture.append(items)
                return items, stats

            trainer.make_items = keep
        result = trainer.run()
    finally:
        destroy_distributed()
    recs = read_metrics(os.path.join(cfg.train.output_dir, "metrics.jsonl"))
    return trainer, result, [r for r in recs if not r.get("eval")], [r for r in recs if r.get("eval")]


def test_rosd_tiny_run_logs_metrics(tmp_path, capsys):
    _, result, recs, evals = run(tiny_cfg(tmp_path, "plain"))
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        for key in ("rosd/quote_found_rate", "rosd/failed_distilled_fraction", "rosd/reflection_parse_rate",
                    "rosd/train_accuracy/biology", "rosd/train_accuracy/physics", "rosd/groups", "time/reflect",
                    "rosd/reflection_len", "accuracy"):
            assert key in r, key
        assert r["rosd/groups"] == 3
        if r["rosd/rollouts_distilled"] > 0:
            assert r["skipped"] is False and float(r["loss"]) > 0 and float(r["divergence"]) > 0
            assert 0 < float(r["tis_weight_mean"]) <= 2.0
            assert r["tokens"] == r["rosd/tokens_distilled"]  # the loss mean runs over the distilled tokens only
    assert any(r["rosd/rollouts_distilled"] > 0 for r in recs)
    # eval reports each SciKnowEval-style domain separately
    assert evals and "eval/greedy_accuracy/biology" in evals[-1] and "eval/greedy_accuracy/physics" in evals[-1]
    out = capsys.readouterr().out
    assert "ROSD groups=3" in out  # the per-step line saying what happened to the groups


def test_rosd_scripted_reflections_mask_from_quote(tmp_path):
    from megatron_copsd.data.tokenizer import load_tokenizer

    items_per_step = []
    cfg = tiny_cfg(tmp_path, "scripted", ["train.steps=2", "rosd.loss=topk_tail", "rosd.top_k=8",
                                          "eval.every=-1"])
    trainer, _, recs, _ = run(cfg, scripted=True, capture=items_per_step)
    tok = load_tokenizer(str(tmp_path / "scripted" / "tiny_model"))
    quotes = trainer.engine.quotes
    assert quotes, "no failed rollout was reflected on"
    n_localized = 0
    for items in items_per_step:
        for it in items:
            assert it.loss_mask is not None and len(it.loss_mask) == len(it.response)
            k = it.loss_mask.index(1.0)
            assert all(m == 0.0 for m in it.loss_mask[:k]) and all(m == 1.0 for m in it.loss_mask[k:])
            if k == 0:
                continue
            n_localized += 1
            # token k is the one whose decoded span contains the start of a scripted quote
            text = tok.decode(it.response)
            spans = tok.token_char_offsets(it.response)
            starts = [text.find(q) for q in quotes if q and text.find(q) >= 0]
            assert any(spans[k][0] <= s < spans[k][1] or (spans[k][0] == s) for s in starts)
            assert it.teacher_prompt != it.student_prompt
    assert n_localized > 0
    for r in recs:
        if r["rosd/failed_reflections"] > 0:
            assert r["rosd/quote_found_rate"] == 1.0 and r["rosd/reflection_parse_rate"] == 1.0
            assert 0 < r["rosd/localized_distilled_fraction"] < 1
        if r["rosd/rollouts_distilled"] > 0:
            assert float(r["loss"]) > 0


def test_rosd_math_fixture_all_wrong_groups_use_reference_solution(tmp_path, capsys):
    """COPSD-format math data (with reference solutions) and the REAL grader: the random model is always
    wrong, so every group is all-wrong; on_all_wrong=reference_solution reflects on them anyway."""
    from megatron_copsd.megatron.dist import destroy_distributed
    from megatron_copsd.testing.multiproc import free_port
    from megatron_copsd.trainer import Trainer

    cfg = tiny_cfg(tmp_path, "math", ["data.format=copsd", "data.task=math", "data.train_path=fixture:tiny",
                                      "data.eval_path=none", "data.langs=[swa]", "data.prompts_per_step=2",
                                      "rollout.n=2", "train.steps=1", "eval.every=-1",
                                      "rosd.on_all_wrong=reference_solution", "objective.tis_cap=none"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # restored by conftest
    torch.set_num_threads(1)
    try:
        Trainer(cfg).run()
    finally:
        destroy_distributed()
    (r,) = [x for x in read_metrics(tmp_path / "math" / "metrics.jsonl") if not x.get("eval")]
    assert r["accuracy"] == 0.0 and r["rosd/groups_all_wrong"] == 2 and "rosd/groups_skipped_all_wrong" not in r
    assert r["rosd/failed_reflections"] == 4 and r["rosd/rollouts_distilled"] > 0 and float(r["loss"]) > 0
    assert "tis_weight_mean" in r and r["tis_weight_mean"] == 1.0  # tis_cap=none: unweighted
    assert "all-wrong 2" in capsys.readouterr().out
