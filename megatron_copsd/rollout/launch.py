"""Command lines for SGLang servers and `sglang_router`, built from explicit arguments (no sglang import).

Run (prints the command; the slurm scripts `exec` it):

    python -m megatron_copsd.rollout.launch server --model-path /ckpt/hf --tp 2 --port 30000
    python -m megatron_copsd.rollout.launch router --port 30100 --worker http://node1:30000
    python -m megatron_copsd.rollout.launch register --router http://r:30100 --worker http://node2:30000

Add `--shell` to get one shell-quoted line instead of one argument per line.

Servers start at `--weight-version 0` (the trainer's version before its first update; SGLang's own default
is "default"), get `--enable-deterministic-inference` with `--deterministic` (needed for `sampling_seed`
to be honoured), and refuse `--dp > 1` with `--weight-sync nccl` (the DP replicas would claim the same
NCCL group ranks). `server` also refuses to print a command when this environment -- the one the server
inherits -- changes SGLang's log-prob semantics (`SGLANG_RETURN_ORIGINAL_LOGPROB`, `--rl-on-policy-target`).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Mapping, Sequence

from megatron_copsd.rollout.sglang_checks import LOGPROB_ENV, env_flag


def server_command(
    model_path: str,
    *,
    tp: int = 1,
    dp: int = 1,
    host: str = "0.0.0.0",
    port: int = 30000,
    mem_fraction: float | None = 0.7,
    memory_saver: bool = False,
    skip_tokenizer_init: bool = True,
    seed: int | None = None,
    dtype: str | None = None,
    deterministic: bool = False,
    skip_warmup: bool = False,
    nnodes: int = 1,
    node_rank: int = 0,
    dist_init_addr: str | None = None,
    weight_version: str | None = "0",
    weight_sync: str = "disk",
    python: str = sys.executable,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """argv of `python -m sglang.launch_server` for one (possibly multi-node) server."""
    if tp < 1 or dp < 1:
        raise ValueError(f"tp and dp must be >= 1, got tp={tp} dp={dp}")
    if weight_sync not in ("disk", "nccl"):
        raise ValueError(f"weight_sync must be disk or nccl, got {weight_sync!r}")
    if weight_sync == "nccl" and dp > 1:
        raise ValueError(f"dp={dp}: NCCL weight sync needs one server per data-parallel replica (dp=1; each "
                         "replica's TP ranks would claim the same group ranks); launch more servers instead")
    if any(a == "--rl-on-policy-target" or a.startswith("--rl-on-policy-target=") for a in extra_args):
        raise ValueError("--rl-on-policy-target changes the returned log-probs away from log_softmax(logits / T), "
                         "which the trainer relies on")
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    if mem_fraction is not None and not 0 < mem_fraction < 1:
        raise ValueError(f"mem_fraction must be in (0, 1), got {mem_fraction}")
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"need 0 <= node_rank < nnodes, got node_rank={node_rank} nnodes={nnodes}")
    if nnodes > 1 and not dist_init_addr:
        raise ValueError("dist_init_addr (host:port of node 0) is required when nnodes > 1")
    cmd = [python, "-m", "sglang.launch_server", "--model-path", str(model_path),
           "--tp-size", str(tp), "--host", host, "--port", str(port)]
    if dp > 1:
        cmd += ["--dp-size", str(dp)]
    if mem_fraction is not None:
        cmd += ["--mem-fraction-static", str(mem_fraction)]
    if dtype:
        cmd += ["--dtype", dtype]
    if seed is not None:
        cmd += ["--random-seed", str(seed)]
    if weight_version is not None:
        cmd += ["--weight-version", str(weight_version)]
    # Flags the RL setup relies on: token ids in / out, memory release around training, reproducibility.
    for flag, on in (("--skip-tokenizer-init", skip_tokenizer_init), ("--enable-memory-saver", memory_saver),
                     ("--enable-deterministic-inference", deterministic), ("--skip-server-warmup", skip_warmup)):
        if on:
            cmd.append(flag)
    if nnodes > 1:
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--dist-init-addr", dist_init_addr]
    return cmd + list(extra_args)


def router_command(
    *,
    host: str = "0.0.0.0",
    port: int = 30100,
    worker_urls: Sequence[str] = (),
    policy: str | None = None,
    python: str = sys.executable,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """argv of `python -m sglang_router.launch_router`; workers may also register later (`register_worker`)."""
    cmd = [python, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port)]
    if worker_urls:
        cmd += ["--worker-urls", *worker_urls]
    if policy:
        cmd += ["--policy", policy]
    return cmd + list(extra_args)


def register_worker(router_url: str, worker_url: str, *, timeout_s: float = 600.0, poll_s: float = 2.0) -> None:
    """Waits for the worker's /health_generate, then `POST {router}/workers {"url": worker}`."""
    import requests

    deadline = time.monotonic() + timeout_s
    last = "not polled"
    while True:
        try:
            r = requests.get(worker_url.rstrip("/") + "/health_generate", timeout=10)
            if r.status_code == 200:
                break
            last = f"HTTP {r.status_code}"
        except requests.RequestException as e:
            last = type(e).__name__
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker {worker_url} not healthy after {timeout_s}s ({last})")
        time.sleep(poll_s)
    r = requests.post(router_url.rstrip("/") + "/workers", json={"url": worker_url}, timeout=30)
    if r.status_code >= 300:
        raise RuntimeError(f"router {router_url} refused worker {worker_url}: HTTP {r.status_code} {r.text[:200]}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_copsd.rollout.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("server", help="print the sglang.launch_server command")
    s.add_argument("--model-path", required=True)
    s.add_argument("--tp", type=int, default=1)
    s.add_argument("--dp", type=int, default=1)
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=30000)
    s.add_argument("--mem-fraction", type=float, default=0.7)
    s.add_argument("--memory-saver", action="store_true")
    s.add_argument("--keep-tokenizer", action="store_true", help="do not pass --skip-tokenizer-init")
    s.add_argument("--seed", type=int)
    s.add_argument("--dtype")
    s.add_argument("--deterministic", action="store_true", help="--enable-deterministic-inference (seeds honoured)")
    s.add_argument("--weight-version", default="0", help="version the server starts at (default 0)")
    s.add_argument("--weight-sync", choices=("disk", "nccl"), default="disk",
                   help="how the trainer will push weights (nccl refuses --dp > 1)")
    s.add_argument("--skip-warmup", action="store_true")
    s.add_argument("--nnodes", type=int, default=1)
    s.add_argument("--node-rank", type=int, default=0)
    s.add_argument("--dist-init-addr")
    s.add_argument("--python", default="python")
    r = sub.add_parser("router", help="print the sglang_router.launch_router command")
    r.add_argument("--host", default="0.0.0.0")
    r.add_argument("--port", type=int, default=30100)
    r.add_argument("--worker", action="append", default=[])
    r.add_argument("--policy")
    r.add_argument("--python", default="python")
    g = sub.add_parser("register", help="wait for a worker, then add it to the router")
    g.add_argument("--router", required=True)
    g.add_argument("--worker", required=True)
    g.add_argument("--timeout", type=float, default=600.0)
    for q in (s, r):
        q.add_argument("--shell", action="store_true", help="print one shell-quoted line")
    return p


