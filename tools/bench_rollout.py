"""Throughput of the embedded rollout engine vs `transformers.generate` on the same tiny model (CPU).

Run:  python tools/bench_rollout.py [--batch-sizes 8 16 32] [--new-tokens 64] [--threads 1]

Both sides decode greedily for exactly `--new-tokens` tokens (no EOS: `eos_token_ids` is set to an id
outside the vocabulary for our engine and `eos_token_id=None` for transformers) from the same
left-padded prompts of mixed lengths, fp32, KV cache on. Reports generated tokens per second and the
ratio embedded / transformers; the best of `--repeats` runs is kept for each.
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from megatron_copsd.rollout.embedded import EmbeddedEngine
from megatron_copsd.rollout.types import SamplingParams
from megatron_copsd.testing.tiny import make_tiny_hf_model


def _prompts(batch: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 300) for _ in range(rng.randrange(8, 33))] for _ in range(batch)]


def _hf_generate(model, prompts, new_tokens: int) -> int:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return (out.shape[1] - width) * len(prompts)


def _ours(engine, prompts, new_tokens: int) -> int:
    out = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0))
    return sum(len(s.response_ids) for per in out for s in per)


def _best_rates(fns, repeats: int) -> list[float]:
    """Best tokens/s of each fn; the fns alternate within each repeat so load changes hit both alike."""
    best = [0.0] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            tokens = fn()
            best[k] = max(best[k], tokens / (time.perf_counter() - t0))
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = make_tiny_hf_model(None, "qwen3", seed=0)
    engine = EmbeddedEngine(model, eos_token_ids=[10**9], max_batch_size=max(args.batch_sizes))
    with torch.inference_mode():  # warm-up both paths once
        _hf_generate(model, _prompts(2), 4)
        _ours(engine, _prompts(2), 4)
    print(f"tiny qwen3 (hidden 64, 2 layers, vocab 301), fp32, CPU, {args.threads} thread(s), "
          f"{args.new_tokens} new tokens, greedy")
    print(f"{'batch':>5} {'embedded tok/s':>15} {'transformers tok/s':>19} {'ratio':>6}")
    for batch in args.batch_sizes:
        prompts = _prompts(batch, seed=batch)
        with torch.inference_mode():
            ours, ref = _best_rates([lambda: _ours(engine, prompts, args.new_tokens),
                                     lambda: _hf_generate(model, prompts, args.new_tokens)], args.repeats)
        print(f"{batch:>5} {ours:>15.0f} {ref:>19.0f} {ours / ref:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
