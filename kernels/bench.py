"""Benchmark of the fused divergence against materializing baselines (`copsd bench-kernels`).

    copsd bench-kernels --mode cpu --T 4096 --H 256 --V 32768 --out-dir bench_out
    copsd bench-kernels --mode gpu --out-dir bench_out            # shapes of docs/kernels.md
    python tools/bench_kernels.py --mode cpu --impls chunked,naive --repeat 1

Every (case, implementation) runs in its own subprocess, so peak memory is that run's alone:
CPU: wall time of forward+backward (median of --repeat after one warm-up) and peak RSS minus the RSS after
building the inputs. GPU: CUDA events, forward and backward separately (median of --repeat >= 20 after
warm-up), TFLOP/s on the 4-GEMM count (student logits, teacher logits, dH, dW = 8 T H V FLOP), peak
allocated memory minus the inputs, max per-token error vs float64 on the first 256 tokens.
Implementations: fused (triton on GPU -- store mode under the default memory budget -- chunked on CPU),
recompute (the Triton recompute mode), chunked, naive (fp32 materialized logits, the
reference module), refcode (the COPSD reference code's loss: generalized JSD on materialized logits),
liger / liger_compile (LigerFusedLinearJSDLoss, eager / torch.compile; JSD only, skipped if not installed),
floor (the 4-GEMM floor: four plain matmuls of the fused path's shapes -- student logits, teacher logits,
dH = dZ W, dW = dZ^T H -- and nothing else; the CPU speed target is chunked <= 1.15x floor).
--rounds N repeats the whole list of implementations N times, interleaved (a, b, a, b, ...), so a shared
machine's load drifts onto every implementation alike; the summary then shows the median over rounds.
--model prints the roofline model (kernels/roofline.py) instead of running anything on CPU; on a GPU it
runs the cases and prints measured next to predicted.
Writes <out-dir>/bench_<device>.csv (with the device name) and a PNG plot; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

import torch

IMPLS = ("fused", "recompute", "chunked", "naive", "refcode", "liger", "liger_compile", "floor")
GPU_SHAPES = [(t, h, 151936) for t in (4096, 8192, 16384) for h in (2560, 4096)]


def _inputs(T, H, V, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(T, H, generator=g).to(device, dtype)
    ht = (hs.float().cpu() + 0.5 * torch.randn(T, H, generator=g)).to(device, dtype)
    w = (torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)).to(device, dtype)
    mask = torch.rand(T, generator=g) > 0.4  # 40% masked tokens
    return hs, ht, w, mask.to(device)


def _beta(args):
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(args.divergence, args.beta)


def _loss_fn(impl, args, device):
    """Returns f(hs, ht, w, mask) -> (scalar loss, per_token or None) for one implementation."""
    import copsd_kernels
    from copsd_kernels import reference as ref

    kw = dict(divergence=args.divergence, beta=args.beta, temperature=args.tau, token_clip=args.clip)
    if impl in ("fused", "chunked", "recompute"):
        which = {"fused": "auto", "chunked": "chunked", "recompute": "triton"}[impl]
        extra = dict(mode="recompute") if impl == "recompute" else {}
        if impl == "fused" and args.memory_budget is not None:
            extra["memory_budget"] = int(args.memory_budget)

        def f(hs, ht, w, mask):
            lw = mask.float() / mask.sum().clamp_min(1)
            out = copsd_kernels.fused_linear_divergence(hs, ht, w, loss_weight=lw, impl=which, **kw, **extra)
            return out.loss, out.per_token
        return f
    if impl == "naive":
        def f(hs, ht, w, mask):
            lw = mask.float() / mask.sum().clamp_min(1)
            out = ref.fused_linear_divergence(hs, ht, w, loss_weight=lw, compute_dtype=torch.float32, **kw)
            return out.loss, out.per_token
        return f
    if impl == "refcode":
        def f(hs, ht, w, mask):
            with torch.no_grad():
                teacher_logits = ht @ w.T
            loss = ref.reference_code_jsd_loss(hs @ w.T, teacher_logits, beta=_beta(args), temperature=args.tau,
                                               token_clip=args.clip, mask=mask)
            return loss, None
        return f
    if impl == "floor":
        def f(hs, ht, w, mask):
            # the fused path's four GEMMs at the same shapes and dtype, gradients set by hand
            dz = torch.mm(hs.detach(), w.detach().T)  # student logits
            torch.mm(ht, w.detach().T, out=torch.empty_like(dz))  # teacher logits
            hs.grad = torch.mm(dz, w.detach())  # dH = dZ W
            w.grad = torch.mm(dz.T, hs.detach())  # dW = dZ^T H
            return _NoBackward(), None
        return f
    if impl in ("liger", "liger_compile"):
        if args.divergence != "jsd" or args.clip is not None:
            raise NotImplementedError("Liger's fused linear JSD has no clip and only the JSD family")
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        mod = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=args.beta,
                                      temperature=args.tau, compiled=impl == "liger_compile")

        def f(hs, ht, w, mask):
            labels = torch.where(mask, torch.zeros_like(mask, dtype=torch.long), torch.full_like(mask, -100,
                                                                                                 dtype=torch.long))
            return mod(hs, w, ht, w.detach(), labels), None
        return f
    raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")


class _NoBackward:
    """The floor computes its gradients in the forward; `backward()` is a no-op."""

    def backward(self):
        return None


def _rss():
    import psutil
    return psutil.Process().memory_info().rss


def _peak_rss():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _worker(args) -> dict:
    """One (case, impl) measurement inside this process."""
    device = "cuda" if args.mode == "gpu" else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hs, ht, w, mask = _inputs(args.T, args.H, args.V, device, dtype)
    f = _loss_fn(args.impl, args, device)
    hs.requires_grad_(), w.requires_grad_()
    row = dict(impl=args.impl, T=args.T, H=args.H, V=args.V, divergence=args.divergence, beta=args.beta,
               tau=args.tau, clip=args.clip, dtype=args.dtype)
    if device == "cpu":
        base = _rss()
        times, cpu_times = [], []
        for i in range(args.repeat + 1):
            hs.grad = w.grad = None
            t0, c0 = time.perf_counter(), time.process_time()
            loss, _ = f(hs, ht, w, mask)
            loss.backward()
            if i > 0 or args.repeat == 0:  # the first run is warm-up (torch.compile, allocator)
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
        # CPU seconds (all threads) are reported too: on a shared machine wall time depends on the neighbours
        row.update(device=_cpu_name(), fwd_bwd_s=statistics.median(times), cpu_s=statistics.median(cpu_times),
                   threads=torch.get_num_threads(), peak_mem_gb=(_peak_rss() - base) / 1e9)
        return row
    return _gpu_measure(f, hs, ht, w, mask, args, row)


def _gpu_measure(f, hs, ht, w, mask, args, row):
    from copsd_kernels import reference as ref
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd, bwd = [], []
    for i in range(args.warmup + args.repeat):
        hs.grad = w.grad = None
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        loss, per_token = f(hs, ht, w, mask)
        e1.record()
        loss.backward()
        e2.record()
        torch.cuda.synchronize()
        if i >= args.warmup:
            fwd.append(e0.elapsed_time(e1) / 1e3)
            bwd.append(e1.elapsed_time(e2) / 1e3)
    peak = torch.cuda.max_memory_allocated() - base
    err = float("nan")
    if per_token is not None:  # float64 check on a slice: the full float64 problem would not fit
        n = min(256, args.T)
        want = ref.fused_linear_divergence(hs[:n].detach().double(), ht[:n].double(), w.detach().double(),
                                           divergence=args.divergence, beta=args.beta, temperature=args.tau)
        err = float((per_token[:n].double() - want.per_token).abs().max())
    t = statistics.median(fwd) + statistics.median(bwd)
    row.update(device=torch.cuda.get_device_name(), fwd_s=statistics.median(fwd), bwd_s=statistics.median(bwd),
               fwd_bwd_s=t, tflops=8 * args.T * args.H * args.V / t / 1e12, peak_mem_gb=peak / 1e9,
               max_err_vs_fp64=err)
    return row


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    return f"cpu x{os.cpu_count()}"


def _run_case(args, impl, T, H, V) -> dict | None:
    cmd = [sys.executable, "-m", "copsd_kernels.bench", "--worker", "--impl", impl, "--mode", args.mode,
           "--T", str(T), "--H", str(H), "--V", str(V), "--divergence", args.divergence, "--beta", str(args.beta),
           "--tau", str(args.tau), "--dtype", args.dtype, "--repeat", str(args.repeat), "--warmup", str(args.warmup)]
    if args.clip is not None:
        cmd += ["--clip", str(args.clip)]
    if args.memory_budget is not None:
        cmd += ["--memory-budget", str(args.memory_budget)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"[bench] {impl:14s} T={T} H={H} V={V} {args.divergence} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"[bench]   skipped: {tail[0][:200]}", file=sys.stderr, flush=True)
        return None
    row = json.loads(lines[-1])
    cpu = f", {row['cpu_s']:.2f} CPU-s" if "cpu_s" in row else ""
    print(f"[bench]   {row['fwd_bwd_s']:.3f} s{cpu}, peak +{row['peak_mem_gb']:.3f} GB", file=sys.stderr, flush=True)
    return row


def _write_outputs(rows, out_dir, device):
    os.makedirs(out_dir, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in device)[:60]
    path = os.path.join(out_dir, f"bench_{slug}.csv")
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "device", k))
    with open(path + ".tmp", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['impl']}\nT={r['T']} H={r['H']}" for r in rows]
    axes[0].bar(labels, [r["fwd_bwd_s"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("forward + backward (s)")
    axes[1].bar(labels, [r["peak_mem_gb"] for r in rows], color="tab:orange")
    axes[1].set_ylabel("peak extra memory (GB)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, rotation=45)
    fig.suptitle(f"fused linear {rows[0]['divergence']} on {device}")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"bench_{slug}.png"), dpi=120)
    return path


def _median_over_rounds(runs):
    """One row per (impl, shape): the median of every timing over the interleaved rounds (and the max of
    the peak memory); `rounds` says how many went in."""
    groups = {}
    for r in runs:
        groups.setdefault((r["impl"], r["T"], r["H"], r["V"]), []).append(r)
    rows = []
    for rs in groups.values():
        row = dict(rs[0], rounds=len(rs))
        for k in ("fwd_bwd_s", "cpu_s", "fwd_s", "bwd_s", "tflops"):
            if k in row:
                row[k] = statistics.median(x[k] for x in rs)
        row["peak_mem_gb"] = max(x["peak_mem_gb"] for x in rs)
        rows.append(row)
    return rows


def _ratios(row, rows) -> str:
    """'vs naive' and 'vs liger_compile' (the best public CPU peer) factors for the same shape, when run:
    >1 means `row` is that many times faster (wall; CPU seconds in brackets) / smaller in peak memory;
    'floor': how many times the 4-GEMM floor's time `row` takes (the CPU target is <= 1.15)."""
    out = []
    fl = next((r for r in rows if r["impl"] == "floor" and (r["T"], r["H"], r["V"]) ==
               (row["T"], row["H"], row["V"])), None)
    if fl is not None and fl is not row:
        cpu = f" ({row['cpu_s'] / fl['cpu_s']:.3f}x CPU-s)" if "cpu_s" in row and "cpu_s" in fl else ""
        out.append(f"{row['fwd_bwd_s'] / fl['fwd_bwd_s']:.3f}x the 4-GEMM floor{cpu}")
    for other in ("naive", "liger_compile"):
        b = next((r for r in rows if r["impl"] == other and (r["T"], r["H"], r["V"]) ==
                  (row["T"], row["H"], row["V"])), None)
        if b is None or b is row:
            continue
        cpu = f" ({b['cpu_s'] / row['cpu_s']:.2f}x CPU-s)" if "cpu_s" in row and "cpu_s" in b else ""
        out.append(f"vs {other}: {b['fwd_bwd_s'] / row['fwd_bwd_s']:.2f}x faster{cpu}, "
                   f"{b['peak_mem_gb'] / max(row['peak_mem_gb'], 1e-9):.1f}x less memory")
    return ("  " + "; ".join(out)) if out else ""


