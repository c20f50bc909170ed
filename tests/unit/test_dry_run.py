"""`copsd dry-run`: one real training step on meta tensors over a fake process group.

Runs in-process (the dry-run environment installs and removes its patches). What this cannot prove:
anything about values (meta has none), CUDA streams, the Triton kernels themselves (their fake
implementations run) or NCCL; it proves that the trainer's GPU path runs at the given layout with every
tensor on the device and every collective on device tensors, and it measures tensor-storage memory."""
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_copsd import dry_run
from megatron_copsd.config import load_config
from megatron_copsd.megatron.dry_run_compat import HostCollectiveError, HostDeviceMixError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "qwen3_8b_copsd.yaml"


def _small_qwen3(tmp_path, **overrides) -> Path:
    cfg = json.loads((ROOT / "examples/hf_configs/qwen3_8b/config.json").read_text())
    cfg.update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
               intermediate_size=512, max_window_layers=4, **overrides)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def _cfg(**extra):
    overrides = ["parallel.tp=2", "parallel.pp=2", "data.prompts_per_step=4", "rollout.max_new_tokens=128",
                 "train.micro_batch_tokens=512", "parallel.use_distributed_optimizer=false", "parallel.recompute=none"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(EXAMPLE, overrides)


def _run(cfg, hf, rank, **kw):
    return dry_run.simulate_rank(cfg, hf, rank=rank, world_size=8, student_prompt=16, teacher_prompt=32,
                                 response=128, **kw)


def test_shipped_hf_configs_hold_the_published_qwen3_shapes():
    expect = {"qwen3_1p7b": (2048, 28, 16, 6144, True), "qwen3_4b": (2560, 36, 32, 9728, True),
              "qwen3_8b": (4096, 36, 32, 12288, False)}
    for name, (hidden, layers, heads, ffn, tied) in expect.items():
        c = json.loads((ROOT / "examples/hf_configs" / name / "config.json").read_text())
        assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["intermediate_size"],
                c["tie_word_embeddings"]) == (hidden, layers, heads, ffn, tied)
        assert (c["vocab_size"], c["head_dim"], c["num_key_value_heads"], c["rope_theta"], c["rms_norm_eps"]) == (
            151936, 128, 8, 1000000, 1e-6)
    cfg = load_config(EXAMPLE)
    assert dry_run.resolve_hf_config(cfg) == ROOT / "examples/hf_configs/qwen3_8b/config.json"


def test_tp2_pp2_dp2_step_passes_on_first_and_last_stage(tmp_path):
    hf = _small_qwen3(tmp_path)
    cfg = _cfg()
    first, last = (_run(cfg, hf, r) for r in dry_run.parse_ranks("first,last", 8, 2, 2))
    assert (first.pp_rank, last.pp_rank) == (0, 1) and last.rank == 4
    for rep in (first, last):
        b = rep.breakdown
        assert b["weights"] > 0 and b["gradients"] > 0 and b["optimizer state"] > 0 and b["teacher"] > 0
        # Adam: fp32 main params + 2 moments = 6x the bf16 weights (non-distributed optimizer)
        assert 5.0 < b["optimizer state"] / b["weights"] < 7.0
        assert rep.peak_bytes >= sum(b.values()) - 1
    assert last.breakdown.get("divergence workspace", 0) > 0  # the loss (and its kernel) runs on the last stage
    assert "divergence workspace" not in first.breakdown
    assert not dist.is_initialized()  # the environment tears its fake group down
    assert not torch.cuda.is_available()  # and its patches


@pytest.mark.slow
def test_distributed_optimizer_shards_optimizer_state(tmp_path):
    hf = _small_qwen3(tmp_path)
    plain = _run(_cfg(**{"parallel.pp": 1, "parallel.use_distributed_optimizer": "false"}), hf, 0)
    sharded = _run(_cfg(**{"parallel.pp": 1, "parallel.use_distributed_optimizer": "true"}), hf, 0)
    ratio = sharded.breakdown["optimizer state"] / plain.breakdown["optimizer state"]
    assert 0.2 < ratio < 0.3, ratio  # DP=4 at TP=2, PP=1, world 8


