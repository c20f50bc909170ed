"""End-to-end: the real loop (embedded rollouts, Megatron passes, optimizer, checkpoints) on a tiny model."""
import json
import math
import os

import pytest
import torch

from megatron_copsd.checkpoint.state import MARKER
from megatron_copsd.config import config_from_dict
from megatron_copsd.metrics_log import read_metrics

pytestmark = pytest.mark.e2e

TINY = {
    "model": {"hf_path": "tiny:qwen3", "tiny_overrides": {"hidden_size": 32, "intermediate_size": 64,
                                                          "num_heads": 2, "num_kv_heads": 1}},
    "data": {"train_path": "fixture:tiny", "langs": ["swa"], "prompts_per_step": 2},
    "rollout": {"n": 2, "max_new_tokens": 10},
    "optim": {"lr": 1e-3},
    "train": {"steps": 2, "micro_batch_tokens": 256},
    "checkpoint": {"save_every": 1, "keep_last": 1},
    "eval": {"every": 0, "num_examples": 2, "num_samples": 1, "max_new_tokens": 8},
    "logging": {"tensorboard": False, "progress_bar": False},
}


def run_tiny(tmp_path, name, overrides=()):
    from megatron_copsd.megatron.dist import destroy_distributed
    from megatron_copsd.testing.multiproc import free_port
    from megatron_copsd.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # restored by conftest
    torch.set_num_threads(1)
    cfg = config_from_dict(TINY, [f"train.output_dir={tmp_path / name}", *overrides])
    try:
        result = Trainer(cfg).run()
    finally:
        destroy_distributed()
    return result, [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if not r.get("eval")]


def test_copsd_tiny_run_writes_everything(tmp_path):
    result, recs = run_tiny(tmp_path, "copsd", ["logging.tensorboard=true"])
    assert [r["step"] for r in recs] == [1, 2]
    for key in ("loss", "divergence", "clip_fraction", "reward", "format_rate", "response_len", "logprob_gap",
                "tokens_per_s", "time/rollout", "time/teacher", "time/train", "time/sync", "grad_norm", "lr"):
        assert key in recs[0], key
    for r in recs:
        assert r["loss"] > 0 and r["loss"] == pytest.approx(r["divergence"], rel=1e-5)  # no clip: loss = mean div
        assert abs(r["logprob_gap"]) < 1e-4  # embedded engine and trainer agree on log-probs
        assert r["skipped"] is False
    out = tmp_path / "copsd"
    assert (out / "checkpoints" / "step_2" / MARKER).is_file() and not (out / "checkpoints" / "step_1").exists()
    saves = [json.loads(line) for line in (out / "checkpoints.jsonl").read_text().splitlines()]
    assert [r["step"] for r in saves] == [1, 2]  # one record per checkpoint: size, time, throughput
    assert all(r["bytes"] > 0 and r["write_s"] > 0 and r["mb_per_s"] > 0 and r["blocking_s"] >= 0 for r in saves)
    assert (out / "hf" / "config.json").is_file() and (out / "tensorboard").is_dir()
    assert result["report"] and os.path.isfile(result["report"])
    # The HF export is the trained policy: loadable by transformers, different from the initial weights.
    import transformers

    trained = transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf")).state_dict()
    initial = transformers.AutoModelForCausalLM.from_pretrained(str(out / "tiny_model")).state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)
    assert result["metrics"].endswith("metrics.jsonl")


@pytest.mark.parametrize("objective", ["grpo", "sampled_kl", "sft", "copsd-ema", "copsd-dynamic"])
def test_other_objectives_same_loop(tmp_path, objective):
    extra = {"grpo": ["objective.tis_cap=2.0", "objective.kl_coef=0.05"],
             "copsd-ema": ["objective.teacher=ema", "objective.ema_decay=0.5", "objective.teacher_top_k=16"],
             "copsd-dynamic": ["objective.teacher=dynamic", "objective.divergence=reverse_kl",
                               "objective.token_clip=0.01"]}.get(objective, [])
    name = objective.split("-")[0]
    _, recs = run_tiny(tmp_path, objective, [f"objective.name={name}", "eval.every=-1",
                                             "checkpoint.export_hf=false", *extra])
    assert len(recs) == 2
    for r in recs:
        keys = ("loss", "grad_norm") + (() if objective == "sft" else ("logprob_gap",))  # sft has no rollouts
        assert all(torch.isfinite(torch.tensor(float(r[k]))) for k in keys)
    if objective == "grpo":
        assert "ratio_mean" in recs[0] and recs[0]["ratio_mean"] == pytest.approx(1.0)  # one update per batch
        assert "kl" in recs[0] and "tis_weight_mean" in recs[0]
    elif objective == "sft":
        assert recs[1]["nll"] < recs[0]["nll"] and recs[0]["loss"] == pytest.approx(recs[0]["nll"], rel=1e-5)
    else:
        assert "divergence" in recs[0]
    if objective == "copsd-dynamic":
        assert 0 <= recs[0]["clip_fraction"] <= 1


