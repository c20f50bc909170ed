"""Ahead-of-time compilation of every Triton kernel x autotune configuration for Hopper (no GPU needed).

    python -m copsd_kernels.aot            # prints the resource table (a row per kernel variant x config)

For each variant `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` produces PTX and a
cubin; we report shared memory and num_warps from the metadata, whether the PTX uses `wgmma` (Hopper
tensor-core GEMM), and registers / spill bytes from `ptxas -v --gpu-name sm_90a` shipped in the wheel
(triton/backends/nvidia/bin/). Inputs are bf16 (the GPU training dtype), statistics fp32.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import divergence_triton as dt
from . import logprobs_triton as lt
from .triton_common import GRAD_CONFIGS, STATS_CONFIGS

HOPPER = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024
FP32_PTRS = {"STATS_ptr", "SUMS_ptr", "TOK_ptr"}
FLOAT_ARGS = {"inv_tau", "beta", "log_beta", "log_1mbeta"}

# (name, kernel, configs, extra constexprs)
VARIANTS = (
    [(f"div_stats[KIND={k}]", dt._div_stats_kernel, STATS_CONFIGS, {"KIND": k}) for k in (0, 1)]
    + [("jsd_sums", dt._jsd_sums_kernel, STATS_CONFIGS, {})]
    + [(f"div_grad[KIND={k}]", dt._div_grad_kernel, GRAD_CONFIGS, {"KIND": k}) for k in (0, 1, 2)]
    + [("lp_stats", lt._lp_stats_kernel, STATS_CONFIGS, {}), ("lp_grad", lt._lp_grad_kernel, GRAD_CONFIGS, {})]
)


@dataclass
class AotResult:
    kernel: str
    config: str
    shared_bytes: int
    num_warps: int
    num_stages: int
    wgmma: bool
    registers: int | None
    spill_bytes: int | None


def _signature(fn, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in FP32_PTRS else ("*i32" if name == "TGT_ptr" else "*bf16")
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


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


def compile_variant(name, fn, config, extra) -> AotResult:
    constexprs = {k: v for k, v in config.items() if k.startswith("BLOCK")}
    constexprs.update(extra, UPCAST_DOT=False)
    src = ASTSource(fn=fn, signature=_signature(fn, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=HOPPER,
                              options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]})
    ptx = compiled.asm["ptx"]
    regs, spills = ptxas_usage(ptx, compiled.metadata.name)
    cfg = f"T{config['BLOCK_T']}xV{config['BLOCK_V']}xH{config['BLOCK_H']} w{config['num_warps']} s{config['num_stages']}"
    return AotResult(name, cfg, int(compiled.metadata.shared), int(compiled.metadata.num_warps),
                     int(config["num_stages"]), "wgmma" in ptx, regs, spills)


def compile_all() -> list[AotResult]:
    return [compile_variant(name, fn, cfg, extra) for name, fn, cfgs, extra in VARIANTS for cfg in cfgs]


def format_table(rows) -> str:
    head = f"{'kernel':18s} {'config':24s} {'shared KB':>9s} {'warps':>5s} {'wgmma':>5s} {'regs':>4s} {'spill B':>7s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.kernel:18s} {r.config:24s} {r.shared_bytes / 1024:9.1f} {r.num_warps:5d} "
                     f"{str(r.wgmma):>5s} {str(r.registers):>4s} {str(r.spill_bytes):>7s}")
    return "\n".join(lines)


def main(argv=None) -> int:
    rows = []
    for name, fn, cfgs, extra in VARIANTS:
        for cfg in cfgs:
            rows.append(compile_variant(name, fn, cfg, extra))
            print(f"[aot] {name} {rows[-1].config}: ok", file=sys.stderr, flush=True)
    print(format_table(rows))
    bad = [r for r in rows if not r.wgmma or r.shared_bytes > SHARED_LIMIT or (r.spill_bytes or 0) > 0]
    if bad:
        print(f"{len(bad)} variant(s) miss wgmma, exceed {SHARED_LIMIT} B shared memory or spill", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
