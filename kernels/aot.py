"""Ahead-of-time compilation of every Triton kernel x shipped configuration for Hopper (no GPU needed).

    python -m copsd_kernels.aot            # prints the resource table (a row per kernel variant x config)

What is compiled is exactly what a launch would compile: the launch arguments of a real call at the
headline shape (T = 16,384, H = 4,096, V_local = 151,936, bf16; meta tensors stand in for the buffers) go
through triton's own JIT binder (`create_function_from_signature` + `JITFunction._pack_args`) for an sm_90
backend, which yields the same signature, constexprs and specialization `attrs` (tt.divisibility = 16 on
every pointer and every integer divisible by 16) that `kernel[grid](...)` derives at launch. Without those
hints the same source compiles to a different kernel (scalar 2-byte loads, no software pipelining).

Per variant: shared memory and warps from the metadata, the wgmma instruction shapes in the PTX, registers
and spill bytes from `ptxas -v --gpu-name sm_90a` (shipped in the wheel, triton/backends/nvidia/bin/), and
whether row offsets are computed in 64-bit (an i64 `arith.muli` in the TTIR). Shipped-config rules:
0 spills, shared memory <= 227 KB, and for the GEMM-like kernels (tl.dot over H) wgmma with N >= 128 and no
layout conversion of an fp32 logits tile (`cvt`: the epilogue's column blocks, divergence_triton._col_parts,
must stay register renumberings, not round trips through shared memory).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from . import divergence_store as ds
from . import divergence_triton as dt
from . import logprobs_triton as lt
from .triton_common import GRAD_CONFIGS, SHARED_LIMIT, STATS_CONFIGS, pair_configs

HOPPER = GPUTarget("cuda", 90, 32)
MIN_WGMMA_N = 128
HEADLINE = dict(T=16384, H=4096, V=151936)


def _m(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _recompute_args(kernel, T, H, V):
    """Positional launch arguments of the recompute-mode kernels as divergence_triton / logprobs_triton pass
    them (contiguous inputs, so the strides equal H and V)."""
    f32 = torch.float32
    hs, w = _m(T, H), _m(V, H)
    splits = dt.vocab_splits(T, V)
    if kernel is dt._div_stats_kernel:
        return (hs, hs, w, w, _m(splits, T, 2, dtype=f32), T, V, H, H, H, 1.0, splits)
    if kernel is dt._div_sums_kernel:
        return (hs, hs, w, w, _m(T, 2, dtype=f32), _m(splits, T, 5, dtype=f32), T, V, H, H, H, 1.0, 0.05, 0.5, splits)
    if kernel is dt._div_grad_kernel:
        tc = min(T, dt.CHUNK_TOKENS)
        return (hs[:tc], hs[:tc], w, w, _m(tc, 4, dtype=f32), _m(tc, V), tc, V, H, H, H, V, 1.0, 0.5, 0.05)
    if kernel is lt._lp_stats_kernel:
        return (hs, w, _m(T, dtype=torch.int32), _m(T, 3, dtype=f32), T, V, H, H, H, 1.0)
    if kernel is lt._lp_grad_kernel:
        return (hs, w, _m(T, dtype=torch.int32), _m(T, 4, dtype=f32), _m(T, V), T, V, H, H, H, V, 1.0)
    raise ValueError(kernel)


def _store_args(kernel, T, H, V):
    """Positional launch arguments of the store-mode row kernels for one chunk (divergence_store)."""
    f32 = torch.float32
    n = ds.store_chunk_tokens(T, V, torch.bfloat16)
    z = _m(2 * n, V, dtype=f32)
    if kernel is ds._row_lse_kernel:
        return (z, _m(n, dtype=f32), V, V, 1.0)
    if kernel is ds._row_sums_kernel:
        return (z, z, _m(n, 2, dtype=f32), _m(n, 5, dtype=f32), V, V, V, 1.0, 0.05, 0.5)
    if kernel is ds._row_grad_kernel:
        return (z, z, _m(n, 4, dtype=f32), _m(n, V), V, V, V, V, 1.0, 0.05, 0.5)
    raise ValueError(kernel)

# recompute-mode variants whose first config the default test run skips (the JSD ones with the per-entry clip,
# the most live registers, run by default with the teacher sharing the head; every variant runs in the slow tests
# and `python -m copsd_kernels.aot`)
SLOW_VARIANTS = {"div_sums[KIND=0,CLIP=False]", "div_sums[KIND=1,CLIP=False]", "div_sums[KIND=0,CLIP=True]",
                 "div_sums[KIND=1,CLIP=True]", "div_grad[KIND=0,CLIP=True]", "div_grad[KIND=1,CLIP=True]",
                 "div_grad[KIND=1,CLIP=False]", "div_stats[SHARED_W=False]"} | {
    f"div_{p}[KIND={k},CLIP={c},SHARED_W=False]" for p in ("sums", "grad") for k in (0, 1, 2) for c in (False, True)}


def _tile(c):
    return {k: v for k, v in c.items() if k.startswith("BLOCK")}


# (name, kernel, configs, extra constexprs, launch-args builder, GEMM-like)
# the pair kernels with a separate teacher head (SHARED_W=False) launch with pair_configs(..., False) only
VARIANTS = (
    [(f"div_stats[SHARED_W={s}]", dt._div_stats_kernel, pair_configs(STATS_CONFIGS, s),
      {"SHARED_W": s, "GROUP": dt.GROUP_T}, _recompute_args, True) for s in (True, False)]
    + [(f"div_sums[KIND={k},CLIP={c}{'' if s else ',SHARED_W=False'}]", dt._div_sums_kernel,
        pair_configs(STATS_CONFIGS, s), {"KIND": k, "CLIP_ENTRY": c, "SHARED_W": s, "GROUP": dt.GROUP_T},
        _recompute_args, True) for s in (True, False) for k in (0, 1, 2) for c in (False, True)]
    + [(f"div_grad[KIND={k},CLIP={c}{'' if s else ',SHARED_W=False'}]", dt._div_grad_kernel,
        pair_configs(GRAD_CONFIGS, s), {"KIND": k, "CLIP_ENTRY": c, "SHARED_W": s, "GROUP": dt.GROUP_T},
        _recompute_args, True) for s in (True, False) for k in (0, 1, 2) for c in (False, True)]
    + [("lp_stats", lt._lp_stats_kernel, STATS_CONFIGS, {}, _recompute_args, True),
       ("lp_grad", lt._lp_grad_kernel, GRAD_CONFIGS, {}, _recompute_args, True)]
    + [("row_lse", ds._row_lse_kernel, ds.ROW_CONFIGS, {}, _store_args, False)]
    + [(f"row_sums[KIND={k},CLIP={c}]", ds._row_sums_kernel, ds.ROW_CONFIGS, {"KIND": k, "CLIP_ENTRY": c},
        _store_args, False) for k in (0, 1, 2) for c in (False, True)]
    + [(f"row_grad[KIND={k},CLIP={c}]", ds._row_grad_kernel, ds.ROW_CONFIGS, {"KIND": k, "CLIP_ENTRY": c},
        _store_args, False) for k in (0, 1, 2) for c in (False, True)]
)


@dataclass
class AotResult:
    kernel: str
    config: str
    shared_bytes: int
    num_warps: int
    num_stages: int
    wgmma: tuple  # wgmma instruction shapes in the PTX, e.g. ("m64n128k16",)
    registers: int | None
    spill_bytes: int | None
    int64_offsets: bool
    gemm: bool
    divisible_args: int  # arguments the JIT specialization marked tt.divisibility=16
    tile_converts: int  # ttg.convert_layout ops on 2-D fp32 tensors (a logits tile through shared memory)

    @property
    def min_wgmma_n(self) -> int:
        return min((int(re.search(r"n(\d+)", s).group(1)) for s in self.wgmma), default=0)

    def problems(self) -> list[str]:
        out = []
        if self.spill_bytes is None or self.registers is None:
            out.append("ptxas -v output not parsed")
        elif self.spill_bytes:
            out.append(f"{self.spill_bytes} B register spills")
        if self.shared_bytes > SHARED_LIMIT:
            out.append(f"{self.shared_bytes} B shared memory > {SHARED_LIMIT}")
        if self.gemm and self.min_wgmma_n < MIN_WGMMA_N:
            out.append(f"wgmma {self.wgmma or 'absent'} (need N >= {MIN_WGMMA_N})")
        if self.gemm and self.tile_converts:
            out.append(f"{self.tile_converts} layout conversions of fp32 logits tiles")
        return out


def jit_source(fn, args, constexprs, target=HOPPER) -> ASTSource:
    """The ASTSource `fn[grid](*args, **constexprs)` would compile on `target`: triton's own binder computes
    the signature, the constexprs and the divisibility-16 specialization from the actual arguments."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **constexprs)
    _, signature, cex, attrs = JITFunction._pack_args(fn, backend, {}, bound, spec, opts)
    return ASTSource(fn=fn, signature=signature, constexprs=cex, attrs=attrs)


