"""What `copsd dry-run` patches so the trainer's GPU path runs on the meta device over a fake process group.

    with DryRunEnvironment(rank=3, world_size=8) as env:   # fake-backend default group, "CUDA" = meta
        ... build the policy / teacher and run the trainer's step functions unchanged ...
    env.memory.report()                                     # peak bytes by category

Why meta and not `FakeTensorMode(device="cuda")` (which the issue asked for): on a CPU build of torch the
autograd engine aborts the whole process in backward for fake CUDA tensors ("not linked with support for
cuda devices"; docs/platform.md), so a training step cannot run that way. Meta tensors carry shapes,
dtypes and storages but no data, and backward works. The price: meta silently accepts host tensors
(`meta @ cpu` returns meta), so this module adds the two checks NCCL and the CUDA kernels would do:

- `HostDeviceMixError`: any aten op that receives a meta ("device") tensor together with a non-scalar CPU
  tensor (0-dim CPU tensors are legal on CUDA too: they are scalars);
- `HostCollectiveError`: any c10d collective / p2p op that receives a CPU tensor (NCCL refuses them).

Both messages name the op and the innermost frames of the project code (and megatron-core) that issued
it. What this cannot prove: anything about values (meta has none: `.item()` / `.tolist()` answer 1 / True, which is
the "all finite, go ahead" side of the trainer's and megatron's checks -- flags such as `isfinite(...).all()`
and a grad norm of 1 -- so the optimizer step runs), CUDA streams/events, kernels' own device handling (the fused
kernels run their fake implementation), NCCL's actual buffer sizes, allocator fragmentation.

Patched while active (restored on exit), each because the GPU path calls it:
`torch.cuda.is_available` -> True (the trainer must take its GPU branch), `current_device` -> 0,
`device_count`, `set_device`, `synchronize`, the CUDA RNG get/set/seed (megatron's RNG tracker),
`Tensor.cuda` / `Tensor.pin_memory` / `Tensor.is_cuda` / `Tensor.type()` (Megatron's optimizer checks
type names), and a `TorchFunctionMode` that rewrites any CUDA device argument (`"cuda"`, `"cuda:0"`, an
int ordinal, `torch.device("cuda")`) to meta. Object collectives (`all_gather_object`,
`broadcast_object_list`) answer with this rank's own object (the fake backend returns garbage bytes),
the HF-state completeness check of the weight gather is skipped (the other stages' names never
arrive), and megatron's p2p shape exchange answers with the shape the schedule passes (dry-run micro-batches
all have one shape).
"""
from __future__ import annotations

import contextlib
import traceback
import weakref
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megatron_copsd.megatron.cpu_compat import _is_cuda_device

META = torch.device("meta")
_PROJECT_MARKERS = ("megatron_copsd", "copsd_kernels", "/kernels/", "megatron/core")
_SKIP_MARKERS = ("dry_run_compat.py", "torch/utils/_python_dispatch", "torch/overrides.py")


class HostDeviceMixError(RuntimeError):
    """An op mixed a device tensor with a host tensor (CUDA would raise a device mismatch)."""


class HostCollectiveError(RuntimeError):
    """A collective received a host tensor (NCCL refuses CPU tensors)."""


def _where(limit: int = 3) -> str:
    """The innermost frames of project / megatron-core code on the current stack, plus the innermost frame
    of this project's own code (the caller that handed megatron-core the wrong tensor)."""
    frames = [f for f in traceback.extract_stack()
              if any(m in f.filename for m in _PROJECT_MARKERS) and not any(m in f.filename for m in _SKIP_MARKERS)]
    shown = frames[-limit:]
    own = [f for f in frames if "megatron_copsd" in f.filename and "dry_run" not in f.filename]
    if own and own[-1] not in shown:
        shown = [own[-1]] + shown
    def short(name: str) -> str:
        for marker in ("megatron_copsd/", "megatron/core/", "kernels/"):
            if marker in name:
                return marker + name.rsplit(marker, 1)[1]
        return name

    return " <- ".join(f"{short(f.filename)}:{f.lineno} in {f.name}" for f in reversed(shown)) or "(outside project code)"


