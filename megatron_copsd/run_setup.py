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
    load_hf_into_model(model, hf_dir if isinstance(hf_dir, dict) else str(hf_dir), hf_config)
    model.return_hidden_states = True
    return model


def read_stage_weights(hf_dir, hf_config) -> dict:
    """The HF tensors this rank's pipeline stage loads, read once (policy and frozen teacher both load
    from it); other stages' tensors are never read. (Each TP rank still reads its stage's full tensors and
    slices them: safetensors slicing per TP rank is not done.)"""
    from megatron.core import parallel_state

    from megatron_copsd.checkpoint.convert import load_hf_state_dict, stage_hf_names

    names = stage_hf_names(hf_config, pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                           pp_size=parallel_state.get_pipeline_model_parallel_world_size())
    return load_hf_state_dict(hf_dir, names=names)


LOCAL_ATTENTION_BYTES_PER_SCORE = 6  # fp32 softmax output (its backward) + the params-dtype probabilities (value matmul)


def local_attention_bytes(cfg: Config, hf_config) -> int:
    """Upper bound of what megatron-core's local `DotProductAttention` (the spec without Transformer
    Engine) keeps for backward on one rank: per layer the [b, heads/tp, s, s] attention probabilities,
    for the worst micro-batch the packing allows (b * s <= max(train.micro_batch_tokens, s) with s at
    most data.max_prompt_tokens + rollout.max_new_tokens). With recomputation only one layer's scores
    are alive at a time."""
    p = cfg.parallel
    seq = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    tokens = max(cfg.train.micro_batch_tokens, seq)
    layers = hf_config.num_hidden_layers // p.pp if p.recompute == "none" else 1
    heads = hf_config.num_attention_heads // p.tp
    return tokens * seq * heads * LOCAL_ATTENTION_BYTES_PER_SCORE * layers


def check_attention_memory(cfg: Config, hf_config, *, use_te: bool, device_bytes: Optional[int],
                           max_fraction: float = 0.5) -> None:
    """ValueError when the local attention's scores alone would take more than `max_fraction` of the GPU:
    megatron-core 0.16 has no attention without TE that avoids materialising them."""
    if use_te or device_bytes is None:
        return
    need = local_attention_bytes(cfg, hf_config)
    if need > max_fraction * device_bytes:
        raise ValueError(
            f"without Transformer Engine, megatron-core's local attention keeps [batch, heads, seq, seq] scores for "
            f"backward: up to {need / 2**30:.1f} GiB per rank here (data.max_prompt_tokens + rollout.max_new_tokens "
            f"= {cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens}, train.micro_batch_tokens="
            f"{cfg.train.micro_batch_tokens}, parallel.tp={cfg.parallel.tp}, parallel.recompute={cfg.parallel.recompute}) "
            f"of {device_bytes / 2**30:.0f} GiB. Install transformer_engine (fused / flash attention), set "
            f"parallel.recompute=selective, or shorten the sequences")


