"""What a training checkpoint holds, as one megatron-core sharded state dict (see checkpoint/state.py).

    sd = sharded_training_state(policy, teacher, common={...})                   # to save
    sd = sharded_training_state(policy, teacher, common={...}, is_loading=True)  # template to load into
    common = apply_training_state(policy, teacher, load_sharded(path, sd))

Keys:
    model.*       the policy's `sharded_state_dict()`: each tensor keyed by its global (unsharded) name and
                  shape with this rank's slice, so any TP / PP layout can load it
    optimizer.*   the Megatron optimizer's `sharded_state_dict()` on top of the model's: fp32 main params and
                  Adam moments per parameter. With the distributed optimizer, `optimizer_sharding` picks
                  megatron-core's format: `fully_reshardable` (default) all-gathers each TP/PP shard's state
                  over DP before the write and stores it per parameter in model space, so any TP / PP / DP
                  layout can load it; `dp_reshardable` writes each DP rank's own buffer slice with no
                  communication (fastest at scale) but only reloads on the same TP / PP layout.
                  Either way each byte is written once: replicas split the writes (fully parallel save).
    teacher_ema.* the EMA teacher's weights (same sharding as the policy), only in `ema` mode, and
    teacher_ema_master.*  its fp32 masters (bf16 runs), so the EMA resumes exactly
    common        plain values, identical on every rank, written once (common.pt): scheduler, data
                  position, step, counters, layout
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

OPTIMIZER_SHARDINGS = ("fully_reshardable", "dp_reshardable")


def sharded_training_state(policy, teacher, *, common: dict, is_loading: bool = False,
                           optimizer_sharding: str = "fully_reshardable") -> dict:
    from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

    if optimizer_sharding not in OPTIMIZER_SHARDINGS:
        raise ValueError(f"checkpoint.optimizer_sharding must be one of {OPTIMIZER_SHARDINGS}, got {optimizer_sharding!r}")
    metadata = {"distrib_optim_sharding_type": optimizer_sharding}
    if is_loading:
        _init_empty_adam_state(policy.optimizer)
    model_sd = policy.inner.sharded_state_dict(metadata=metadata)
    optim_sd = _optimizer_sharded_state_dict(policy.optimizer, model_sd, is_loading, metadata)
    out = {"model": model_sd, "optimizer": optim_sd, "scheduler": policy.scheduler.state_dict(), "common": common}
    if teacher.mode == "ema":
        teacher_sd = teacher._copy.sharded_state_dict(metadata=metadata)
        add_prefix_for_sharding(teacher_sd, "teacher_ema.")
        out["teacher_ema"] = teacher_sd
        if teacher._master:
            out["teacher_ema_master"] = _master_sharded(teacher, metadata)
    return out


def _master_sharded(teacher, metadata) -> dict:
    """The fp32 EMA masters, sharded like the teacher's weights (same global keys, other prefix)."""
    import dataclasses

    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

    sd = teacher._copy.sharded_state_dict(metadata=metadata)
    out = {}
    for name, entry in sd.items():
        master = teacher._master.get(name)
        if master is None:
            continue
        extra = {"dtype": master.dtype} if isinstance(entry, ShardedTensor) else {}
        out[name] = dataclasses.replace(entry, data=master, **extra)
    if len(out) != len(teacher._master):
        missing = sorted(set(teacher._master) - set(out))
        raise RuntimeError(f"EMA masters without a sharded-state entry: {missing[:5]}")
    add_prefix_for_sharding(out, "teacher_ema_master.")
    return out


def apply_training_state(policy, teacher, loaded: dict) -> dict:
    """Loads model, optimizer, scheduler and EMA teacher from `loaded`; returns its `common` part."""
    policy.inner.load_state_dict(loaded["model"], strict=True)
    optim_sd = loaded["optimizer"]
    if isinstance(optim_sd.get("fp32_from_fp16_params"), dict):  # see _mixed_float16_sharded_state_dict
        groups = optim_sd["fp32_from_fp16_params"]
        optim_sd["fp32_from_fp16_params"] = [groups.get(str(i), []) for i in range(len(groups))]
    with _keep_torch_adam_step(policy.optimizer):
        policy.optimizer.load_state_dict(optim_sd)
    _unshare_adam_steps(policy.optimizer)
    policy.scheduler.load_state_dict(loaded["scheduler"])
    if teacher.mode == "ema":
        if "teacher_ema" not in loaded:
            raise ValueError("resume: objective.teacher=ema but the checkpoint holds no EMA teacher")
        teacher._copy.load_state_dict(loaded["teacher_ema"], strict=True)
        masters = loaded.get("teacher_ema_master", {})
        with torch.no_grad():
            for name, m in teacher._master.items():  # no masters saved (fp32 run): rounded from the weights
                m.copy_(masters[name] if name in masters else teacher._params[name].data.float())
        if teacher.offload and teacher._head is not None:
            teacher._head.copy_(teacher._lm_head())
    return loaded["common"]