def test_ema_teacher_moves_towards_student():
    from megatron_copsd.run_setup import Teacher

    class P:  # the policy interface Teacher uses
        def __init__(self, inner):
            self.inner, self.model = inner, inner

    student = torch.nn.Linear(3, 2)
    copy = torch.nn.Linear(3, 2)
    with torch.no_grad():
        student.weight.fill_(1.0), copy.weight.fill_(0.0)
    t = Teacher("ema", P(student), lambda: copy, decay=0.75)
    t.after_step()
    assert torch.allclose(copy.weight, torch.full_like(copy.weight, 0.25))
    assert Teacher("dynamic", P(student), lambda: None).acquire() is student


def test_distributed_optimizer_resume_restores_adam_state(tmp_path):
    ov = ["parallel.use_distributed_optimizer=true", "eval.every=-1", "checkpoint.export_hf=false"]
    _, a = run_tiny(tmp_path, "a", ov + ["train.steps=4"])
    run_tiny(tmp_path, "b", ov + ["train.steps=2"])
    _, b = run_tiny(tmp_path, "b", ov + ["train.steps=4"])
    # step 4's loss depends on step 3's update, which uses the restored Adam moments and step counts
    # (megatron-core's loader shares one `step` tensor between parameters: see checkpoint/training_state.py)
    for key in ("loss", "grad_norm", "response_len"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-6), key


def test_bad_config_fails_before_work(tmp_path, capsys):
    from megatron_copsd.train import main

    assert main(["objective.divergence=kl", f"train.output_dir={tmp_path / 'x'}"]) == 2
    assert "objective.divergence" in capsys.readouterr().err
    assert main(["model.hf_path=/nonexistent", f"train.output_dir={tmp_path / 'x'}"]) == 2
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3}')
    assert main([f"model.hf_path={hf}", "parallel.tp=4", f"train.output_dir={tmp_path / 'x'}"]) == 2
    assert main([f"model.hf_path={hf}", "parallel.pp=2", f"train.output_dir={tmp_path / 'x'}"]) == 2
    assert main(["parallel.tp=2", f"train.output_dir={tmp_path / 'x'}"]) == 2  # one process cannot hold TP=2
    err = capsys.readouterr().err
    assert "parallel.tp=4" in err and "parallel.pp=2" in err and "launched processes" in err
    assert not (tmp_path / "x").exists()


def test_nonfinite_loss_skips_then_stops(tmp_path, monkeypatch):
    from megatron_copsd import train_step
    from megatron_copsd.trainer import NonFiniteLossError

    real = train_step.student_pass

    def nan_pass(*a, **k):
        out = real(*a, **k)
        out["loss"] = float("nan")
        return out

    monkeypatch.setattr("megatron_copsd.trainer.student_pass", nan_pass)
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_in_a_row=2"):
        run_tiny(tmp_path, "nan", ["train.steps=3", "train.max_nonfinite_in_a_row=2", "eval.every=-1"])
    recs = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert recs[0]["skipped"] is True and recs[0]["nonfinite_skipped"] == 1


def test_nonfinite_gradient_with_finite_loss_skips_then_stops(tmp_path, monkeypatch):
    """A finite loss with an inf gradient: the step is skipped (weights untouched), counted and logged;
    N such steps in a row stop the run."""
    from megatron_copsd import train_step
    from megatron_copsd.megatron.model_provider import unwrap_model
    from megatron_copsd.trainer import NonFiniteLossError

    real = train_step.student_pass
    seen = []

    def inf_grad_pass(model, *a, **k):
        seen.append([p.detach().clone() for p in unwrap_model(model).parameters()])
        out = real(model, *a, **k)
        model.buffers[0].grad_data[3] = float("inf")  # after the backward pass, before the optimizer step
        return out

    monkeypatch.setattr("megatron_copsd.trainer.student_pass", inf_grad_pass)
    with pytest.raises(NonFiniteLossError, match="gradient was non-finite in 2 consecutive steps"):
        run_tiny(tmp_path, "infgrad", ["train.steps=3", "train.max_nonfinite_in_a_row=2", "eval.every=-1"])
    recs = read_metrics(tmp_path / "infgrad" / "metrics.jsonl")
    assert recs[0]["skipped"] is True and recs[0]["nonfinite"] == "gradient" and recs[0]["nonfinite_skipped"] == 1
    assert recs[0]["loss"] > 0 and math.isfinite(recs[0]["loss"])
    assert len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(*seen))  # the skipped step changed nothing


def test_bf16_ema_resume_is_exact(tmp_path):
    """bf16 weights with fp32 norm weights (the local spec without TE) and an EMA teacher with fp32 masters:
    megatron-core's own bf16-optimizer sharded state dict cannot describe the mixed fp32 params (see
    checkpoint/training_state.py); the resumed steps equal the uninterrupted run's."""
    ov = ["model.dtype=bf16", "objective.teacher=ema", "objective.ema_decay=0.5", "eval.every=-1",
          "checkpoint.export_hf=false"]
    _, a = run_tiny(tmp_path, "a", ov + ["train.steps=4"])
    run_tiny(tmp_path, "b", ov + ["train.steps=2"])
    _, b = run_tiny(tmp_path, "b", ov + ["train.steps=4"])
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "response_len"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-6), key
