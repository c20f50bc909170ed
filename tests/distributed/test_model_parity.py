"""Megatron model vs transformers, in real multi-process gloo runs through the real megatron-core.

One launch of 2 processes runs every check (spawn + import dominate the cost):
- TP=2 (then TP=1 in the same processes): logits, hidden-state path, HF round trip, fwd/bwd loss and
  gathered gradients vs transformers and vs TP=1, Megatron optimizer step with clipping, dist checkpoint.
- PP=2: logits and fwd/bwd through `get_forward_backward_func()` with 4 micro-batches.
Cases: Qwen3 (q/k norm, untied embeddings), Llama (tied embeddings), Qwen2 (q/k/v bias).
"""
from __future__ import annotations

import pytest
import torch

from megatron_copsd.testing.multiproc import run_distributed
from megatron_copsd.testing.tiny import make_tiny_hf_model

pytestmark = pytest.mark.distributed

CASES = {
    "qwen3": dict(family="qwen3", tie_word_embeddings=False),  # q/k norm
    "llama": dict(family="llama", tie_word_embeddings=True),
    "qwen2": dict(family="qwen2", tie_word_embeddings=False),  # q/k/v bias
}
BATCH, SEQ, NUM_MICRO = 2, 9, 4
LOGIT_ATOL = 1e-4  # fp32, acceptance criterion


def _inputs(vocab: int, num: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (num * BATCH, SEQ + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _hf_reference(model, ids, labels):
    model.zero_grad()
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return logits.detach(), loss.detach(), grads


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, kw in CASES.items():
        d = tmp_path_factory.mktemp(name)
        hf = make_tiny_hf_model(d, **kw)
        ids, labels = _inputs(hf.config.vocab_size)
        pp_ids, pp_labels = _inputs(hf.config.vocab_size, NUM_MICRO, seed=1)
        out[name] = dict(dir=str(d), model=hf, ids=ids, labels=labels, ref=_hf_reference(hf, ids, labels),
                         pp_ids=pp_ids, pp_labels=pp_labels, pp_ref=_hf_reference(hf, pp_ids, pp_labels))
    return out


# ----------------------------------------------------------------------------------- worker helpers

def _build(hf_dir, tp, pp):
    from megatron_copsd.checkpoint.convert import load_hf_into_model
    from megatron_copsd.megatron.dist import init_distributed
    from megatron_copsd.megatron.model_provider import build_gpt_model, load_hf_config

    init_distributed(tp, pp)
    cfg = load_hf_config(hf_dir)
    model = build_gpt_model(cfg)
    load_hf_into_model(model, hf_dir, cfg)
    return cfg, model


def _wrap_ddp(model, use_distributed_optimizer=False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(use_distributed_optimizer=use_distributed_optimizer)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)


def _ce(logits, labels, vocab):
    # Padded vocab rows are sliced away before the softmax: they must never reach a loss.
    logits = logits[..., :vocab]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab).float(), labels.reshape(-1))


def _gathered_grads(model, cfg):
    """HF-named full gradients: Megatron main_grad (after finalize_model_grads) through the same maps."""
    from megatron_copsd.checkpoint.convert import gather_to_hf
    from megatron_copsd.megatron.model_provider import unwrap_model

    local = {}
    for name, p in unwrap_model(model).named_parameters():
        g = getattr(p, "main_grad", None)
        local[name] = (g if g is not None else p.grad).detach().clone()
    return gather_to_hf(local, cfg)