def _print_model(args, gpu) -> int:
    """--model: the roofline prediction at one shape (default the headline T=16384, H=4096, V=151,936); on a
    GPU the fused implementation (store and recompute modes), naive and liger run too and their measured
    fwd+bwd time is printed next to the prediction."""
    from . import roofline
    T, H, V = args.T or 16384, args.H or 4096, args.V or 151936
    eff = roofline.Efficiency(**{k: v for k, v in (("gemm", args.gemm_eff), ("hbm", args.hbm_eff)) if v})
    measured = {}
    if gpu:
        for name, impl in (("store", "fused"), ("recompute", "recompute"), ("naive", "naive"), ("liger", "liger")):
            row = _run_case(args, impl, T, H, V)
            if row:
                measured[name] = row["fwd_bwd_s"]
    print(roofline.report(T, H, V, args.divergence, eff=eff, tp=args.tp, memory_budget=args.memory_budget,
                          measured=measured))
    return 0


def _parser():
    p = argparse.ArgumentParser(prog="copsd bench-kernels", description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--impls", default=None, help=f"comma list from {IMPLS}")
    p.add_argument("--T", type=int, default=None)
    p.add_argument("--H", type=int, default=None)
    p.add_argument("--V", type=int, default=None)
    p.add_argument("--divergence", default="jsd", choices=("forward_kl", "reverse_kl", "jsd"))
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--clip", type=float, default=None)
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16"))
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="repeat the implementation list, interleaved")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per worker (1 on a shared machine: idle threads spin at barriers)")
    p.add_argument("--out-dir", default="bench_out")
    p.add_argument("--model", action="store_true",
                   help="print the roofline model (FLOPs, HBM bytes, predicted time on H100/H200 per pass); "
                        "with --mode gpu also run the cases and print measured next to predicted")
    p.add_argument("--tp", type=int, default=1, help="--model: tensor-parallel size (V_local = V / tp)")
    p.add_argument("--memory-budget", type=float, default=None, help="store-mode budget in bytes per rank")
    p.add_argument("--gemm-eff", type=float, default=None, help="--model: cuBLAS fraction of peak (0.80)")
    p.add_argument("--hbm-eff", type=float, default=None, help="--model: streaming fraction of HBM peak (0.85)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.mode == "auto":
        args.mode = "gpu" if torch.cuda.is_available() else "cpu"
    gpu = args.mode == "gpu"
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.repeat = args.repeat if args.repeat is not None else (20 if gpu else 3)
    if args.worker:
        print(json.dumps(_worker(args)), flush=True)
        return 0
    if gpu and not torch.cuda.is_available():
        raise ValueError("--mode gpu needs a CUDA device")
    if args.model:
        return _print_model(args, gpu)
    if gpu and args.repeat < 20:
        print("[bench] warning: the protocol asks for --repeat >= 20 on GPU", file=sys.stderr)
    impls = args.impls.split(",") if args.impls else list(IMPLS)
    for impl in impls:
        if impl not in IMPLS:
            raise ValueError(f"--impls: unknown implementation {impl!r}; choose from {IMPLS}")
    shapes = [(args.T, args.H, args.V)] if args.T else (GPU_SHAPES if gpu else [(4096, 256, 32768)])
    runs = [r for _ in range(args.rounds) for shape in shapes for impl in impls
            if (r := _run_case(args, impl, *shape))]
    rows = _median_over_rounds(runs)
    if not rows:
        print("[bench] no case ran", file=sys.stderr)
        return 1
    path = _write_outputs(rows, args.out_dir, rows[0]["device"])
    for r in rows:
        cpu = f" ({r['cpu_s']:.2f} CPU-s)" if "cpu_s" in r else ""
        print(f"{r['impl']:14s} T={r['T']} H={r['H']} V={r['V']}: {r['fwd_bwd_s']:.3f} s{cpu}, "
              f"+{r['peak_mem_gb']:.3f} GB{_ratios(r, rows)}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
