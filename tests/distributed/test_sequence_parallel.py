"""Sequence parallelism at TP=2 on gloo (real megatron-core): same COPSD loss and gradients as without it.

The policy is built through `run_setup.build_policy` (DDP, finalize hooks) with `parallel.sequence_parallel`
on and off; one teacher pass (the policy as dynamic teacher) and one student pass over the same micro-batches,
whose odd lengths are padded to a multiple of TP only under SP. Gradients are Megatron's `main_grad` after
`finalize_model_grads` (which all-reduces the sequence-parallel norm weights' gradients). What CPU cannot
prove: the overlap of SP's all-gather / reduce-scatter with compute on NCCL.
"""
from __future__ import annotations

import pytest
import torch

from megatron_copsd.testing.multiproc import run_distributed
from megatron_copsd.testing.tiny import make_tiny_hf_model

pytestmark = pytest.mark.distributed


def _items(vocab):
    from megatron_copsd.batching import TrainItem

    g = torch.Generator().manual_seed(3)
    items = []
    for i, (ps, pt, r) in enumerate([(6, 8, 6), (4, 9, 3), (7, 7, 5)]):  # odd and even total lengths
        ids = lambda n: torch.randint(2, vocab, (n,), generator=g).tolist()  # noqa: E731
        items.append(TrainItem(ids(ps), ids(pt), ids(r), index=i))
    return items


def sp_worker(rank, world_size, hf_dir, out_root):
    from megatron_copsd import run_setup
    from megatron_copsd.batching import collate, num_response_tokens
    from megatron_copsd.config import config_from_dict
    from megatron_copsd.megatron.dist import destroy_distributed, init_distributed
    from megatron_copsd.megatron.model_provider import load_hf_config
    from megatron_copsd.train_step import ObjectiveSpec, student_pass, teacher_pass
    from megatron_copsd.trainer import _reduce_metrics

    torch.set_num_threads(1)
    hf_config = load_hf_config(hf_dir)
    init_distributed(2, 1)
    items = _items(hf_config.vocab_size)
    spec = ObjectiveSpec(name="copsd", divergence="jsd", beta=0.5, valid_vocab=hf_config.vocab_size,
                         separate_teacher_weights=False)
    out = {}
    for sp in (False, True):
        cfg = config_from_dict({"model": {"hf_path": hf_dir}, "parallel": {"tp": 2, "sequence_parallel": sp},
                                "train": {"output_dir": out_root}})
        policy = run_setup.build_policy(cfg, hf_dir, hf_config, torch.float32)
        mbs = [collate(items[:2], pad_id=0, pad_multiple=2 if sp else 1), collate(items[2:], pad_id=0,
                                                                                 pad_multiple=2 if sp else 1)]
        teacher_pass(policy.model, mbs, spec)
        policy.model.zero_grad_buffer()
        totals = student_pass(policy.model, mbs, spec, float(num_response_tokens(items)))
        grads = {n: p.main_grad.detach().clone() for n, p in policy.inner.named_parameters()}
        out[sp] = dict(loss=_reduce_metrics(totals, 2)["loss"], grads=grads, seq=mbs[0].student.tokens.shape[1],
                       config_sp=policy.inner.config.sequence_parallel)
    destroy_distributed()
    return out


def test_sequence_parallel_matches_tp_only(tmp_path):
    hf_dir = tmp_path / "hf"
    make_tiny_hf_model(hf_dir, family="qwen3", num_layers=2)
    results = run_distributed(sp_worker, 2, (str(hf_dir), str(tmp_path / "out")), timeout=240)
    for res in results:
        ref, sp = res[False], res[True]
        assert ref["config_sp"] is False and sp["config_sp"] is True  # reached megatron's TransformerConfig
        assert sp["seq"] % 2 == 0 and ref["seq"] % 2 == 1  # padded to a multiple of TP only under SP
        assert abs(sp["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]) + 1e-7, (sp["loss"], ref["loss"])
        assert set(sp["grads"]) == set(ref["grads"])
        for name, g in ref["grads"].items():
            assert g.abs().sum() > 0 or "layernorm" in name, name  # the step really produced gradients
            torch.testing.assert_close(sp["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