def test_a_host_tensor_planted_in_the_step_fails_naming_the_place(tmp_path, monkeypatch):
    from megatron_copsd import train_step

    original = train_step.gather_response_hidden

    def planted(hidden, side):
        h = original(hidden, side)
        return h + torch.zeros(h.shape[-1])  # a host tensor: CUDA would raise a device mismatch

    monkeypatch.setattr(train_step, "gather_response_hidden", planted)
    with pytest.raises(HostDeviceMixError) as err:
        _run(_cfg(), _small_qwen3(tmp_path), 4)
    msg = str(err.value)
    assert "aten.add" in msg and "megatron_copsd/train_step.py" in msg and "loss_func" in msg
    assert not dist.is_initialized()


def test_a_host_tensor_in_a_collective_fails_naming_the_place(tmp_path, monkeypatch):
    from megatron_copsd import trainer

    original = trainer.student_pass

    def planted(*args, **kwargs):
        out = original(*args, **kwargs)
        dist.all_reduce(torch.ones(3))  # NCCL refuses host tensors
        return out

    monkeypatch.setattr(trainer, "student_pass", planted)
    with pytest.raises(HostCollectiveError) as err:
        _run(_cfg(), _small_qwen3(tmp_path), 0)
    msg = str(err.value)
    assert "c10d.allreduce_" in msg and "megatron_copsd/trainer.py" in msg and "train_step" in msg


def test_cli_prints_the_breakdown_for_reduced_qwen3_8b(tmp_path, capsys):
    """The 8B example at full width with 2 layers (the full-size run is the slow test below)."""
    cfg = json.loads((ROOT / "examples/hf_configs/qwen3_8b/config.json").read_text())
    cfg.update(num_hidden_layers=2, max_window_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rc = dry_run.main(["--config", str(EXAMPLE), "--hf-config", str(tmp_path), "--ranks", "first",
                       "--response-tokens", "512", "--steps", "1", "data.prompts_per_step=2",
                       "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "TP=4 PP=1 DP=2 (world 8)" in out and "weights" in out and "PEAK" in out
    rep = json.loads((tmp_path / "r.json").read_text())[0]
    # TP=4: the untied 151936 x 4096 embedding and LM head, a quarter each, plus 2 layers, in bf16
    expected_weights = (2 * 151936 * 4096 / 4 + 2 * (4096 * 128 * 48 / 4 + 4096 * 128 * 32 / 4
                                                   + 3 * 4096 * 12288 / 4)) * 2
    assert abs(rep["breakdown"]["weights"] / expected_weights - 1) < 0.01


@pytest.mark.slow
def test_full_size_qwen3_8b_example(capsys):
    """The shipped 8B example at full size (36 layers, TP=4, both pipeline ends) on this machine."""
    assert dry_run.main(["--config", str(EXAMPLE)]) == 0
    assert "PEAK" in capsys.readouterr().out


@pytest.mark.slow
def test_full_recompute_keeps_fewer_activations(tmp_path):
    """parallel.recompute=full re-runs each layer's forward inside backward (megatron's checkpoint Function:
    the dry run's CUDA -> meta rewrite must hold there too) and keeps less for backward. A small vocabulary
    and long responses, so activations dominate the peak."""
    hf = _small_qwen3(tmp_path, vocab_size=1024)
    peaks = {}
    for mode in ("none", "full"):
        cfg = _cfg(**{"parallel.pp": 1, "parallel.recompute": mode, "train.micro_batch_tokens": 4096})
        rep = dry_run.simulate_rank(cfg, hf, rank=0, world_size=8, student_prompt=16, teacher_prompt=32,
                                    response=1024, steps=2)
        peaks[mode] = rep.breakdown.get("activations", 0)
    assert peaks["full"] < 0.7 * peaks["none"], peaks