def _tp_worker(rank, world_size, case):
    import tempfile

    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_copsd.checkpoint.convert import gather_hf_state_dict, hf_to_megatron, load_hf_state_dict, megatron_to_hf
    from megatron_copsd.megatron.dist import destroy_distributed
    from megatron_copsd.megatron.model_provider import build_gpt_model, lm_head_weight, vocab_shard_info

    hf_dir, ids, labels = case["dir"], case["ids"], case["labels"]
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    cfg, model = _build(hf_dir, 2, 1)
    out = {}
    tp_rank = parallel_state.get_tensor_model_parallel_rank()

    # Logits (gathered over TP) and the hidden-state path against the local vocab shard.
    model.eval()
    with torch.no_grad():
        out["logits"] = model(ids, pos, None, runtime_gather_output=True)[..., : cfg.vocab_size].clone()
        local_logits = model(ids, pos, None)  # [b, s, V_pad / tp]
        model.return_hidden_states = True
        hidden = model(ids, pos, None)  # [s, b, h]
        model.return_hidden_states = False
        via_head = torch.einsum("sbh,vh->bsv", hidden, lm_head_weight(model))
    out["hidden_shape"] = tuple(hidden.shape)
    out["head_diff"] = (via_head - local_logits).abs().max().item()
    out["shard_info"] = vocab_shard_info(model, cfg.vocab_size)
    out["local_vocab"] = local_logits.shape[-1]

    # HF -> Megatron -> HF, bit-exact; the pure per-rank conversion equals what the model holds.
    hf_state = load_hf_state_dict(hf_dir)
    gathered = gather_hf_state_dict(model, cfg)
    out["roundtrip_equal"] = sorted(hf_state) == sorted(gathered) and all(torch.equal(hf_state[k], gathered[k]) for k in hf_state)
    mine = {k: v.detach() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    pure = hf_to_megatron(hf_state, cfg, tp_rank=tp_rank, tp_size=2)
    out["pure_equal"] = sorted(mine) == sorted(pure) and all(torch.equal(mine[k], pure[k]) for k in pure)
    all_states = [None, None]
    torch.distributed.all_gather_object(all_states, pure)
    back = megatron_to_hf([all_states], cfg)
    out["offline_roundtrip_equal"] = all(torch.equal(hf_state[k], back[k]) for k in hf_state)

    # Forward/backward through Megatron DDP + finalize_model_grads (sums q/k-norm grads over TP).
    model.train()
    ddp = _wrap_ddp(model)
    ddp.zero_grad_buffer()
    loss = _ce(ddp(ids, pos, None, runtime_gather_output=True), labels, cfg.vocab_size)
    loss.backward()
    finalize_model_grads([ddp])
    out["loss"] = loss.item()
    out["grads"] = _gathered_grads(ddp, cfg)

    # Megatron's optimizer accepts the CPU params (Tensor.type shim) and clips over TP correctly.
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1e-3, bf16=False, fp16=False,
                                                 params_dtype=torch.float32), [ddp])
    ok, grad_norm, _ = opt.step()
    out["opt_ok"], out["grad_norm"] = bool(ok), float(grad_norm)
    after = gather_hf_state_dict(ddp, cfg)
    out["param_delta"] = max((after[k] - hf_state[k]).abs().max().item() for k in hf_state)

    # Megatron distributed checkpoint at TP=2: save, load into a fresh model, identical state.
    ckpt = [tempfile.mkdtemp(prefix="copsd-dcp-") if rank == 0 else None]
    torch.distributed.broadcast_object_list(ckpt, src=0)
    from megatron_copsd.checkpoint.megatron_io import load_dist_checkpoint, save_dist_checkpoint

    save_dist_checkpoint(model, ckpt[0])
    fresh = build_gpt_model(cfg)
    load_dist_checkpoint(fresh, ckpt[0])
    reloaded = gather_hf_state_dict(fresh, cfg)
    out["dcp_equal"] = all(torch.equal(after[k], reloaded[k]) for k in after)

    # The distributed optimizer variant (shards optimizer state over DP) also steps on CPU.
    fresh_ddp = _wrap_ddp(fresh, use_distributed_optimizer=True)
    fresh_ddp.zero_grad_buffer()
    _ce(fresh_ddp(ids, pos, None, runtime_gather_output=True), labels, cfg.vocab_size).backward()
    finalize_model_grads([fresh_ddp])
    dist_opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, bf16=False, fp16=False,
                                                      params_dtype=torch.float32, use_distributed_optimizer=True),
                                      [fresh_ddp])
    ok, grad_norm, _ = dist_opt.step()
    stepped = gather_hf_state_dict(fresh_ddp, cfg)
    out["dist_opt_ok"] = bool(ok) and 0 < float(grad_norm) < float("inf")
    out["dist_opt_delta"] = max((stepped[k] - after[k]).abs().max().item() for k in after)

    # TP=1 reference in the same processes (DP=2): plain autograd, no TP collectives.
    destroy_distributed()
    del ddp, opt, fresh_ddp, dist_opt
    _, ref_model = _build(hf_dir, 1, 1)
    ref_loss = _ce(ref_model(ids, pos, None), labels, cfg.vocab_size)
    ref_loss.backward()
    out["tp1_loss"] = ref_loss.item()
    out["tp1_grads"] = _gathered_grads(ref_model, cfg)
    destroy_distributed()
    return _portable(out)


def _pp_worker(rank, world_size, case):
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_copsd.megatron.dist import destroy_distributed

    cfg, model = _build(case["dir"], 1, 2)
    ids_all, labels_all = case["pp_ids"], case["pp_labels"]
    ddp = _wrap_ddp(model)
    config = model.config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    V = cfg.vocab_size

    def batches():
        for m in range(NUM_MICRO):
            sl = slice(m * BATCH, (m + 1) * BATCH)
            yield ids_all[sl], labels_all[sl]

    def run(forward_only):
        it = batches()

        def forward_step(data_iterator, chunk):
            ids, labels = next(data_iterator)
            pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
            output = chunk(ids, pos, None)

            def loss_func(logits):
                loss = _ce(logits, labels, V)
                # clone: the schedule scales `loss` in place (/ num_microbatches)
                return loss, {"logits": logits[..., :V].detach().clone(), "loss": loss.detach().clone()}

            return output, loss_func

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=it, model=[ddp], num_microbatches=NUM_MICRO,
            seq_length=SEQ, micro_batch_size=BATCH, forward_only=forward_only)

    out = {"last": parallel_state.is_pipeline_last_stage()}
    with torch.no_grad():
        ddp.eval()
        stored = run(True)
    if out["last"]:
        out["logits"] = torch.cat([d["logits"] for d in stored], dim=0)
    ddp.train()
    ddp.zero_grad_buffer()
    stored = run(False)  # the schedule calls finalize_model_grads (PP embedding-grad all-reduce when tied)
    if out["last"]:
        out["loss"] = torch.stack([d["loss"] for d in stored]).mean().item()
    out["grads"] = _gathered_grads(ddp, cfg)
    destroy_distributed()
    return _portable(out)


