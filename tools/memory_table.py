"""Per-rank peak device memory of the Qwen3 COPSD examples on one 8-GPU node, from dry runs -> docs/memory.md.

    python tools/memory_table.py --out docs/memory.md --json docs/memory_table_runs.json [--jobs 2]
    python tools/memory_table.py --render-only --json docs/memory_table_runs.json --out docs/memory.md

Grid: Qwen3-1.7B / 4B / 8B x TP 1/2/4/8 (DP = 8 / TP, PP = 1) x response length 2048 / 8192 x activation
recompute none / full (parallel.recompute) x distributed optimizer on / off, COPSD with the examples'
settings (32 prompts per step, micro_batch_tokens 16384, a frozen teacher copy; student prompt 256 and
teacher prompt 1024 tokens).

How each cell is obtained (a full-size dry run of 8B takes ~4 minutes per configuration on the shared 2-core
machine, too slow for 96 cells): the real dry run (`copsd dry-run`'s `simulate_rank`, rank 0, two steps, the
second measured) at the model's full width with 1 and with 2 transformer layers. Within each phase of the step
(teacher pass, student pass, divergence kernel, weight gather) the live bytes at that phase's own peak are
linear in the layer count (weights, gradients, optimizer state and the teacher per layer; stored activations
per layer; embedding, LM head, divergence workspace constant), so each phase at full depth is
`m1 + (L - 1) * (m2 - m1)` and the step's peak is the largest phase. Each run
holds exactly one micro-batch per rank; the teacher hidden states the trainer keeps for the other
micro-batches of the step ([response tokens, hidden] in bf16 each) are added exactly. Distributed optimizer
off = on + optimizer state x (DP - 1) (Megatron shards fp32 main params and both Adam moments evenly over
DP). One cell (8B, TP 4, 2k, no recompute) is checked against a direct full-size dry run in docs/memory.md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"Qwen3-1.7B": "qwen3_1p7b", "Qwen3-4B": "qwen3_4b", "Qwen3-8B": "qwen3_8b"}
TPS = (1, 2, 4, 8)
RESPONSES = (2048, 8192)
RECOMPUTE = ("none", "full")
WORLD = 8
STUDENT_PROMPT, TEACHER_PROMPT = 256, 1024
H100_GB = 80.0
GB = 1024 ** 3
OVERHEAD_GB = 3.0  # CUDA context, NCCL buffers, allocator slack: not in the dry run's tensor bytes


def _one(job: dict) -> dict:
    """One dry run (in a worker process): the given model at `layers` layers."""
    import torch

    torch.set_num_threads(1)
    from megatron_copsd import dry_run
    from megatron_copsd.config import load_config

    key = job["key"]
    hf = json.loads((ROOT / "examples/hf_configs" / key / "config.json").read_text())
    hf.update(num_hidden_layers=job["layers"], max_window_layers=job["layers"])
    tmp = Path(tempfile.mkdtemp(prefix="memtable-"))
    (tmp / "config.json").write_text(json.dumps(hf))
    dp = WORLD // job["tp"]
    seq = TEACHER_PROMPT + job["response"] - 1
    per_mb = max(1, 16384 // seq)
    cfg = load_config(ROOT / "examples" / f"{key}_copsd.yaml", [
        f"parallel.tp={job['tp']}", "parallel.pp=1", f"parallel.recompute={job['recompute']}",
        "parallel.use_distributed_optimizer=true", f"rollout.max_new_tokens={job['response']}",
        f"data.prompts_per_step={dp * per_mb}", "rollout.n=1"])
    rep = dry_run.simulate_rank(cfg, tmp / "config.json", rank=0, world_size=WORLD, student_prompt=STUDENT_PROMPT,
                                teacher_prompt=TEACHER_PROMPT, response=job["response"], steps=2)
    return {**job, "peak": rep.peak_bytes, "breakdown": rep.breakdown, "seconds": rep.seconds, "per_mb": per_mb,
            "phase_peaks": rep.phase_peaks}


def _cell_key(r: dict) -> tuple:
    return (r["model"], r["tp"], r["response"], r["recompute"])


def combine(runs: list[dict]) -> dict:
    """(model, tp, response, recompute) -> full-depth estimate from the 1- and 2-layer runs."""
    by = {}
    for r in runs:
        by.setdefault(_cell_key(r), {})[r["layers"]] = r
    cells = {}
    for key, pair in by.items():
        if 1 not in pair or 2 not in pair:
            continue
        model, tp, response, _ = key
        hf = json.loads((ROOT / "examples/hf_configs" / MODELS[model] / "config.json").read_text())
        layers = hf["num_hidden_layers"]
        m1, m2 = pair[1], pair[2]
        # Each phase's own peak is linear in the layer count; the step's peak is the largest of them at full
        # depth (with 1 layer the teacher pass's transient may dominate, with 36 the student's activations).
        best = None
        for phase in set(m1["phase_peaks"]) & set(m2["phase_peaks"]):
            b1, b2 = m1["phase_peaks"][phase], m2["phase_peaks"][phase]
            full_p = {c: b1.get(c, 0) + (layers - 1) * (b2.get(c, 0) - b1.get(c, 0)) for c in set(b1) | set(b2)}
            if best is None or sum(full_p.values()) > sum(best[1].values()):
                best = (phase, full_p)
        phase, full = best
        peak = sum(full.values())
        dp = WORLD // tp
        seqs_per_rank = math.ceil(32 / dp)
        extra_teacher = max(0, seqs_per_rank - m1["per_mb"]) * response * hf["hidden_size"] * 2
        full["teacher-pass outputs"] = full.get("teacher-pass outputs", 0) + extra_teacher
        peak += extra_teacher
        opt = full.get("optimizer state", 0)
        cells[key] = {"peak_on": peak, "peak_off": peak + opt * (dp - 1), "breakdown": full, "dp": dp, "phase": phase,
                      "seconds": m1["seconds"] + m2["seconds"]}
    return cells


def render(cells: dict, validation: str = "") -> str:
    out = ["# Per-rank peak memory: Qwen3 COPSD on 80 GB H100s", "",
           "Generated by `tools/memory_table.py` from `copsd dry-run` (meta tensors, the real training step; see",
           "the tool's docstring for how each cell is obtained). One 8-GPU node: DP = 8 / TP, PP = 1; 32 prompts x 1",
           "sample per step, micro_batch_tokens 16384, frozen teacher copy, student prompt 256 / teacher prompt",
           "1024 tokens, every response at the length shown. GiB of tensor storage of the worst rank (rank 0, which",
           f"holds the embedding and the LM head); 'fits' allows {OVERHEAD_GB:.0f} GiB for the CUDA context, NCCL and",
           "allocator slack on an 80 GB H100 (74.5 GiB usable after the context: we count 80 GB = 74.5 GiB).", "",
           "**Caveat:** the dry run builds megatron-core's *local* layer spec (Transformer Engine is not installed",
           "here). Its attention materializes [b, heads, s, s] scores, so activations without recompute grow with",
           "s^2; with Transformer Engine's fused attention on a real H100 they are much smaller. Recompute `full`",
           "keeps only each layer's input (plus one layer's working set during backward).", ""]
    usable = 80e9 / GB
    header = "| model | TP | DP | response | recompute | peak GiB (dist. opt.) | fits | peak GiB (no dist. opt.) | fits |"
    out += [header, "|---|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        for tp in TPS:
            for response in RESPONSES:
                for rc in RECOMPUTE:
                    c = cells.get((model, tp, response, rc))
                    if c is None:
                        out.append(f"| {model} | {tp} | {WORLD // tp} | {response} | {rc} | not run | | | |")
                        continue
                    on, off = c["peak_on"] / GB, c["peak_off"] / GB
                    fit = lambda x: "yes" if x + OVERHEAD_GB <= usable else "no"  # noqa: E731
                    out.append(f"| {model} | {tp} | {c['dp']} | {response} | {rc} | {on:.1f} | {fit(on)} | "
                               f"{off:.1f} | {fit(off)} |")
    out += ["", "Breakdown (GiB) of each cell with the distributed optimizer, at the peak (phase: where it occurs):", "",
            "| model | TP | response | recompute | phase | weights | grads | optimizer | teacher | teacher pass | "
            "activations | divergence | other |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    main = ("weights", "gradients", "optimizer state", "teacher", "teacher-pass outputs", "activations",
            "divergence workspace")
    for (model, tp, response, rc), c in sorted(cells.items(), key=lambda kv: (list(MODELS).index(kv[0][0]),) + kv[0][1:]):
        b = c["breakdown"]
        other = sum(v for k, v in b.items() if k not in main)
        out.append(f"| {model} | {tp} | {response} | {rc} | {c['phase']} | " + " | ".join(f"{b.get(k, 0) / GB:.1f}" for k in main)
                   + f" | {other / GB:.1f} |")
    if validation:
        out += ["", validation]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/memory.md")
    ap.add_argument("--json", default="runs/memory_table.json", help="raw runs (read back, extended, rewritten)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--validation", default="", help="a line of text appended to the document")
    args = ap.parse_args(argv)
    store = Path(args.json)
    runs = json.loads(store.read_text()) if store.is_file() else []
    done = {(_cell_key(r), r["layers"]) for r in runs}
    jobs = [dict(model=m, key=MODELS[m], tp=tp, response=resp, recompute=rc, layers=layers)
            for m in args.models.split(",") for resp in RESPONSES for rc in RECOMPUTE for tp in TPS
            for layers in (1, 2)]
    jobs = [j for j in jobs if ((j["model"], j["tp"], j["response"], j["recompute"]), j["layers"]) not in done]
    if not args.render_only and jobs:
        store.parent.mkdir(parents=True, exist_ok=True)
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for i, res in enumerate(pool.map(_one, jobs)):
                runs.append(res)
                store.write_text(json.dumps(runs, indent=1))
                print(f"[{i + 1}/{len(jobs)}] {res['model']} tp={res['tp']} resp={res['response']} "
                      f"recompute={res['recompute']} layers={res['layers']}: {res['peak'] / GB:.2f} GiB "
                      f"({res['seconds']:.0f} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(render(combine(runs), args.validation))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
