"""Roofline model of the fused linear divergence: FLOPs and HBM bytes per pass, predicted time per device.

    copsd bench-kernels --model --T 16384 --H 4096 --V 151936 --divergence forward_kl

Every implementation is a list of passes (kernels or GEMMs that run back to back); a pass takes
max(FLOP / (peak x compute efficiency), bytes / (HBM bandwidth x HBM efficiency)). The pass lists follow
the code: divergence_store.py (store), divergence_triton.py (recompute), reference.py in fp32 (naive, as
`copsd bench-kernels` runs it), and Liger's fused linear JSD (liger_kernel/ops/fused_linear_jsd.py: 512-
token chunks at this shape, bf16 logits upcast to fp32, torch log_softmax / softmax passes and a Triton JSD
kernel per chunk, bf16 dW accumulated per chunk).

Stated assumptions (class Efficiency; change them on the command line with --gemm-eff / --hbm-eff):
  - cuBLAS bf16 GEMMs with fp32 accumulate sustain `gemm` = 0.80 of the dense tensor peak (the 790 TF/s of
    docs/kernels.md on H100); fp32 GEMMs (the naive baseline) run on the SIMT fp32 peak at the same 0.80;
  - streaming kernels (row kernels, torch elementwise ops) sustain `hbm` = 0.85 of the peak bandwidth;
  - Triton GEMM-like kernels (tl.dot over H) get their compute efficiency from the AOT tile config
    (kernels/aot.py numbers for the shipped config): `gemm` x wave utilisation (programs over SMs x CTAs
    per SM, CTAs per SM from registers and shared memory) x the mainloop's share of the tile time (wgmma
    clocks vs. the per-logit exp/log work on the MUFU and FP32 pipes, which runs between mainloops in
    these non-persistent kernels) x a shared-memory factor (operand bytes per wgmma vs 128 B/clk/SM).
  - passes do not overlap each other; launch overheads and collectives are ignored (TP=1 by default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .divergence_store import DEFAULT_MEMORY_BUDGET, store_chunk_tokens


@dataclass(frozen=True)
class Device:
    name: str
    bf16_tflops: float  # dense tensor-core peak (no sparsity)
    fp32_tflops: float  # SIMT fp32 peak (what an fp32 torch.mm without TF32 uses)
    hbm_tbs: float  # peak HBM bandwidth
    sms: int = 132
    clock_ghz: float = 1.83  # the clock the tensor peak is quoted at
    l2_mb: float = 50.0


H100 = Device("H100 SXM5 80GB", 989.4, 66.9, 3.35)
H200 = Device("H200 SXM 141GB", 989.4, 66.9, 4.8)
DEVICES = (H100, H200)
TENSOR_FLOP_PER_CLK_SM = 4096  # dense bf16: 4 tensor cores x 1024 FLOP/clk
SMEM_BYTES_PER_CLK_SM = 128
MUFU_PER_CLK_SM = 16  # exp2 / log2 / rcp throughput
FP32_PER_CLK_SM = 128
SHFL_PER_CLK_SM = 1  # warp shuffle instructions (32 lanes each)
REGS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024


@dataclass(frozen=True)
class Efficiency:
    gemm: float = 0.80
    hbm: float = 0.85


@dataclass
class Pass:
    name: str
    flop: float
    bytes: float
    compute_eff: float  # fraction of the device peak this pass's FLOPs run at
    fp32_simt: bool = False

    def time(self, dev: Device, eff: Efficiency) -> float:
        peak = (dev.fp32_tflops if self.fp32_simt else dev.bf16_tflops) * 1e12
        t_c = self.flop / (peak * self.compute_eff) if self.flop else 0.0
        return max(t_c, self.bytes / (dev.hbm_tbs * 1e12 * eff.hbm))


@dataclass
class Model:
    impl: str
    passes: list = field(default_factory=list)
    extra_memory_bytes: float = 0.0
    note: str = ""

    def time(self, dev, eff):
        return sum(p.time(dev, eff) for p in self.passes)

    def flop(self):
        return sum(p.flop for p in self.passes)

    def bytes(self):
        return sum(p.bytes for p in self.passes)


@dataclass(frozen=True)
class TileConfig:
    """A Triton GEMM-like kernel's compiled config (from kernels/aot.py)."""
    block_t: int = 128
    block_v: int = 128
    block_h: int = 64
    num_warps: int = 8
    registers: int = 234
    shared_bytes: int = 147456
    wgmma_n: int = 128


