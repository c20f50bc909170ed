"""Run real megatron-core on machines without CUDA (CI, laptops, the one-CPU benchmark).

    from megatron_copsd.megatron.cpu_compat import enable_cpu_compat
    enable_cpu_compat()          # idempotent; does nothing when CUDA is available

megatron-core assumes CUDA in a handful of places that matter for a CPU/gloo run. This module covers
exactly those and nothing else (see docs/platform.md):

1. `torch.cuda.current_device()` -> `torch.device("cpu")` (RoPE moves `inv_freq` there; the sequence-
   parallel all-gather allocates on it inside autograd backward, where the mode of item 3 is not active).
2. The CUDA RNG used by `tensor_parallel.random` (the model-parallel RNG tracker and its fork, used by
   attention dropout and weight init) -> the CPU default generator.
3. Tensors created with `device="cuda"` (e.g. `total_num_tokens` in the pipeline schedules) and
   `.cuda()` calls -> CPU, through a `TorchFunctionMode` pushed once, so megatron-core stays untouched.
4. `torch.cuda.synchronize()` -> no-op.
5. megatron's causal-mask builders (hard-coded `device="cuda"`, also called inside recomputation) -> CPU.
6. `Tensor.type()` without arguments answers the CUDA type name for CPU tensors, because Megatron's
   optimizer wrappers and `clip_grad_by_total_norm_fp32` check parameter/gradient types by string.

On a machine with CUDA none of this is installed, so GPU behaviour is unchanged.
"""
from __future__ import annotations

import functools
import threading

import torch
from torch.overrides import TorchFunctionMode

_LOCK = threading.Lock()
_STATE: dict = {"active": False, "mode": None, "saved": {}}

# Only the methods that take a device positionally; factory functions pass `device=` by keyword.
_TO_LIKE = {torch.Tensor.to}
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.int16: "torch.cuda.ShortTensor",
    torch.int8: "torch.cuda.CharTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # A bare index means a CUDA ordinal in torch's API (`torch.cuda.current_device()` returns one).
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU; everything else passes through untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs = dict(kwargs, device="cpu")
        if func in _TO_LIKE and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    original = _STATE["saved"]["Tensor.type"]
    if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
        return _CUDA_TYPE_NAMES[self.dtype]
    if dtype is None:
        return original(self, **kwargs) if kwargs else original(self)
    if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
        # Casting "to a CUDA type" on CPU: keep the device, change the dtype.
        dtype = "torch." + dtype[len("torch.cuda."):]
    return original(self, dtype, non_blocking, **kwargs)


@functools.lru_cache(maxsize=32)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()


@functools.lru_cache(maxsize=32)
def _cpu_sliding_window_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    m = torch.ones(sq, skv, dtype=torch.bool)
    m = torch.tril(m, diagonal=skv - sq + window_size[1]) if window_size[1] >= 0 else m
    m = torch.triu(m, diagonal=skv - sq - window_size[0]) if window_size[0] >= 0 else m
    return ~m


# megatron builds its causal masks with a hard-coded device="cuda". The mode below rewrites that, but
# a mode is not active inside custom autograd Functions (activation recomputation re-runs attention in
# one), so the two mask builders are replaced outright.
_CPU_MASKS = {"get_default_causal_mask": _cpu_causal_mask,
              "get_sliding_window_causal_mask": _cpu_sliding_window_mask}


def is_active() -> bool:
    """True once `enable_cpu_compat()` installed the layer (never on a CUDA machine)."""
    return _STATE["active"]


def enable_cpu_compat(force: bool = False) -> bool:
    """Installs the CPU layer when CUDA is absent (or `force`); idempotent. Returns whether it is active."""
    with _LOCK:
        if _STATE["active"]:
            return True
        if torch.cuda.is_available() and not force:
            return False
        from megatron.core.tensor_parallel import random as mp_random

        saved = _STATE["saved"]
        saved["cuda.current_device"] = torch.cuda.current_device
        saved["cuda.synchronize"] = torch.cuda.synchronize
        saved["cuda.get_rng_state"] = torch.cuda.get_rng_state
        saved["cuda.set_rng_state"] = torch.cuda.set_rng_state
        saved["cuda.manual_seed"] = torch.cuda.manual_seed
        saved["random._get_cuda_rng_state"] = mp_random._get_cuda_rng_state
        saved["random._set_cuda_rng_state"] = mp_random._set_cuda_rng_state
        saved["Tensor.type"] = torch.Tensor.type
        from megatron.core.fusions import fused_softmax
        from megatron.core.transformer import utils as mt_utils

        for mod in (mt_utils, fused_softmax):
            for fn in ("get_default_causal_mask", "get_sliding_window_causal_mask"):
                saved[(mod, fn)] = getattr(mod, fn)
                setattr(mod, fn, _CPU_MASKS[fn])

        # A CPU device rather than index 0: megatron allocates with `device=torch.cuda.current_device()`
        # inside autograd backward (sequence-parallel all-gather), where the mode below is not active.
        torch.cuda.current_device = lambda: torch.device("cpu")
        torch.cuda.synchronize = lambda device=None: None
        torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
        torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
        torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
        mp_random._get_cuda_rng_state = _cpu_get_rng_state
        mp_random._set_cuda_rng_state = _cpu_set_rng_state
        torch.Tensor.type = _tensor_type

        mode = _CudaToCpuMode()
        mode.__enter__()  # stays on the mode stack for the life of the process
        _STATE["mode"] = mode
        _STATE["active"] = True
        return True


def disable_cpu_compat() -> None:
    """Removes the layer again (tests only; megatron objects built meanwhile keep their CPU tensors)."""
    with _LOCK:
        if not _STATE["active"]:
            return
        from megatron.core.tensor_parallel import random as mp_random

        saved = _STATE["saved"]
        _STATE["mode"].__exit__(None, None, None)
        torch.cuda.current_device = saved["cuda.current_device"]
        torch.cuda.synchronize = saved["cuda.synchronize"]
        torch.cuda.get_rng_state = saved["cuda.get_rng_state"]
        torch.cuda.set_rng_state = saved["cuda.set_rng_state"]
        torch.cuda.manual_seed = saved["cuda.manual_seed"]
        mp_random._get_cuda_rng_state = saved["random._get_cuda_rng_state"]
        mp_random._set_cuda_rng_state = saved["random._set_cuda_rng_state"]
        torch.Tensor.type = saved["Tensor.type"]
        for key, fn in saved.items():
            if isinstance(key, tuple):
                setattr(key[0], key[1], fn)
        _STATE.update(active=False, mode=None, saved={})


def ensure_model_parallel_rng(seed: int = 1234) -> None:
    """Registers the 'model-parallel-rng' tracker state megatron forks for dropout (idempotent)."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    if "model-parallel-rng" not in tracker.get_states():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