def ptxas_path() -> str | None:
    """The wheel's ptxas that triton itself uses: `ptxas-blackwell` (CUDA 13, despite the name it targets
    sm_90a too) -- the legacy `ptxas` (12.8) rejects the PTX 9.x that triton 3.9 emits."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(bin_dir, name)
        if os.access(path, os.X_OK):
            return path
    return None


def ptxas_usage(ptx: str, kernel_name: str) -> tuple[int | None, int | None]:
    """(registers, spill store + load bytes) of `kernel_name` from `ptxas -v --gpu-name sm_90a`."""
    exe = ptxas_path()
    if exe is None:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        out = subprocess.run([exe, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    part = text[text.find(kernel_name):] if kernel_name in text else text
    regs = re.search(r"Used (\d+) registers", part)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", part)
    return (int(regs.group(1)) if regs else None,
            int(spills.group(1)) + int(spills.group(2)) if spills else None)


def tile_converts(ttgir: str) -> int:
    """ttg.convert_layout ops whose source is a 2-D fp32 tensor (a logits tile moved between layouts, i.e.
    through shared memory); row vectors and the bf16 dZ tiles converted for coalesced stores do not count."""
    return len(re.findall(r"ttg\.convert_layout [^\n]*: tensor<\d+x\d+xf32", ttgir))


def compile_variant(name, fn, config, extra, make_args, gemm, shape=None) -> AotResult:
    shape = shape or HEADLINE
    constexprs = dict(_tile(config), **extra)
    if "UPCAST_DOT" in fn.arg_names:
        constexprs["UPCAST_DOT"] = False
    src = jit_source(fn, make_args(fn, **shape), constexprs)
    compiled = triton.compile(src, target=HOPPER,
                              options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]})
    ptx, ttir = compiled.asm["ptx"], compiled.asm["ttir"]
    regs, spills = ptxas_usage(ptx, compiled.metadata.name)
    shapes = tuple(sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))))
    cfg = "x".join(f"{k[6:]}{v}" for k, v in _tile(config).items()) + f" w{config['num_warps']} s{config['num_stages']}"
    return AotResult(name, cfg, int(compiled.metadata.shared), int(compiled.metadata.num_warps),
                     int(config["num_stages"]), shapes, regs, spills,
                     bool(re.search(r"arith\.muli [^\n]*(: i64|xi64>)", ttir)), gemm,
                     sum(1 for v in src.attrs.values() if ["tt.divisibility", 16] in v),
                     tile_converts(compiled.asm["ttgir"]))


def compile_all() -> list[AotResult]:
    return [compile_variant(name, fn, cfg, extra, mk, gemm)
            for name, fn, cfgs, extra, mk, gemm in VARIANTS for cfg in cfgs]


def format_table(rows) -> str:
    head = (f"{'kernel':26s} {'config':22s} {'shared KB':>9s} {'warps':>5s} {'regs':>4s} {'spill B':>7s} "
            f"{'wgmma':12s} {'i64':>4s} {'div16':>5s} {'cvt':>3s} ok")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.kernel:26s} {r.config:22s} {r.shared_bytes / 1024:9.1f} {r.num_warps:5d} "
                     f"{str(r.registers):>4s} {str(r.spill_bytes):>7s} {','.join(r.wgmma) or '-':12s} "
                     f"{'yes' if r.int64_offsets else 'no':>4s} {r.divisible_args:5d} {r.tile_converts:3d} "
                     f"{'yes' if not r.problems() else '; '.join(r.problems())}")
    return "\n".join(lines)


def main(argv=None) -> int:
    rows = []
    for name, fn, cfgs, extra, mk, gemm in VARIANTS:
        for cfg in cfgs:
            rows.append(compile_variant(name, fn, cfg, extra, mk, gemm))
            print(f"[aot] {name} {rows[-1].config}: ok", file=sys.stderr, flush=True)
    print(f"launch shape {HEADLINE}, bf16, sm_90a")
    print(format_table(rows))
    bad = [r for r in rows if r.problems()]
    if bad:
        print(f"{len(bad)} variant(s) fail the shipped-config rules", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