def check_server_environment(environ: Mapping[str, str]) -> None:
    """ValueError when the environment a server would inherit changes SGLang's log-prob semantics."""
    if env_flag(environ, LOGPROB_ENV):
        raise ValueError(f"{LOGPROB_ENV}={environ[LOGPROB_ENV]} makes SGLang return unscaled log-probs, but the "
                         f"trainer uses log_softmax(logits / T) (rollout/types.py); unset {LOGPROB_ENV}")


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.what == "register":
        register_worker(args.router, args.worker, timeout_s=args.timeout)
        print(f"registered {args.worker} with {args.router}")
        return 0
    if args.what == "server":
        try:
            check_server_environment(os.environ if environ is None else environ)
            cmd = server_command(
                args.model_path, tp=args.tp, dp=args.dp, host=args.host, port=args.port,
                mem_fraction=args.mem_fraction, memory_saver=args.memory_saver,
                skip_tokenizer_init=not args.keep_tokenizer, seed=args.seed, dtype=args.dtype,
                deterministic=args.deterministic, skip_warmup=args.skip_warmup, nnodes=args.nnodes,
                node_rank=args.node_rank, dist_init_addr=args.dist_init_addr, python=args.python,
                weight_version=args.weight_version, weight_sync=args.weight_sync,
            )
        except ValueError as e:
            print(f"launch: {e}", file=sys.stderr)
            return 2
    else:
        cmd = router_command(host=args.host, port=args.port, worker_urls=args.worker, policy=args.policy,
                             python=args.python)
    print(shlex.join(cmd) if args.shell else "\n".join(cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