def build_policy(cfg: Config, hf_dir, hf_config, params_dtype) -> Policy:
    """`hf_dir`: the HF folder, or the tensors `read_stage_weights` returned."""
    if torch.cuda.is_available():
        from megatron_copsd.megatron.device import compute_device
        from megatron_copsd.megatron.model_provider import te_available

        try:
            device_bytes = torch.cuda.get_device_properties(compute_device()).total_memory
        except (RuntimeError, AssertionError, ValueError):  # no real device (the dry run's fake CUDA)
            device_bytes = None
        check_attention_memory(cfg, hf_config, use_te=te_available(), device_bytes=device_bytes)
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
    """The model that scores the student's tokens under the privileged prompt (and the GRPO reference).

    EMA in low precision: with decay 0.999 each step moves a weight by 0.1% of its distance to the
    student, below bf16's resolution (2^-8 relative), so an in-place bf16 update barely moves. The EMA
    therefore runs on an fp32 master copy (4 bytes/param of the teacher's shard, kept where the teacher's
    weights are kept) and the bf16 weights are rounded from it after each update.

    Offload (`offload=True`, GPU only): the teacher's parameters live in pinned host memory between uses;
    `acquire` copies them to the GPU non_blocking and `release` drops the GPU copies (no copy back: a
    teacher pass does not change them). The LM head the student loss needs every micro-batch stays
    resident on the GPU (`head_weight`), so the student pass never brings the teacher back.
    """

    def __init__(self, mode: str, policy: Policy, build_copy: Callable[[], torch.nn.Module], *,
                 decay: float = 0.999, offload: bool = False) -> None:
        if mode not in ("fixed", "ema", "dynamic"):
            raise ValueError(f"teacher mode must be fixed, ema or dynamic, got {mode!r}")
        self.mode, self.policy, self.decay = mode, policy, decay
        self.offload = offload and torch.cuda.is_available() and mode != "dynamic"
        if offload and not torch.cuda.is_available():
            warnings.warn("objective.offload_teacher ignored: no GPU (the teacher already lives on CPU)")
        elif offload and mode == "dynamic":
            warnings.warn("objective.offload_teacher ignored: the dynamic teacher is the policy itself")
        self._copy: Optional[torch.nn.Module] = None if mode == "dynamic" else build_copy()
        self._params: dict = dict(self._copy.named_parameters()) if self._copy is not None else {}
        self._host: dict = {}
        self._master: dict = {}
        self._head: Optional[torch.Tensor] = None
        if self.offload:
            self._head = self._lm_head()
            self._head = None if self._head is None else self._head.detach().clone()
            for name, p in self._params.items():
                self._host[name] = p.data.to("cpu").pin_memory()
                p.data = self._host[name]
        if mode == "ema":
            for name, p in self._params.items():
                if p.dtype != torch.float32:
                    self._master[name] = p.data.float().pin_memory() if self.offload else p.data.float()

    def _lm_head(self) -> Optional[torch.Tensor]:
        from megatron_copsd.megatron.model_provider import lm_head_weight, unwrap_model

        if not getattr(unwrap_model(self._copy), "post_process", False):
            return None
        return lm_head_weight(self._copy)

    @property
    def separate_weights(self) -> bool:
        return self._copy is not None

    def acquire(self) -> torch.nn.Module:
        """The module to run the teacher pass with (its parameters copied to the GPU first when offloaded)."""
        if self._copy is None:
            return self.policy.model
        if self.offload:
            from megatron_copsd.megatron.device import compute_device, to_compute_device

            device = compute_device()
            for name, p in self._params.items():
                p.data = to_compute_device(self._host[name], device)
        return self._copy

    def release(self) -> None:
        if self.offload and self._copy is not None:
            for name, p in self._params.items():
                p.data = self._host[name]  # the GPU copy is freed; the host copy is unchanged

    def head_weight(self) -> Optional[torch.Tensor]:
        """This TP rank's LM-head rows of the teacher (None: dynamic teacher, or not the last PP stage).
        On the GPU even when the teacher is offloaded."""
        if self._copy is None:
            return None
        return self._head if self.offload else self._lm_head()

    @torch.no_grad()
    def after_step(self) -> None:
        """EMA update from the policy's current weights (no-op for fixed / dynamic), in fp32."""
        if self.mode != "ema":
            return
        src = dict(self.policy.inner.named_parameters())
        for name, p in self._params.items():
            s = src[name].detach()
            if name not in self._master:  # fp32 teacher: the parameter is its own master
                p.data.mul_(self.decay).add_(s.to(p.device, torch.float32), alpha=1.0 - self.decay)
                continue
            m = self._master[name]
            work = m.to(s.device, non_blocking=True) if self.offload else m
            work.mul_(self.decay).add_(s.float(), alpha=1.0 - self.decay)
            if self.offload:
                m.copy_(work, non_blocking=True)
                self._host[name].copy_(work.to(p.dtype), non_blocking=True)
            else:
                p.data.copy_(work)
        if self.offload:
            torch.cuda.synchronize()
            head = self._lm_head()  # between uses the parameters are the pinned host copies
            if head is not None and self._head is not None:
                self._head.copy_(head, non_blocking=True)

    def state_dict(self) -> dict:
        if self.mode != "ema":
            return {}
        out = {"ema": self._copy.state_dict()}
        if self._master:
            out["ema_master"] = {k: v.cpu() for k, v in self._master.items()}
        return out

    def load_state_dict(self, state: dict) -> None:
        if self.mode == "ema" and "ema" in state:
            self._copy.load_state_dict(state["ema"])
            masters = state.get("ema_master") or {}
            with torch.no_grad():
                for name, m in self._master.items():
                    m.copy_(masters[name] if name in masters else self._params[name].data.float())
            if self.offload and self._head is not None:
                self._head.copy_(self._lm_head())