def tile_efficiency(cfg: TileConfig, programs: int, dev: Device, eff: Efficiency, *, mufu_per_logit: float,
                    fp32_per_logit: float, hdim: int, logits_per_tile: int = 1,
                    row_reductions: int = 0) -> tuple[float, dict]:
    """Compute efficiency of a Triton kernel whose programs each run `logits_per_tile` [BT, BV] x H wgmma
    mainloops per vocab tile followed by the per-logit elementwise work and `row_reductions` tl.sum / tl.max
    over columns (per column block: divergence_triton's SUMS_PARTS blocks x row sums); see the module
    docstring."""
    threads = 32 * cfg.num_warps
    ctas = max(1, min(REGS_PER_SM // (cfg.registers * threads), SHARED_PER_SM // max(1, cfg.shared_bytes)))
    slots = dev.sms * ctas
    wave = programs / (math.ceil(programs / slots) * slots)
    elems = cfg.block_t * cfg.block_v
    main_clk = logits_per_tile * 2 * elems * hdim / TENSOR_FLOP_PER_CLK_SM * ctas  # ctas share the SM's cores
    epi_clk = elems * (mufu_per_logit / MUFU_PER_CLK_SM + fp32_per_logit / FP32_PER_CLK_SM)
    # a row reduction over the wgmma layout: each thread holds 2 rows, each reduced over the 4 lanes of its
    # quad in 2 butterfly shuffles -> 4 shuffle instructions per warp, at SHFL_PER_CLK_SM warp instructions
    epi_clk += row_reductions * cfg.num_warps * 4 / SHFL_PER_CLK_SM
    main_share = main_clk / (main_clk + epi_clk)
    # per k16 step: each m64nN wgmma instruction reads its A rows (64 x 16) and B columns (N x 16) from shared
    # memory; (BT / 64) x (BV / N) instructions cover the tile
    per_step_flop = 2 * cfg.block_t * cfg.block_v * 16
    per_step_smem = (cfg.block_t // 64) * (cfg.block_v // cfg.wgmma_n) * (64 * 16 * 2 + cfg.wgmma_n * 16 * 2)
    smem = min(1.0, (per_step_flop / TENSOR_FLOP_PER_CLK_SM) / (per_step_smem / SMEM_BYTES_PER_CLK_SM))
    total = eff.gemm * wave * main_share * smem
    return total, dict(ctas_per_sm=ctas, wave=wave, mainloop_share=main_share, smem_factor=smem)


def _kind_work(kind):
    """(MUFU ops, other FP32 ops) per logit in each pass, counted from the kernels' source."""
    if kind == "jsd":
        return dict(stats=(4, 12), sums=(4, 60), grad=(4, 55), row_lse=(2, 6), row_sums=(9, 45), row_grad=(8, 35))
    return dict(stats=(4, 12), sums=(2, 30), grad=(2, 25), row_lse=(2, 6), row_sums=(3, 25), row_grad=(3, 18))


def store_model(T, H, V, kind, *, dtype_bytes=2, memory_budget=None, shared_head=True) -> Model:
    """kernels/divergence_store.py, per token chunk: stacked logits GEMM (fp32 out), 2 row-lse launches,
    the sums kernel, the grad kernel (dZ in bf16), the dH GEMM (fp32 out) and the dW GEMM (fp32 C read and
    written per chunk)."""
    import torch
    tc = store_chunk_tokens(T, V, torch.bfloat16 if dtype_bytes == 2 else torch.float32, memory_budget)
    if tc == 0:
        raise ValueError("memory_budget too small for store mode")
    chunks = math.ceil(T / tc)
    g = Efficiency().gemm
    tv = T * V
    w_bytes = V * H * dtype_bytes
    m = Model("store", note=f"T_c={tc} ({chunks} chunks), budget {(memory_budget or DEFAULT_MEMORY_BUDGET) / 2**30:.1f} GiB")
    m.passes.append(Pass("logits GEMM [h_s;h_t] W^T", 2 * 2 * T * H * V,
                         chunks * w_bytes * (1 if shared_head else 2) + 2 * T * H * dtype_bytes + 2 * tv * 4, g))
    m.passes.append(Pass("row_lse (student + teacher)", 0, 2 * tv * 4, 1.0))
    m.passes.append(Pass("row_sums (div, clipped loss, S)", 0, 2 * tv * 4, 1.0))
    m.passes.append(Pass("row_grad (dZ, bf16)", 0, 2 * tv * 4 + tv * dtype_bytes, 1.0))
    m.passes.append(Pass("dH = dZ W", 2 * T * H * V, tv * dtype_bytes + chunks * w_bytes + T * H * 4, g))
    m.passes.append(Pass("dW += dZ^T H_s (fp32 C)", 2 * T * H * V,
                         tv * dtype_bytes + T * H * dtype_bytes + chunks * 2 * V * H * 4, g))
    m.extra_memory_bytes = tc * V * (8 + dtype_bytes) + V * H * 4 + T * H * 4
    return m


def recompute_model(T, H, V, kind, dev: Device, eff: Efficiency, cfg: TileConfig = TileConfig(),
                    chunk_tokens=4096, dtype_bytes=2) -> Model:
    """kernels/divergence_triton.py: the stats and the sums kernels (grid token tiles x vocab splits in
    grouped order, each recomputes both logits tiles in one loop over H sharing the W tile), the grad kernel
    (grid token tiles x vocab tiles, grouped, recomputes both tiles, writes dZ), the dH and dW GEMMs (fp32
    output / fp32 accumulate). 8 logits-sized GEMM-equivalents for every divergence. HBM traffic of a walk:
    with the grouped order a launch group's GROUP_T hidden-state tile pairs stay in L2 while it runs, so W
    is read once per group and the hidden states once; when they do not fit in half the L2, every program
    re-reads them per vocab tile."""
    from .divergence_triton import GROUP_T, NSUM, SUMS_PARTS, vocab_splits
    work = _kind_work(kind)
    n_tb = math.ceil(T / cfg.block_t)
    n_vt = math.ceil(V / cfg.block_v)
    splits = vocab_splits(T, V, cfg.block_t, sms=dev.sms)
    m = Model("recompute", note=f"{cfg.block_t}x{cfg.block_v}x{cfg.block_h} w{cfg.num_warps}, "
                                f"{cfg.registers} regs, m64n{cfg.wgmma_n}, {splits} vocab splits, group {GROUP_T}")
    tv = T * V
    groups = math.ceil(n_tb / GROUP_T)
    hs_bytes = 2 * T * H * dtype_bytes
    if GROUP_T * 2 * cfg.block_t * H * dtype_bytes <= dev.l2_mb * 2**20 * 0.5:
        walk_bytes = groups * V * H * dtype_bytes + hs_bytes
    else:
        walk_bytes = groups * V * H * dtype_bytes + n_vt * hs_bytes
    progs = n_tb * splits
    # row reductions per vocab tile: stats max + sum-exp of a and b; sums NSUM row sums (the per-entry clip's
    # count) in each of SUMS_PARTS column blocks
    for name, key, red in (("stats", "stats", 4), ("sums (div, clipped loss, S)", "sums", NSUM * SUMS_PARTS.value)):
        e, d = tile_efficiency(cfg, progs, dev, eff, mufu_per_logit=work[key][0], fp32_per_logit=work[key][1],
                               hdim=H, logits_per_tile=2, row_reductions=red)
        m.passes.append(Pass(f"{name} (grid {n_tb}x{splits}, wave {d['wave']:.2f})", 2 * 2 * T * H * V,
                             walk_bytes, e))
    chunks = math.ceil(T / chunk_tokens)
    tc = min(T, chunk_tokens)
    gprogs = math.ceil(tc / cfg.block_t) * n_vt
    e_grad, _ = tile_efficiency(cfg, gprogs, dev, eff, mufu_per_logit=work["grad"][0],
                                fp32_per_logit=work["grad"][1], hdim=H, logits_per_tile=2)
    m.passes.append(Pass("grad (recompute both tiles, write dZ)", 2 * 2 * T * H * V,
                         tv * dtype_bytes + chunks * (math.ceil(tc / cfg.block_t / GROUP_T) * V * H * dtype_bytes
                                                      + 2 * tc * H * dtype_bytes), e_grad))
    m.passes.append(Pass("dH = dZ W (fp32 out)", 2 * T * H * V, tv * dtype_bytes + chunks * V * H * dtype_bytes
                         + T * H * 4, eff.gemm))
    m.passes.append(Pass("dW += dZ^T H (fp32 accumulate)", 2 * T * H * V,
                         tv * dtype_bytes + T * H * dtype_bytes + chunks * 2 * V * H * 4, eff.gemm))
    m.extra_memory_bytes = tc * V * dtype_bytes + V * H * 4 + T * H * 4
    return m


def naive_model(T, H, V, kind) -> Model:
    """reference.py with compute_dtype=float32 under autograd (what `bench-kernels` runs as `naive`): fp32
    GEMMs and about 10 fp32 [T, V] tensors written and read forward, as many backward."""
    g = Efficiency().gemm
    tv = T * V
    passes_fwd = 12 if kind == "jsd" else 8  # log_softmax x2 (2 passes each), exp, sub, mul, sum (+ mixture)
    m = Model("naive", note="fp32 logits materialized, torch autograd")
    m.passes.append(Pass("logits a, b (fp32 GEMMs)", 2 * 2 * T * H * V, 2 * tv * 4, g, fp32_simt=True))
    m.passes.append(Pass(f"forward elementwise ({passes_fwd} passes)", 0, passes_fwd * tv * 8, 1.0))
    m.passes.append(Pass(f"backward elementwise ({passes_fwd} passes)", 0, passes_fwd * tv * 8, 1.0))
    m.passes.append(Pass("dH, dW (fp32 GEMMs)", 2 * 2 * T * H * V, tv * 4 * 2, g, fp32_simt=True))
    m.extra_memory_bytes = (passes_fwd // 2 + 2) * tv * 4
    return m


def liger_model(T, H, V, kind, *, dtype_bytes=2) -> Model:
    """LigerFusedLinearJSD: chunk = next_pow2(T / ceil(V / H)) tokens; per chunk two bf16 logits GEMMs, fp32
    upcasts, two log_softmax, the JSD kernel, softmax-based gradient in torch ops, bf16 dZ, dH GEMM and a bf16
    dW GEMM added to the bf16 grad_weight (read + write per chunk)."""
    g = Efficiency().gemm
    inc = math.ceil(V / H)
    tc = min(T, 2 ** math.ceil(math.log2(max(1, math.ceil(T / inc)))))
    chunks = math.ceil(T / tc)
    tv = T * V
    w_bytes = V * H * dtype_bytes
    m = Model("liger", note=f"chunk {tc} tokens ({chunks} chunks)")
    m.passes.append(Pass("logits GEMMs (bf16 out)", 2 * 2 * T * H * V, 2 * chunks * w_bytes + 2 * tv * dtype_bytes, g))
    # upcast (2 r + 4 w) x2, log_softmax x2 (~3 passes of 4 B each), JSD kernel (r 8, w 4), softmax (12),
    # the gradient's elementwise ops (~3 x 12), cast to bf16 (4 r + 2 w)
    elem = 2 * 6 + 2 * 12 + 12 + 12 + 36 + 6
    m.passes.append(Pass(f"elementwise + JSD kernel ({elem} B/logit)", 0, elem * tv, 1.0))
    m.passes.append(Pass("dH = dZ W", 2 * T * H * V, tv * dtype_bytes + chunks * w_bytes, g))
    m.passes.append(Pass("dW (bf16 GEMM + bf16 add per chunk)", 2 * T * H * V,
                         tv * dtype_bytes + chunks * V * H * dtype_bytes * 4, g))
    m.extra_memory_bytes = tc * V * (2 * dtype_bytes + 3 * 4) + V * H * dtype_bytes
    return m


def four_gemm_floor(T, H, V, dev: Device, eff: Efficiency) -> float:
    """The issue's roofline: 4 logits-sized bf16 GEMMs at the sustained cuBLAS rate (790 TF/s on H100)."""
    return 8 * T * H * V / (dev.bf16_tflops * 1e12 * eff.gemm)


def models(T, H, V, kind, dev, eff, memory_budget=None):
    return [store_model(T, H, V, kind, memory_budget=memory_budget), recompute_model(T, H, V, kind, dev, eff),
            naive_model(T, H, V, kind), liger_model(T, H, V, kind)]


def report(T, H, V, kind, *, eff: Efficiency = Efficiency(), tp=1, memory_budget=None, measured=None) -> str:
    """Text table per device: passes with FLOP / bytes / time, totals, % of the 4-GEMM roofline.
    `measured`: {impl: seconds} from a GPU run, printed next to the prediction."""
    v_local = math.ceil(V / tp)
    lines = [f"roofline model: T={T} H={H} V={V} (V_local={v_local}, TP={tp}) {kind}; "
             f"assumptions: cuBLAS GEMM {eff.gemm:.2f} x peak, streaming {eff.hbm:.2f} x HBM peak, "
             f"Triton tiles from the AOT config"]
    for dev in DEVICES:
        floor = four_gemm_floor(T, H, v_local, dev, eff)
        lines.append(f"\n{dev.name}: bf16 {dev.bf16_tflops:.0f} TF/s dense, fp32 {dev.fp32_tflops:.0f} TF/s, "
                     f"HBM {dev.hbm_tbs:.2f} TB/s; 4-GEMM roofline {floor * 1e3:.1f} ms "
                     f"({dev.bf16_tflops * eff.gemm:.0f} TF/s)")
        for mdl in models(T, H, v_local, kind, dev, eff, memory_budget):
            t = mdl.time(dev, eff)
            meas = ""
            if measured and mdl.impl in measured:
                meas = f", measured {measured[mdl.impl] * 1e3:.1f} ms ({measured[mdl.impl] / t:.2f}x predicted)"
            lines.append(f"  {mdl.impl:9s} {t * 1e3:8.1f} ms = {100 * floor / t:5.1f}% of roofline, "
                         f"{mdl.flop() / 1e12:6.1f} TFLOP, {mdl.bytes() / 1e9:6.1f} GB HBM, "
                         f"extra memory {mdl.extra_memory_bytes / 1e9:.1f} GB [{mdl.note}]{meas}")
            for p in mdl.passes:
                lines.append(f"      {p.name:44s} {p.flop / 1e12:7.2f} TFLOP {p.bytes / 1e9:7.1f} GB "
                             f"eff {p.compute_eff:.2f} -> {p.time(dev, eff) * 1e3:7.1f} ms")
    anchor = liger_model(*LIGER_ANCHOR[0], "jsd").time(H100, eff)
    lines.append(f"\ncalibration: Liger's fused linear JSD measured {LIGER_ANCHOR[1] * 1e3:.0f} ms on H100 at "
                 f"T={LIGER_ANCHOR[0][0]} H={LIGER_ANCHOR[0][1]} V={LIGER_ANCHOR[0][2]} (docs/kernels.md); this model "
                 f"predicts {anchor * 1e3:.0f} ms there ({LIGER_ANCHOR[1] / anchor:.2f}x): the assumed efficiencies "
                 f"are optimistic for a chunked torch pipeline; GPU runs print measured next to predicted")
    return "\n".join(lines)


LIGER_ANCHOR = ((8192, 4096, 128256), 0.183)  # published fwd+bwd on H100 (docs/kernels.md anchors)
