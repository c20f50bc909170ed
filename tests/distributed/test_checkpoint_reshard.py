"""Resume on another layout: train at TP=2 for K steps and save (megatron-core torch_dist, asynchronously),
then resume at TP=1, PP=2 and DP=2 (distributed optimizer), and at PP=2 with the default (non-distributed)
optimizer; the next steps' loss and grad norm equal the uninterrupted TP=2 run's within fp32 tolerance
(relative 1e-5). Real megatron-core, gloo groups.

Why the steps are comparable: the resumed state (weights, fp32 main params, Adam moments and steps, LR
schedule, data position) is exact on any layout, and rollouts are sampled on rank 0 with a seed derived from
(train.seed, step) from weights synced from the policy, so step K+1 sees the same prompts and responses.
Layouts differ only in reduction order (TP all-reduces, DP gradient sums) -- fp32 rounding, which could in
principle flip a sampled token in step K+2 (then response_len differs and the test reports it).
What is not exact across layouts: per-rank RNG streams (rank r restores the generators of saved rank r;
the model-parallel tracker only on the same TP rank). No RNG is used by these steps (no dropout).
"""
import pytest

from megatron_copsd.testing.multiproc import run_distributed

pytestmark = pytest.mark.distributed
K, M = 2, 2  # save after K steps, compare the next M
RTOL = 1e-5


def _cfg(model_dir, data_path, out_dir, tp, pp, *, steps, resume="auto", save_every=0, dist_opt=True):
    from megatron_copsd.config import config_from_dict

    return config_from_dict({
        "model": {"hf_path": str(model_dir)},
        "parallel": {"tp": tp, "pp": pp, "use_distributed_optimizer": dist_opt},
        "data": {"train_path": str(data_path), "langs": ["swa"], "prompts_per_step": 2},
        "rollout": {"n": 2, "max_new_tokens": 8},
        "objective": {"name": "copsd", "divergence": "jsd", "beta": 0.5, "teacher": "ema", "ema_decay": 0.5},
        "optim": {"lr": 1e-3},
        "train": {"steps": steps, "output_dir": str(out_dir), "micro_batch_tokens": 64},
        "checkpoint": {"save_every": save_every, "keep_last": 5, "export_hf": False, "resume": resume,
                       "async_save": True},
        "eval": {"every": -1},
        "logging": {"tensorboard": False, "progress_bar": False},
    })


def worker(rank, world_size, runs, model_dir, data_path):
    from megatron_copsd.megatron.dist import destroy_distributed
    from megatron_copsd.metrics_log import read_metrics
    from megatron_copsd.trainer import Trainer

    results = {}
    for name, tp, pp, out, steps, resume, save_every in runs:
        try:
            Trainer(_cfg(model_dir, data_path, out, tp, pp, steps=steps, resume=resume, save_every=save_every,
                         dist_opt=not name.startswith("plain"))).run()
        finally:
            destroy_distributed()
        results[name] = [r for r in read_metrics(f"{out}/metrics.jsonl") if "loss" in r] if rank == 0 else None
    return results


def test_resume_tp2_checkpoint_at_tp1_pp2_dp2(tmp_path):
    from megatron_copsd import tiny_run
    from megatron_copsd.checkpoint.state import read_meta, validate_checkpoint
    from megatron_copsd.data.loaders import load_copsd_training

    train, _ = tiny_run.write_fixture(tmp_path / "data", num_train=8, num_eval=2)
    model = tiny_run.materialize_tiny_model(tmp_path / "model", "qwen3", tiny_run.tokenizer_texts(
        load_copsd_training(train, "swa")))
    args = (str(model), str(train))
    src = tmp_path / "tp2"
    saved = src / "checkpoints" / f"step_{K}"
    first = [("tp2", 2, 1, str(src), K + M, "auto", K),
             ("pp2", 1, 2, str(tmp_path / "pp2"), K + M, str(saved), 0),
             ("dp2", 1, 1, str(tmp_path / "dp2"), K + M, str(saved), 0),
             ("plain_tp2", 2, 1, str(tmp_path / "plain_tp2"), K + M, "auto", K),
             ("plain_pp2", 1, 2, str(tmp_path / "plain_pp2"), K + M,
              str(tmp_path / "plain_tp2" / "checkpoints" / f"step_{K}"), 0)]
    res2 = run_distributed(worker, 2, args=(first, *args), timeout=900)[0]
    meta = validate_checkpoint(saved)
    assert (meta["tp"], meta["pp"], meta["world_size"], meta["step"]) == (2, 1, 2, K)
    assert any(name.endswith(".distcp") for name in meta["files"]), "not a torch_dist checkpoint"
    assert read_meta(saved)["save"]["async"] is True
    res1 = run_distributed(worker, 1, args=([("tp1", 1, 1, str(tmp_path / "tp1"), K + M, str(saved), 0)], *args),
                           timeout=600)[0]
    ref = {r["step"]: r for r in res2["tp2"]}
    assert sorted(ref) == list(range(1, K + M + 1))
    plain_ref = {r["step"]: r for r in res2["plain_tp2"]}
    for step in ref:  # the optimizer kind changes nothing numerically (a control for the comparison below)
        assert plain_ref[step]["loss"] == pytest.approx(ref[step]["loss"], rel=RTOL)
    for name, recs in (("tp1", res1["tp1"]), ("pp2", res2["pp2"]), ("dp2", res2["dp2"]),
                       ("plain_pp2", res2["plain_pp2"])):
        got = {r["step"]: r for r in recs}
        assert sorted(got) == list(range(K + 1, K + M + 1)), (name, sorted(got))  # resumed, not restarted
        for step in range(K + 1, K + M + 1):
            a, b = got[step], (plain_ref if name.startswith("plain") else ref)[step]
            assert a["response_len"] == b["response_len"] and a["tokens"] == b["tokens"], (name, step)
            for key in ("loss", "grad_norm", "lr"):
                assert a[key] == pytest.approx(b[key], rel=RTOL, abs=0), (name, step, key, a[key], b[key])
            print(f"{name} step {step}: loss {a['loss']:.9g} vs {b['loss']:.9g}, "
                  f"grad_norm {a['grad_norm']:.9g} vs {b['grad_norm']:.9g}")
