"""Megatron and SGLang arguments derived from the run config, one function each.

    OptimizerConfig(**megatron_optimizer_kwargs(cfg, params_dtype=torch.bfloat16))
    OptimizerParamScheduler(optimizer, **megatron_scheduler_kwargs(cfg))
    build_gpt_model(hf_config, **transformer_overrides(cfg))
    DistributedDataParallelConfig(**ddp_config_kwargs(cfg))
    ["python", "-m", "sglang.launch_server", *sglang_launch_args(cfg, model_path, port=30000)]
"""
from __future__ import annotations

from megatron_copsd.config import Config

def resolve_dtype(cfg: Config, cuda_available: bool):
    import torch

    if cfg.model.dtype == "bf16" or (cfg.model.dtype == "auto" and cuda_available):
        return torch.bfloat16
    return torch.float32


def megatron_optimizer_kwargs(cfg: Config, *, params_dtype) -> dict:
    """Keyword arguments for `megatron.core.optimizer.OptimizerConfig` (AdamW with grad clipping)."""
    import torch

    o = cfg.optim
    return dict(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        decoupled_weight_decay=True,
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )


def megatron_scheduler_kwargs(cfg: Config) -> dict:
    """Keyword arguments for `megatron.core.optimizer_param_scheduler.OptimizerParamScheduler`
    (minus the optimizer). One scheduler step per optimizer step."""
    o = cfg.optim
    decay_steps = max(cfg.train.steps, o.warmup_steps + 1)
    return dict(
        init_lr=0.0 if o.warmup_steps > 0 else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )


TE_ONLY_FUSIONS = ("gradient_accumulation_fusion", "apply_rope_fusion")


def transformer_overrides(cfg: Config, *, use_te: bool | None = None) -> dict:
    """TransformerConfig attributes of the policy / teacher models (build_gpt_model overrides).

    `calculate_per_token_loss=True` stops Megatron from dividing the loss by the number of micro-batches
    and from averaging gradients over data-parallel ranks: our objectives already divide by the global
    valid-token count, so gradients summed over micro-batches and DP ranks are the global token mean.
    Sequence parallelism, recomputation and the TE fusions come from `cfg.parallel`; a TE-only fusion
    asked for without Transformer Engine (`use_te`, default: TE imports and a GPU is present) is dropped
    with a warning.
    """
    import warnings

    p = cfg.parallel
    out = dict(calculate_per_token_loss=True, sequence_parallel=bool(p.sequence_parallel and p.tp > 1))
    if p.recompute == "selective":
        out.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif p.recompute == "full":
        out.update(recompute_granularity="full", recompute_method=p.recompute_method,
                   recompute_num_layers=p.recompute_num_layers)
    if any(getattr(p, name) for name in TE_ONLY_FUSIONS):
        if use_te is None:
            from megatron_copsd.megatron.model_provider import te_available

            use_te = te_available()
        for name in TE_ONLY_FUSIONS:
            if getattr(p, name):
                if use_te:
                    out[name] = True
                else:
                    warnings.warn(f"parallel.{name} ignored: it needs Transformer Engine on a GPU")
    return out


def ddp_config_kwargs(cfg: Config) -> dict:
    """Keyword arguments for `megatron.core.distributed.DistributedDataParallelConfig`."""
    p = cfg.parallel
    return dict(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        bucket_size=p.bucket_size,
        use_distributed_optimizer=p.use_distributed_optimizer,
    )


def sglang_launch_args(cfg: Config, model_path: str, *, port: int = 30000, host: str = "0.0.0.0") -> list[str]:
    """Command-line arguments of `python -m sglang.launch_server` for one rollout server (the same builder
    as slurm/sglang_servers.sh: weight version 0, deterministic inference when rollout seeds are sent)."""
    from megatron_copsd.rollout.launch import server_command

    dtype = {"bf16": "bfloat16", "fp32": "float32", "auto": "bfloat16"}[cfg.model.dtype]
    r = cfg.rollout
    return server_command(model_path, tp=r.sglang_tp, host=host, port=port, mem_fraction=r.sglang_mem_fraction,
                          seed=cfg.train.seed, dtype=dtype, deterministic=r.sglang_deterministic,
                          weight_sync=r.weight_sync, python="python")[3:]