class _CudaToMetaMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to meta (factory `device=`, `.to(dev)`, `.cuda()`); a copy of a
    "host" tensor (a meta stand-in for host memory) to the device is a real new allocation."""

    def __init__(self, memory: "MemoryTracker") -> None:
        super().__init__()
        self.memory = memory

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            func, args, kwargs = torch.Tensor.to, (args[0], META), {"non_blocking": kwargs.get("non_blocking", False)}
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.tensor and isinstance(args[0], (list, tuple)) and any(
                isinstance(x, torch.Tensor) and x.is_meta for x in tree_leaves(args[0])):
            # torch.tensor([device scalars]) copies their values to a new (host unless told) tensor
            flat = tree_leaves(args[0])
            return torch.zeros(len(flat), dtype=kwargs.get("dtype") or flat[0].dtype, device=kwargs.get("device"))
        if func is torch.Tensor.tolist and args[0].device.type == "meta":  # no values: ones, like .item()
            return torch.ones(args[0].shape, dtype=args[0].dtype, device="cpu").tolist()
        kwargs.pop("pin_memory", None)
        dev = kwargs.get("device")
        to_device = False
        if dev is not None and _is_cuda_device(dev):
            kwargs["device"], to_device = META, True
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args, to_device = (args[0], META) + tuple(args[2:]), True
        if func is torch.Tensor.to and to_device and self.memory.is_host(args[0]):
            kwargs["copy"] = True
        return func(*args, **kwargs)


class MemoryTracker:
    """Live device (meta) storage bytes by category, and the breakdown at the peak.

    Every storage is counted once, under the category current when it was allocated (`phase(...)`);
    `retag` moves storages that a later phase re-purposes (e.g. DDP's contiguous parameter buffer)."""

    def __init__(self) -> None:
        self.live: dict[str, int] = defaultdict(int)
        self.tag_of: dict[int, tuple[str, int]] = {}
        self.current = "other"
        self.peak = 0
        self.peak_breakdown: dict[str, int] = {}
        self.peak_where = ""
        self.phase_peaks: dict[str, int] = defaultdict(int)  # phase -> highest total while it was current
        self.phase_breakdown: dict[str, dict] = {}  # phase -> live bytes by category at that moment
        self.host: dict[int, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        prev, self.current = self.current, name
        try:
            yield
        finally:
            self.current = prev

    def total(self) -> int:
        return sum(self.live.values())

    def is_host(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type == "meta" and t.untyped_storage()._cdata in self.host

    def track(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != "meta":
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self.tag_of or key in self.host:
            return
        if self.current == "host":  # a meta stand-in for host memory: not device bytes
            self.host[key] = st.nbytes()
            weakref.finalize(st, self.host.pop, key, None)
            return
        nbytes = st.nbytes()
        self.tag_of[key] = (self.current, nbytes)
        self.live[self.current] += nbytes
        weakref.finalize(st, self._free, key)
        total = self.total()
        if total > self.phase_peaks[self.current]:
            self.phase_peaks[self.current] = total
            self.phase_breakdown[self.current] = dict(self.live)
        if total > self.peak:
            self.peak, self.peak_breakdown, self.peak_where = total, dict(self.live), self.current

    def _free(self, key: int) -> None:
        tag, nbytes = self.tag_of.pop(key, (None, 0))
        if tag is not None:
            self.live[tag] -= nbytes

    def retag(self, tensors, tag: str) -> None:
        for t in tensors:
            if t is None or t.device.type != "meta":
                continue
            key = t.untyped_storage()._cdata
            if key in self.tag_of:
                old, nbytes = self.tag_of[key]
                if old != tag:
                    self.live[old] -= nbytes
                    self.live[tag] += nbytes
                    self.tag_of[key] = (tag, nbytes)
            else:
                with self.phase(tag):
                    self.track(t)

    def rename(self, old: str, new: str) -> None:
        """Every live storage still tagged `old` is re-tagged `new`."""
        for key, (tag, nbytes) in list(self.tag_of.items()):
            if tag == old:
                self.tag_of[key] = (new, nbytes)
                self.live[old] -= nbytes
                self.live[new] += nbytes

    def reset_peak(self) -> None:
        self.peak, self.peak_breakdown, self.peak_where = self.total(), dict(self.live), self.current
        self.phase_peaks = defaultdict(int)
        self.phase_breakdown = {}


class DeviceCheckMode(TorchDispatchMode):
    """Raises on host/device mixes and host tensors in collectives; answers `.item()` on meta with 0;
    feeds every produced tensor to the memory tracker."""

    def __init__(self, memory: MemoryTracker) -> None:
        super().__init__()
        self.memory = memory

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func.namespace == "c10d":
            host = [t for t in tensors if t.device.type == "cpu"]
            if host:
                raise HostCollectiveError(
                    f"dry run: collective {func} got a host (CPU) tensor of shape {tuple(host[0].shape)} "
                    f"dtype {host[0].dtype}; NCCL needs device tensors. At: {_where()}")
            try:
                return func(*args, **kwargs)
            except NotImplementedError:
                # The coalesced collectives (DDP's grad reduce, the distributed optimizer's reduce-scatter /
                # all-gather) have no meta kernel. They work in place on their outputs and return a Work, so
                # a finished Work from a barrier on the same group stands in (outputs stay without data).
                returns = func._schema.returns
                if len(returns) != 1 or not str(returns[0].type).endswith("Work"):
                    raise
                group = next(a for a in args if "ProcessGroup" in type(a).__name__ or "ScriptObject" in type(a).__name__)
                probe = next(t for t in tensors if t.device.type == "meta")
                return torch.ops.c10d.barrier.default(probe, group, [], True, -1)
        elif any(t.device.type == "meta" for t in tensors):
            if func.namespace == "copsd":
                return self._custom_op(func, args, kwargs)
            if func in _COPIES:
                return self._copy(func, args, kwargs)
            host = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
            if host:
                raise HostDeviceMixError(
                    f"dry run: {func} mixes device tensors with a host (CPU) tensor of shape "
                    f"{tuple(host[0].shape)} dtype {host[0].dtype}. At: {_where()}")
            if func is torch.ops.aten._local_scalar_dense.default:
                t = tensors[0]
                return True if t.dtype == torch.bool else (1.0 if t.dtype.is_floating_point else 1)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.memory.track(t)
        return out


    def _custom_op(self, func, args, kwargs):
        """The kernels' fake implementation, run with this mode active so its transient workspace counts."""
        from torch._library import simple_registry

        kernel = simple_registry.singleton.find(func._schema.name).fake_impl.kernel
        with self.memory.phase("divergence workspace"), self:
            return kernel(*args, **kwargs)

    def _copy(self, func, args, kwargs):
        """Host <-> device copies are legal (they are how data moves); meta has no data to copy to the host,
        so a device -> host copy yields a meta tensor counted as host memory."""
        if func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            return dst if dst.device.type == "cpu" else func(*args, **kwargs)
        src, dev = args[0], kwargs.get("device")
        if src.device.type == "meta" and dev is not None and torch.device(dev).type == "cpu":
            kwargs = dict(kwargs, device=META)
            with self.memory.phase("host"):
                out = func(*args, **kwargs)
                self.memory.track(out)
            return out
        out = func(*args, **kwargs)
        self.memory.track(out)
        return out


_COPIES = (torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default)


def _tensor_type(original):
    names = {torch.float32: "FloatTensor", torch.float16: "HalfTensor", torch.bfloat16: "BFloat16Tensor",
             torch.float64: "DoubleTensor", torch.int64: "LongTensor", torch.int32: "IntTensor",
             torch.uint8: "ByteTensor", torch.bool: "BoolTensor", torch.int8: "CharTensor"}

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "meta" and self.dtype in names:
            return "torch.cuda." + names[self.dtype]
        if dtype is None:
            return original(self, **kwargs) if kwargs else original(self)
        if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
            dtype = "torch." + dtype[len("torch.cuda."):]
        return original(self, dtype, non_blocking, **kwargs)

    return type_


def _local_all_gather_object(object_list, obj, group=None):
    for i in range(len(object_list)):
        object_list[i] = obj


def _local_broadcast_object_list(object_list, src=None, group=None, device=None, group_src=None):
    return None


class DryRunEnvironment:
    """Fake-backend default process group for one simulated rank, CUDA mapped to meta, the checks on."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.memory = MemoryTracker()
        self._saved: list[tuple[object, str, object]] = []
        self._modes: list = []

    def _patch(self, owner, name: str, value) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def __enter__(self) -> "DryRunEnvironment":
        from megatron.core.pipeline_parallel import p2p_communication as p2p
        from megatron.core.tensor_parallel import random as mp_random
        from torch.testing._internal.distributed.fake_pg import FakeStore

        from megatron_copsd.megatron import cpu_compat

        if dist.is_initialized():
            raise RuntimeError("dry run: a process group is already initialized in this process")
        self._cpu_compat_was_active = cpu_compat.is_active()
        if self._cpu_compat_was_active:
            cpu_compat.disable_cpu_compat()  # its CUDA -> CPU rewrite would undo ours
        cuda = torch.cuda
        self._patch(cuda, "is_available", lambda: True)
        self._patch(cuda, "current_device", lambda: 0)
        self._patch(cuda, "device_count", lambda: max(1, self.world_size))
        self._patch(cuda, "set_device", lambda device: None)
        self._patch(cuda, "synchronize", lambda device=None: None)
        self._patch(cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
        self._patch(cuda, "get_device_name", lambda device=None: "dry-run (meta) H100")
        self._patch(cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
        self._patch(cuda, "set_rng_state", lambda new_state, device="cuda": None)
        self._patch(cuda, "manual_seed", lambda seed: None)
        self._patch(cuda, "manual_seed_all", lambda seed: None)
        self._patch(mp_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
        self._patch(mp_random, "_set_cuda_rng_state", lambda *a, **k: None)
        self._patch(torch.Tensor, "type", _tensor_type(torch.Tensor.type))
        self._patch(torch.Tensor, "is_cuda", property(lambda t: t.device.type in ("cuda", "meta")))
        from megatron.core import parallel_state

        # The optimizer asks for the gloo DP group (used for checkpoint gathers); gloo cannot rendezvous on
        # a fake store, so it gets the (fake) DP group itself.
        self._patch(parallel_state, "get_data_parallel_group_gloo",
                    lambda *a, **k: parallel_state.get_data_parallel_group(*a, **k))
        self._patch(parallel_state, "get_expert_data_parallel_group_gloo",
                    lambda *a, **k: parallel_state.get_expert_data_parallel_group(*a, **k))
        from megatron_copsd.checkpoint import convert

        # Object collectives answer with this rank's own object, so a state merged from several pipeline
        # stages lacks the other stages' names: the completeness check cannot hold and is skipped.
        self._patch(convert, "validate_hf_state", lambda *a, **k: None)
        self._patch(dist, "all_gather_object", _local_all_gather_object)
        self._patch(dist, "broadcast_object_list", _local_broadcast_object_list)

        shape_of_call: dict = {}
        original_communicate = p2p.P2PCommunicator._communicate

        def communicate(comm, *args, **kwargs):
            shape_of_call["shape"] = kwargs.get("tensor_shape")
            return original_communicate(comm, *args, **kwargs)

        self._patch(p2p.P2PCommunicator, "_communicate", communicate)
        self._patch(p2p.P2PCommunicator, "_communicate_shapes",
                    lambda comm, *a, **k: (shape_of_call["shape"], shape_of_call["shape"]))
        # meta tensors need a backend too (batch_isend_irecv looks one up per device type)
        dist.init_process_group("cpu:fake,cuda:fake,meta:fake", store=FakeStore(), rank=self.rank,
                                world_size=self.world_size)
        for mode in (_CudaToMetaMode(self.memory), DeviceCheckMode(self.memory)):
            mode.__enter__()
            self._modes.append(mode)
        # The autograd engine runs custom Functions' backward (megatron's activation recompute re-runs the
        # forward there) without the torch-function mode stack: re-enter the CUDA -> meta rewrite there.
        cuda_mode, original_apply = self._modes[0], torch.autograd.function.BackwardCFunction.apply

        def backward_apply(ctx, *args):
            if cuda_mode in torch.overrides._get_current_function_mode_stack():
                return original_apply(ctx, *args)
            with cuda_mode:
                return original_apply(ctx, *args)

        self._patch(torch.autograd.function.BackwardCFunction, "apply", backward_apply)
        return self

    def __exit__(self, *exc) -> None:
        from megatron.core import parallel_state

        for mode in reversed(self._modes):
            mode.__exit__(None, None, None)
        self._modes.clear()
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        self._saved.clear()
        if self._cpu_compat_was_active:
            from megatron_copsd.megatron import cpu_compat

            cpu_compat.enable_cpu_compat()

    def init_model_parallel(self, tp: int, pp: int) -> None:
        """Megatron's groups without the gloo side groups (gloo cannot rendezvous on a fake store)."""
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 create_gloo_process_groups=False)


@contextlib.contextmanager
def no_weight_loading():
    """Models are built from config.json alone: the HF checkpoint loader is a no-op (meta holds no data)."""
    from megatron_copsd.checkpoint import convert

    saved = convert.load_hf_into_model
    convert.load_hf_into_model = lambda *args, **kwargs: None
    try:
        yield
    finally:
        convert.load_hf_into_model = saved


def rank_layout(world_size: int, tp: int, pp: int) -> dict[str, int]:
    """Global ranks of interest under megatron's default order (tp fastest, then dp, then pp)."""
    dp = world_size // (tp * pp)
    return {"first": 0, "last": (pp - 1) * tp * dp}

