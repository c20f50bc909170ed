"""Same data, different Megatron layouts: 1 process vs TP=2, PP=2 and DP=2 over gloo (real megatron-core).

Checks (a) the COPSD loss and every per-token divergence of a fixed probe batch (teacher pass + student
pass through get_forward_backward_func, no optimizer step; also with teacher top-k and with a single
sequence, which leaves one DP rank a masked placeholder) and (b) the first training step of the full
loop (embedded rollouts on rank 0, broadcast, optimizer step). Tolerance: rtol 1e-4 / atol 1e-6 in fp32 --
layouts differ only in reduction order (TP all-reduces of partial GEMMs / log-sum-exps, DP gradient sums).
"""
import dataclasses

import pytest
import torch

from megatron_copsd.testing.multiproc import run_distributed

pytestmark = pytest.mark.distributed
RTOL, ATOL = 1e-4, 1e-6


def _cfg(model_dir, data_path, out_dir, tp, pp):
    from megatron_copsd.config import config_from_dict

    return config_from_dict({
        "model": {"hf_path": str(model_dir)},
        "parallel": {"tp": tp, "pp": pp},
        "data": {"train_path": str(data_path), "langs": ["swa"], "prompts_per_step": 2},
        "rollout": {"n": 2, "max_new_tokens": 8},
        "objective": {"name": "copsd", "divergence": "jsd", "beta": 0.5},
        "optim": {"lr": 1e-3},
        "train": {"steps": 1, "output_dir": str(out_dir), "micro_batch_tokens": 64},
        "checkpoint": {"save_every": 0, "export_hf": False},
        "eval": {"every": -1},
        "logging": {"tensorboard": False, "progress_bar": False},
    })


def probe_per_token(trainer, num_items=5):
    """Loss and per-token divergence of a fixed batch (prompts from the data, fixed responses)."""
    import torch.distributed as dist

    from megatron_copsd.batching import TrainItem, num_response_tokens
    from megatron_copsd.train_step import student_pass, teacher_pass
    from megatron_copsd.trainer import _reduce_metrics

    items = []
    for i, p in enumerate(trainer.train_set[:num_items]):
        resp = trainer.tok.encode(p.example.solution_en)[: 6 + i] + [trainer.tok.eos_token_id]
        items.append(TrainItem(p.student_ids, p.teacher_ids, resp, index=i))
    mbs = trainer.microbatches(items)
    teacher_pass(trainer.teacher.acquire(), mbs, trainer.spec)
    trainer.policy.model.zero_grad_buffer()
    totals = student_pass(trainer.policy.model, mbs, trainer.spec, float(num_response_tokens(items)),
                          teacher_model=trainer.teacher.acquire())
    trainer.policy.model.zero_grad_buffer()
    trainer.policy.optimizer.zero_grad()
    per_item = {}
    for mb in mbs:
        if getattr(mb, "per_token_divergence", None) is None:
            continue  # not the last pipeline stage
        off = 0
        for index, length in zip(mb.item_indices, mb.response_lens):
            per_item[index] = mb.per_token_divergence[off: off + length].tolist()
            off += length
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, per_item)
    merged = {}
    for g in gathered:
        merged.update(g)
    return _reduce_metrics(totals, trainer.info.tp_size)["loss"], merged


LAYOUTS = [(2, 1), (1, 2), (1, 1)]  # (tp, pp) on 2 ranks: TP=2, PP=2, DP=2


def layout_worker(rank, world_size, layouts, model_dir, data_path, out_root):
    """Runs every layout in turn inside the same processes (saves a spawn + import per layout)."""
    from megatron_copsd.megatron.dist import destroy_distributed
    from megatron_copsd.metrics_log import read_metrics
    from megatron_copsd.trainer import Trainer

    results = {}
    for tp, pp in layouts:
        out = f"{out_root}/tp{tp}pp{pp}w{world_size}"
        try:
            trainer = Trainer(_cfg(model_dir, data_path, out, tp, pp))
            loss, per_token = probe_per_token(trainer)
            single = probe_per_token(trainer, num_items=1)  # DP=2: one rank runs a masked placeholder
            full_spec = trainer.spec
            trainer.spec = dataclasses.replace(full_spec, teacher_top_k=16)  # chunked torch path, TP all_gather
            topk = probe_per_token(trainer)
            trainer.spec = full_spec
            trainer.run()
        finally:
            destroy_distributed()
        recs = read_metrics(f"{out}/metrics.jsonl") if rank == 0 else None
        results[(tp, pp)] = {"probe_loss": loss, "per_token": per_token, "metrics": recs, "single": single,
                            "topk": topk}
    return results


def test_layouts_match_single_process(tmp_path):
    from megatron_copsd import tiny_run
    from megatron_copsd.data.loaders import load_copsd_training

    train, _ = tiny_run.write_fixture(tmp_path / "data", num_train=8, num_eval=2)
    model = tiny_run.materialize_tiny_model(tmp_path / "model", "qwen3", tiny_run.tokenizer_texts(
        load_copsd_training(train, "swa")))
    args = (str(model), str(train), str(tmp_path))
    ref = run_distributed(layout_worker, 1, args=([(1, 1)], *args), timeout=600)[0][(1, 1)]
    results = run_distributed(layout_worker, 2, args=(LAYOUTS, *args), timeout=900)[0]
    for (tp, pp), got in results.items():
        assert sorted(got["per_token"]) == sorted(ref["per_token"]) == list(range(5))
        for i in range(5):
            torch.testing.assert_close(torch.tensor(got["per_token"][i]), torch.tensor(ref["per_token"][i]),
                                       rtol=RTOL, atol=ATOL)
        assert got["probe_loss"] == pytest.approx(ref["probe_loss"], rel=RTOL, abs=ATOL)
        assert got["single"][0] == pytest.approx(ref["single"][0], rel=RTOL, abs=ATOL)
        torch.testing.assert_close(torch.tensor(got["single"][1][0]), torch.tensor(ref["single"][1][0]),
                                   rtol=RTOL, atol=ATOL)
        assert got["topk"][0] == pytest.approx(ref["topk"][0], rel=RTOL, abs=ATOL)
        assert got["topk"][0] != pytest.approx(got["probe_loss"], rel=1e-3)  # top-16 is a different objective
        for i in range(5):
            torch.testing.assert_close(torch.tensor(got["topk"][1][i]), torch.tensor(ref["topk"][1][i]),
                                       rtol=RTOL, atol=ATOL)
        # The first step of the full loop: same rollouts (rank 0, same seed), same loss and gradient norm.
        a, b = got["metrics"][0], ref["metrics"][0]
        assert a["response_len"] == b["response_len"] and a["tokens"] == b["tokens"]
        for key in ("loss", "divergence", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=RTOL, abs=ATOL), key
        print(f"layout tp={tp} pp={pp} dp={2 // (tp * pp)}: probe loss {got['probe_loss']:.8f} vs "
              f"{ref['probe_loss']:.8f}, step loss {a['loss']:.8f} vs {b['loss']:.8f}, "
              f"grad_norm {a['grad_norm']:.8f} vs {b['grad_norm']:.8f}")