def _unshare_adam_steps(optimizer) -> None:
    """megatron-core can give every parameter the *same* `step` tensor on load; torch's Adam would then
    increment it once per parameter per step (wrong bias correction). Each parameter gets its own copy."""
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(o, "optimizer", None)
        if inner is None:
            continue
        for param_state in inner.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()


def _init_empty_adam_state(optimizer) -> None:
    """A fresh torch Adam has no per-parameter state, and megatron-core 0.16's distributed optimizer cannot
    describe an empty state (`state_dict` reads the common `step`; TE / apex keep it elsewhere). Zero
    moments and step are created in place -- the load overwrites them -- instead of megatron-core's dummy
    optimizer step, which would also apply weight decay to the parameters."""
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(o, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam) or len(inner.state) > 0:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p].update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                                      exp_avg_sq=torch.zeros_like(p))


@contextmanager
def _keep_torch_adam_step(optimizer):
    """megatron-core 0.16's `fully_reshardable` loader skips torch Adam's per-parameter `step` (restored
    from the param groups by `load_state_dict`) but then copies every key of the optimizer state, `step`
    included, and fails with KeyError('step') when TE / apex are absent. For the duration of the load each
    parameter's `step` is copied onto itself instead."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = []
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(o, DistributedOptimizer) or not isinstance(o.optimizer, torch.optim.Adam):
            continue
        original = o._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, _o=o, _original=original):
            if "step" not in tensors:
                current = _o._get_main_param_and_optimizer_states(model_param)
                if "step" in current:
                    tensors = {**tensors, "step": current["step"]}
            _original(model_param, tensors)

        o._set_main_param_and_optimizer_states = set_states
        patched.append(o)
    try:
        yield
    finally:
        for o in patched:
            del o._set_main_param_and_optimizer_states  # back to the class method


def _optimizer_sharded_state_dict(optimizer, model_sd: dict, is_loading: bool, metadata: dict) -> dict:
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    if (len(subs) == 1 and isinstance(subs[0], Float16OptimizerWithFloat16Params)
            and any(len(g) for g in subs[0].fp32_from_fp32_groups)):
        return _mixed_float16_sharded_state_dict(subs[0], model_sd, is_loading)
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)


def _mixed_float16_sharded_state_dict(o, model_sd: dict, is_loading: bool) -> dict:
    """megatron-core 0.16's `Float16OptimizerWithFloat16Params.sharded_state_dict` numbers the optimizer's
    parameters as if all were bf16 and fails ("Param id N does not match any model sharded param") when
    some stay fp32 -- the local spec's norm weights without Transformer Engine. Same format, with the
    numbering of the inner optimizer's param groups (bf16 params through their fp32 main copies)."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )

    if is_loading:
        o.init_state_fn(o.optimizer, o.config)
    state_dict = o.state_dict()
    main_to_model = {id(main): model for g16, g32 in zip(o.float16_groups, o.fp32_from_float16_groups)
                     for model, main in zip(g16, g32)}
    inner = [p for g in o.optimizer.param_groups for p in g["params"]]
    id_map = get_param_id_to_sharded_param_map(model_sd, [main_to_model.get(id(p), p) for p in inner])
    position = {id(p): i for i, p in enumerate(inner)}
    # A dict by group index, not a list: megatron-core's common/sharded split drops the position of an
    # empty list inside a list (a group holding only fp32 params), and the load could not merge it back.
    state_dict["fp32_from_fp16_params"] = {
        str(i): [make_sharded_optimizer_tensor(id_map[position[id(main)]], main, prefix="optimizer.state.fp32_param")
                 for main in group]
        for i, group in enumerate(o.fp32_from_float16_groups)}
    step = o._extract_common_per_param_step(state_dict["optimizer"])
    optim_state_to_sharding_state(state_dict["optimizer"], id_map, exclude_keys="step")
    if step:
        state_dict["optimizer"]["state"]["common_step"] = step
    return state_dict
