"""Checkpoint write throughput on this machine, and the projected save time of Qwen3-8B at TP=4.

    .venv/bin/python tools/bench_checkpoint.py [--mb 512] [--ranks 1] [--dir /path/on/the/target/fs]
        [--dp 2] [--window-s 600] [--node-gpus 8]

Writes a synthetic sharded state dict (fp32 tensors shaped like transformer weights, `--mb` MB per rank)
through the same path as training checkpoints (`checkpoint/state.py`: megatron-core dist_checkpointing,
torch_dist), once synchronously and once asynchronously, in `--ranks` real gloo processes. Reports MB/s
(bytes / wall time of the synchronous save, all ranks together) and, for async, how long training was
blocked. Then projects Qwen3-8B at TP=4 with the distributed optimizer over `--dp` replicas:
bf16 weights (2 B/param) + fp32 main params, Adam exp_avg, exp_avg_sq (12 B/param), each byte written once
and spread over the TP x DP ranks -- against the sbatch signal window (`--signal=B:USR1@600`).
Run it on the cluster's checkpoint file system for real numbers; the figure here is this machine's disk.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

# Qwen3-8B (config.json of Qwen/Qwen3-8B): untied embeddings, q/k norms, GQA 32/8 heads of 128.
QWEN3_8B = dict(vocab=151936, hidden=4096, intermediate=12288, layers=36, heads=32, kv_heads=8, head_dim=128)


def qwen3_8b_params(c: dict = QWEN3_8B) -> int:
    h, q, kv = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    layer = h * q + 2 * h * kv + q * h + 3 * h * c["intermediate"] + 2 * h + 2 * c["head_dim"]
    return 2 * c["vocab"] * h + c["layers"] * layer + h


def _worker(rank, world, out_dir, mb):
    import torch
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_copsd.checkpoint.state import CheckpointWriter
    from megatron_copsd.megatron.cpu_compat import enable_cpu_compat

    enable_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)  # each rank: its own shard
    g = torch.Generator().manual_seed(rank)

    def state(numel):
        rows, out, i = 1024, {}, 0
        while numel > 0:  # weight-like shards of up to 64 MiB
            cols = min(max(numel // rows, 1), 16 * 1024)
            t = torch.randn(rows, cols, generator=g)
            out[f"w{i}"] = ShardedTensor.from_rank_offsets(f"w{i}", t, (1, rank, world), replica_id=0)
            numel -= rows * cols
            i += 1
        return out

    # Warm-up: megatron-core's writer starts a multiprocessing Manager on its first save (once per process,
    # seconds under load); a training run pays it at its first checkpoint only.
    CheckpointWriter(f"{out_dir}/warmup").save(1, state(1024 * 8), {"rng": torch.get_rng_state()})
    sd = state(mb * 2**20 // 4)
    out = {}
    for async_save in (False, True):
        records = []
        writer = CheckpointWriter(f"{out_dir}/{async_save}", keep_last=1, async_save=async_save,
                                  on_complete=records.append)
        t0 = time.perf_counter()
        writer.save(1, dict(sd), {"rng": torch.get_rng_state()})
        blocked = time.perf_counter() - t0
        writer.wait()
        out[async_save] = {"blocked_s": blocked, "total_s": time.perf_counter() - t0,
                           "record": records[0] if records else None}
    parallel_state.destroy_model_parallel()
    return out


def measure(mb: int, ranks: int, base: str) -> tuple[dict, dict]:
    from megatron_copsd.testing.multiproc import run_distributed

    with tempfile.TemporaryDirectory(dir=base) as d:
        res = run_distributed(_worker, ranks, args=(d, mb), timeout=1800)
    out = []
    for async_save in (False, True):
        rec = res[0][async_save]["record"]
        total = max(r[async_save]["total_s"] for r in res)
        out.append({"async": async_save, "bytes": rec["bytes"], "total_s": total, "write_s": rec["write_s"],
                    "blocked_s": max(r[async_save]["blocked_s"] for r in res), "mb_per_s": rec["bytes"] / 1e6 / total})
    return out[0], out[1]


def project(mb_per_s_per_rank: float, *, tp: int, dp: int, node_gpus: int, window_s: float) -> dict:
    n = qwen3_8b_params()
    total = n * (2 + 12)
    ranks = tp * dp
    per_rank = total / ranks
    node_bytes = per_rank * min(node_gpus, ranks)
    return {
        "params": n, "total_bytes": total, "ranks": ranks, "bytes_per_rank": per_rank,
        # the file system scales with writers (parallel FS, node-local NVMe per node): per-rank rate holds
        "save_s_scaling": per_rank / (mb_per_s_per_rank * 1e6),
        # one node's writers share the measured rate (a single disk or a saturated client)
        "save_s_node_shared": node_bytes / (mb_per_s_per_rank * 1e6),
        "window_s": window_s,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=512, help="MB of tensors per rank")
    ap.add_argument("--ranks", type=int, default=1, help="writer processes (real gloo ranks)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (the checkpoint file system)")
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--dp", type=int, default=2, help="data-parallel replicas of the projected 8B run")
    ap.add_argument("--node-gpus", type=int, default=8)
    ap.add_argument("--window-s", type=float, default=600.0, help="USR1 lead before the time limit (sbatch)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    sync, asyn = measure(args.mb, args.ranks, args.dir)
    per_rank = sync["mb_per_s"] / args.ranks
    proj = project(per_rank, tp=args.tp, dp=args.dp, node_gpus=args.node_gpus, window_s=args.window_s)
    print(f"this machine ({args.dir}, {args.ranks} rank(s), {sync['bytes'] / 1e6:.0f} MB): synchronous save "
          f"{sync['total_s']:.2f} s = {sync['mb_per_s']:.0f} MB/s ({per_rank:.0f} MB/s per rank); asynchronous: "
          f"training blocked {asyn['blocked_s']:.2f} s of {asyn['total_s']:.2f} s")
    print(f"Qwen3-8B: {proj['params'] / 1e9:.2f} B params, {proj['total_bytes'] / 1e9:.1f} GB per checkpoint "
          f"(bf16 weights + fp32 main params + 2 Adam moments), TP={args.tp} x DP={args.dp} = {proj['ranks']} "
          f"writers, {proj['bytes_per_rank'] / 1e9:.1f} GB each")
    for key, what in (("save_s_scaling", "file system scales with writers"),
                      ("save_s_node_shared", f"one node's {min(args.node_gpus, proj['ranks'])} writers share "
                                              f"{sync['mb_per_s']:.0f} MB/s")):
        verdict = "fits" if proj[key] < args.window_s else "DOES NOT FIT"
        print(f"  projected save at this rate ({what}): {proj[key]:.0f} s -> {verdict} in the "
              f"{args.window_s:.0f} s USR1 window")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sync": sync, "async": asyn, "projection": proj, "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
