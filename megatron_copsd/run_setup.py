"""Building the Megatron side of a run: policy model + DDP + optimizer + LR schedule, and the teacher.

    policy = build_policy(cfg, hf_dir, hf_config, params_dtype)   # Policy(model, optimizer, scheduler)
    teacher = Teacher(cfg.objective.teacher, policy, lambda: build_frozen_copy(hf_dir, hf_config, dtype),
                      decay=cfg.objective.ema_decay, offload=cfg.objective.offload_teacher)

The policy is a `HiddenStateGPTModel` (final-norm hidden states out, LM head applied in the fused kernel)
wrapped in Megatron's `DistributedDataParallel`, stepped by `get_megatron_optimizer` (AdamW, gradient
clipping) and `OptimizerParamScheduler`. Teacher modes: `fixed` is a frozen copy of the initial weights
with the same TP/PP sharding; `ema` is such a copy updated after every optimizer step as
`t <- decay * t + (1 - decay) * s`; `dynamic` is the policy itself (current weights, no gradient).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_copsd.config import Config
from megatron_copsd.derived_args import (
    ddp_config_kwargs,
    megatron_optimizer_kwargs,
    megatron_scheduler_kwargs,
    transformer_overrides,
)


@dataclass
class Policy:
    model: torch.nn.Module  # DDP-wrapped HiddenStateGPTModel
    optimizer: object  # MegatronOptimizer
    scheduler: object  # OptimizerParamScheduler

    @property
    def inner(self):
        from megatron_copsd.megatron.model_provider import unwrap_model

        return unwrap_model(self.model)


def _build_model(hf_dir, hf_config, params_dtype, overrides: dict):
    from megatron_copsd.checkpoint.convert import load_hf_into_model
    from megatron_copsd.megatron.model_provider import build_gpt_model

    model = build_gpt_model(hf_config, params_dtype=params_dtype, **overrides)
    load_hf_into_model(model, str(hf_dir), hf_config)
    model.return_hidden_states = True
    return model


def build_policy(cfg: Config, hf_dir, hf_config, params_dtype) -> Policy:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    model = _build_model(hf_dir, hf_config, params_dtype, transformer_overrides(cfg))
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(**ddp_config_kwargs(cfg)),
                                  module=model)
    optimizer = get_megatron_optimizer(OptimizerConfig(**megatron_optimizer_kwargs(cfg, params_dtype=params_dtype)),
                                       [ddp])
    scheduler = OptimizerParamScheduler(optimizer, **megatron_scheduler_kwargs(cfg))
    # The schedules read these hooks from the model config (Megatron's training.py sets the same).
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.grad_scale_func = optimizer.scale_loss
    return Policy(ddp, optimizer, scheduler)


def build_frozen_copy(cfg: Config, hf_dir, hf_config, params_dtype):
    model = _build_model(hf_dir, hf_config, params_dtype, transformer_overrides(cfg))
    model.requires_grad_(False)
    model.eval()
    return model


class Teacher:
    """The model that scores the student's tokens under the privileged prompt (and the GRPO reference)."""

    def __init__(self, mode: str, policy: Policy, build_copy: Callable[[], torch.nn.Module], *,
                 decay: float = 0.999, offload: bool = False) -> None:
        if mode not in ("fixed", "ema", "dynamic"):
            raise ValueError(f"teacher mode must be fixed, ema or dynamic, got {mode!r}")
        self.mode, self.policy, self.decay = mode, policy, decay
        self.offload = offload and torch.cuda.is_available()
        if offload and not torch.cuda.is_available():
            warnings.warn("objective.offload_teacher ignored: no GPU (the teacher already lives on CPU)")
        self._copy: Optional[torch.nn.Module] = None if mode == "dynamic" else build_copy()
        if self.offload:
            self._copy.cpu()

    @property
    def separate_weights(self) -> bool:
        return self._copy is not None

    def acquire(self) -> torch.nn.Module:
        """The module to run the teacher pass with (moved to the GPU first when offloaded)."""
        if self._copy is None:
            return self.policy.model
        if self.offload:
            self._copy.cuda(torch.cuda.current_device())
        return self._copy

    def release(self) -> None:
        if self.offload and self._copy is not None:
            self._copy.cpu()

    @torch.no_grad()
    def after_step(self) -> None:
        """EMA update from the policy's current weights (no-op for fixed / dynamic)."""
        if self.mode != "ema":
            return
        src = dict(self.policy.inner.named_parameters())
        for name, p in self._copy.named_parameters():
            p.mul_(self.decay).add_(src[name].detach().to(p.device, p.dtype), alpha=1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"ema": self._copy.state_dict()} if self.mode == "ema" else {}

    def load_state_dict(self, state: dict) -> None:
        if self.mode == "ema" and "ema" in state:
            self._copy.load_state_dict(state["ema"])
