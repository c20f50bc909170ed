"""Peak memory of one COPSD training step vs vocabulary size (the LM head never materialises logits).

    python tools/bench_train_memory.py --vocab 4096 65536 --tokens 1024 4096

For each vocabulary size a fresh process builds a tiny Megatron policy + frozen teacher (hidden 64),
runs one warm-up step (so optimizer state and allocator pools exist), then measures the next full step
(teacher pass, student forward/backward through get_forward_backward_func, optimizer step): on GPU
`torch.cuda.max_memory_allocated` above the pre-step allocation, on CPU the peak process RSS sampled
every millisecond above the pre-step RSS. Printed next to it: the size of ONE fp32 [tokens x vocab]
logits tensor for one micro-batch (`--seq-per-mb` sequences), which a logits-based implementation would
need several times over (student and teacher logits, softmaxes, gradient) at that point.

What still grows with the vocabulary is parameter-sized ([V x H]: LM-head gradient, Adam temporaries)
and the kernel's chunk buffers (capped at 2^22 elements each); nothing grows with tokens x vocab, so the
step peak at a fixed vocabulary is flat in the number of tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time


def measure(vocab: int, tokens: int, hidden: int = 64, seq_per_mb: int = 8) -> dict:
    import psutil
    import torch

    from megatron_copsd.batching import TrainItem, collate, num_response_tokens, pack_microbatches
    from megatron_copsd.config import Config
    from megatron_copsd.megatron.dist import destroy_distributed, init_distributed
    from megatron_copsd.megatron.model_provider import load_hf_config
    from megatron_copsd.run_setup import build_frozen_copy, build_policy
    from megatron_copsd.testing.multiproc import free_port
    from megatron_copsd.testing.tiny import make_tiny_hf_model
    from megatron_copsd.train_step import ObjectiveSpec, student_pass, teacher_pass

    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    d = tempfile.mkdtemp()
    make_tiny_hf_model(d, "qwen3", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden)
    init_distributed(1, 1)
    cfg = Config()
    hfc = load_hf_config(d)
    policy = build_policy(cfg, d, hfc, torch.float32)
    teacher = build_frozen_copy(cfg, d, hfc, torch.float32)
    spec = ObjectiveSpec(name="copsd", valid_vocab=vocab)
    g = torch.Generator().manual_seed(0)
    resp_len = 64
    items = [TrainItem(torch.randint(2, vocab, (16,), generator=g).tolist(),
                       torch.randint(2, vocab, (48,), generator=g).tolist(),
                       torch.randint(2, vocab, (resp_len,), generator=g).tolist(), index=i)
             for i in range(max(1, tokens // resp_len))]
    budget = seq_per_mb * (48 + resp_len)

    def step():
        mbs = [collate(x, pad_id=0) for x in pack_microbatches(items, budget)]
        teacher_pass(teacher, mbs, spec)
        policy.model.zero_grad_buffer()
        policy.optimizer.zero_grad()
        out = student_pass(policy.model, mbs, spec, float(num_response_tokens(items)), teacher_model=teacher)
        policy.optimizer.step()
        return out

    step()  # warm-up: optimizer state, allocator pools
    proc = psutil.Process()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    base_rss = proc.memory_info().rss
    peak = [base_rss]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    out = step()
    seconds = time.perf_counter() - t0
    stop.set()
    t.join()
    destroy_distributed()
    res = {"vocab": vocab, "tokens": num_response_tokens(items), "hidden": hidden, "seconds": seconds,
           "loss": out["loss"], "logits_bytes": num_response_tokens(items) * vocab * 4,
           "mb_logits_bytes": min(seq_per_mb * resp_len, num_response_tokens(items)) * vocab * 4,
           "param_bytes_lm_head": vocab * hidden * 4}
    if cuda:
        res["step_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        res["device"] = "cuda"
    else:
        res["step_peak_bytes"] = peak[0] - base_rss
        res["device"] = "cpu (RSS sampled every 1 ms)"
    return res


def run_isolated(vocab: int, tokens: int) -> dict:
    """One measurement in a fresh interpreter (so earlier runs do not inflate the process peak)."""
    out = subprocess.run([sys.executable, __file__, "--vocab", str(vocab), "--tokens", str(tokens), "--json"],
                         capture_output=True, text=True, check=True,
                         # Fixed mmap threshold: glibc otherwise raises it after the first large free and
                         # serves later big buffers from a fragmenting heap, so RSS would track history.
                         env=dict(os.environ, PYTHONWARNINGS="ignore", MALLOC_MMAP_THRESHOLD_="131072"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[4096, 65536])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--json", action="store_true", help="measure in this process, print one JSON line")
    a = p.parse_args(argv)
    if a.json:
        print(json.dumps(measure(a.vocab[0], a.tokens[0])))
        return 0
    mb = 1 / 2**20
    print(f"{'vocab':>8} {'tokens':>7} {'step peak MiB':>14} {'[T_mb,V] logits MiB':>20} {'[V,H] param MiB':>16} "
          f"{'seconds':>8}")
    for v in a.vocab:
        for t in a.tokens:
            r = run_isolated(v, t)
            print(f"{v:>8} {r['tokens']:>7} {r['step_peak_bytes'] * mb:>14.1f} {r['mb_logits_bytes'] * mb:>20.1f} "
                  f"{r['param_bytes_lm_head'] * mb:>16.1f} {r['seconds']:>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
