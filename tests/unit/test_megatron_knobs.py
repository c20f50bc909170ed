"""The parallel.* knobs reach megatron-core's own config objects (TransformerConfig, DDP config,
OptimizerConfig, init_process_group) and are validated in the run config.

What CPU cannot prove: the speed / memory effect of the knobs, and the TE-only fusions themselves (only
that they are passed when TE is present and dropped with a warning when not).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from megatron_copsd.config import config_from_dict, load_config
from megatron_copsd.derived_args import ddp_config_kwargs, megatron_optimizer_kwargs, transformer_overrides
from megatron_copsd.testing.tiny import tiny_hf_config

ROOT = Path(__file__).resolve().parents[2]


def _cfg(**parallel):
    return config_from_dict({"parallel": {"tp": 2, **parallel}})


def _tconfig(cfg, **kw):
    from megatron_copsd.megatron.model_provider import transformer_config_from_hf

    return transformer_config_from_hf(tiny_hf_config("qwen3", num_layers=4), tp_size=cfg.parallel.tp, pp_size=1,
                                      use_te=False, **transformer_overrides(cfg, use_te=False), **kw)


def test_sequence_parallel_and_recompute_reach_transformer_config():
    tc = _tconfig(_cfg(sequence_parallel=True, recompute="selective"))
    assert tc.sequence_parallel is True and tc.recompute_granularity == "selective"
    assert tc.recompute_modules == ["core_attn"] and tc.calculate_per_token_loss is True
    tc = _tconfig(_cfg(recompute="full", recompute_method="block", recompute_num_layers=2))
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == ("full", "block", 2)
    tc = _tconfig(_cfg())
    assert tc.sequence_parallel is False and tc.recompute_granularity is None


def test_local_spec_never_sets_te_only_fusions():
    tc = _tconfig(_cfg())
    # WrappedTorchNorm asserts persist_layer_norm is off; the masked-softmax kernel is not in the wheel.
    assert tc.persist_layer_norm is False and tc.masked_softmax_fusion is False


def test_te_fusions_passed_with_te_and_dropped_with_warning_without():
    cfg = _cfg(gradient_accumulation_fusion=True, apply_rope_fusion=True)
    with_te = transformer_overrides(cfg, use_te=True)
    assert with_te["gradient_accumulation_fusion"] is True and with_te["apply_rope_fusion"] is True
    with pytest.warns(UserWarning, match="parallel.apply_rope_fusion ignored"):
        without = transformer_overrides(cfg, use_te=False)
    assert "gradient_accumulation_fusion" not in without and "apply_rope_fusion" not in without
    assert _tconfig(cfg).apply_rope_fusion is False


def test_ddp_and_optimizer_configs():
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    cfg = _cfg(use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True,
               bucket_size=12_345_678)
    ddp = DistributedDataParallelConfig(**ddp_config_kwargs(cfg))
    assert (ddp.use_distributed_optimizer, ddp.overlap_grad_reduce, ddp.overlap_param_gather, ddp.bucket_size) == \
        (True, True, True, 12_345_678)
    opt = OptimizerConfig(**megatron_optimizer_kwargs(cfg, params_dtype=torch.bfloat16))
    assert opt.use_distributed_optimizer is True and opt.bf16 is True
    plain = DistributedDataParallelConfig(**ddp_config_kwargs(config_from_dict({})))
    assert (plain.overlap_grad_reduce, plain.overlap_param_gather, plain.bucket_size) == (False, False, None)


@pytest.mark.parametrize("overrides,field", [
    ({"overlap_param_gather": True, "overlap_grad_reduce": True}, "parallel.overlap_param_gather"),
    ({"overlap_param_gather": True, "use_distributed_optimizer": True}, "parallel.overlap_param_gather"),
    ({"recompute": "some"}, "parallel.recompute"),
    ({"recompute_method": "random"}, "parallel.recompute_method"),
    ({"recompute_num_layers": 0}, "parallel.recompute_num_layers"),
    ({"bucket_size": 0}, "parallel.bucket_size"),
    ({"timeout_minutes": 0}, "parallel.timeout_minutes"),
])
def test_invalid_knobs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        _cfg(**overrides)


def test_sequence_parallel_at_tp1_is_ignored_with_warning():
    with pytest.warns(UserWarning, match="sequence_parallel ignored"):
        cfg = config_from_dict({"parallel": {"tp": 1, "sequence_parallel": True}})
    assert cfg.parallel.sequence_parallel is False
    assert transformer_overrides(cfg)["sequence_parallel"] is False


@pytest.mark.parametrize("name", ["qwen3_1p7b_copsd", "qwen3_4b_copsd", "qwen3_8b_copsd", "qwen3_1p7b_grpo",
                                  "qwen3_4b_grpo", "qwen3_8b_grpo"])
def test_qwen3_examples_use_the_distributed_optimizer(name):
    cfg = load_config(ROOT / "examples" / f"{name}.yaml")
    assert cfg.parallel.use_distributed_optimizer is True
    assert ddp_config_kwargs(cfg)["use_distributed_optimizer"] is True


def test_process_group_timeout_reaches_init_process_group(monkeypatch):
    import datetime

    import torch.distributed as dist

    from megatron_copsd.megatron import dist as mdist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this test process")
    seen = {}

    class Stop(Exception):
        pass

    def fake_init(backend, **kw):
        seen.update(kw, backend=backend)
        raise Stop

    monkeypatch.setattr(dist, "init_process_group", fake_init)
    with warnings.catch_warnings(), pytest.raises(Stop):
        warnings.simplefilter("ignore")
        mdist.init_distributed(1, 1, timeout_minutes=7)
    assert seen["timeout"] == datetime.timedelta(minutes=7) and seen["backend"] == "gloo"