def _portable(obj):
    """Tensors -> numpy for the trip to the parent: torch's queue shares tensors through file descriptors,
    which vanish when the child exits first."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _portable(v) for k, v in obj.items()}
    return obj


def _from_portable(obj):
    import numpy as np

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _from_portable(v) for k, v in obj.items()}
    return obj


def _max_grad_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _hf_grads(case):
    grads = dict(case["ref"][2])
    if case["model"].config.tie_word_embeddings:
        grads.pop("lm_head.weight", None)
    return grads


def _all_worker(rank, world_size, cases):
    """One launch for everything: spawning and importing megatron-core dominates the cost."""
    return {name: {"tp": _tp_worker(rank, world_size, case), "pp": _pp_worker(rank, world_size, case)}
            for name, case in cases.items()}


@pytest.fixture(scope="module")
def all_results(models):
    keys = ("dir", "ids", "labels", "pp_ids", "pp_labels")
    cases = {k: {kk: v[kk] for kk in keys} for k, v in models.items()}
    per_rank = [_from_portable(r) for r in run_distributed(_all_worker, 2, args=(cases,), timeout=600)]
    return {name: {part: [r[name][part] for r in per_rank] for part in ("tp", "pp")} for name in cases}


@pytest.fixture(scope="module")
def tp_results(all_results):
    return {name: r["tp"] for name, r in all_results.items()}


@pytest.fixture(scope="module")
def pp_results(all_results):
    return {name: r["pp"] for name, r in all_results.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_tp2_logits_and_hidden_path(models, tp_results, name):
    ref_logits = models[name]["ref"][0]
    for rank, r in enumerate(tp_results[name]):
        assert (r["logits"] - ref_logits).abs().max().item() <= LOGIT_ATOL
        assert r["hidden_shape"] == (SEQ, BATCH, 64)
        assert r["head_diff"] <= 1e-5
        assert r["local_vocab"] == 256  # 301 padded to 512 = multiple of tp*128, split over 2 ranks
        assert r["shard_info"] == (rank * 256, 301)


@pytest.mark.parametrize("name", list(CASES))
def test_tp2_roundtrip_bit_exact(tp_results, name):
    for r in tp_results[name]:
        assert r["roundtrip_equal"] and r["pure_equal"] and r["offline_roundtrip_equal"]


@pytest.mark.parametrize("name", list(CASES))
def test_tp2_fwd_bwd_matches_tp1_and_transformers(models, tp_results, name):
    _, ref_loss, _ = models[name]["ref"]
    hf_grads = _hf_grads(models[name])
    scale = max(g.abs().max().item() for g in hf_grads.values())
    for r in tp_results[name]:
        assert abs(r["loss"] - r["tp1_loss"]) <= 1e-5
        assert abs(r["loss"] - ref_loss.item()) <= 1e-5
        assert _max_grad_diff(r["grads"], r["tp1_grads"]) <= 1e-5 * max(1.0, scale)
        assert _max_grad_diff(r["grads"], hf_grads) <= 1e-5 * max(1.0, scale)


@pytest.mark.parametrize("name", list(CASES))
def test_tp2_megatron_optimizer_and_dist_checkpoint(models, tp_results, name):
    hf_grads = _hf_grads(models[name])
    true_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in hf_grads.values())).item()
    for r in tp_results[name]:
        assert r["opt_ok"]
        # The clipping norm counts replicated params once and sharded params fully: equals the HF norm.
        assert abs(r["grad_norm"] - true_norm) <= 1e-4 * true_norm
        assert 0 < r["param_delta"] < 1e-2
        assert r["dcp_equal"]
        assert r["dist_opt_ok"] and 0 < r["dist_opt_delta"] < 1e-2


@pytest.mark.parametrize("name", list(CASES))
def test_pp2_schedule_logits_and_grads(models, pp_results, name):
    ref_logits, ref_loss, _ = models[name]["pp_ref"]
    hf_grads = dict(models[name]["pp_ref"][2])
    if models[name]["model"].config.tie_word_embeddings:
        hf_grads.pop("lm_head.weight", None)
    last = [r for r in pp_results[name] if r["last"]]
    assert len(last) == 1
    assert (last[0]["logits"] - ref_logits).abs().max().item() <= LOGIT_ATOL
    assert abs(last[0]["loss"] - ref_loss.item()) <= 1e-5
    scale = max(g.abs().max().item() for g in hf_grads.values())
    for r in pp_results[name]:
        # The schedule averages micro-batch losses; equal-size micro-batches make that the global mean.
        assert _max_grad_diff(r["grads"], hf_grads) <= 1e-5 * max(1.0, scale)
