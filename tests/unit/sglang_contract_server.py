"""Contract-test doubles of SGLang 0.5.23's native HTTP server and of sglang_router 0.3.2 -- NOT SGLang.

`ContractServer` serves the shapes written down in docs/sglang_api.md over real HTTP
(`http.server.ThreadingHTTPServer` on 127.0.0.1, port 0), with the project's `EmbeddedEngine` doing the
generation, and behaves like 0.5.23 where it matters to the client:
- strict validation: an unknown `sampling_params` key is answered with HTTP 400 (so are keys SGLang
  knows but this double does not implement, with a different message, and `stop` strings, which need a
  tokenizer the server runs without: `--skip-tokenizer-init`, so responses carry no `text` either);
- `GET /model_info` (`weight_version`, `model_path`) and `GET /server_info` (launch arguments: `tp_size`,
  `dp_size`, `pp_size`, `enable_deterministic_inference`, `rl_on_policy_target`); `/get_weight_version`
  is gone (404); the version starts at `"default"` unless given (`--weight-version`);
- `sampling_seed` is honoured only when launched `deterministic=True` (`--enable-deterministic-inference`);
  otherwise every row samples from fresh randomness;
- `/update_weights_from_disk` resolves a relative `model_path` against the server's own working directory
  (`workdir`, a private temp dir), as a server on another node would;
- the weight-update group: TP rank r of a server joins as group rank `rank_offset + r`. With
  `InProcessBroadcast` every TP rank is a queue fed by the trainer's `broadcast_fn`; with
  `real_group=True` TP rank 0 joins a real torch.distributed group (gloo) in the server's process and
  ranks 1.. each in a helper process (like SGLang's one scheduler process per TP rank); every rank
  receives every tensor and the copies are compared before rank 0's is loaded (the real server would
  load shards; that part is not modelled).
`ContractRouter` proxies `/generate` (round-robin), `/flush_cache` (to every worker), `/workers` and
health, and answers 404 to everything else -- in particular `/pause_generation` and `/update_weights_*`.
No sglang package is imported; the real servers are only exercised on a GPU cluster.

Fault knobs (`server.faults`): `fail_next` (HTTP 500 to the next k `/generate`), `delay_s` (sleep before
answering `/generate`), `never_healthy` (503 on health), `die_on_generate` (the k-th `/generate` from now
drops its connection and the server stops listening), `flush_busy` (400 to the next k `/flush_cache`).
Every request is logged in `.calls` as (path, payload).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import queue
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
import torch

from megatron_copsd.rollout.embedded import EmbeddedEngine
from megatron_copsd.rollout.types import SamplingParams

# sampling_params keys this double implements, and keys SGLang 0.5.23 knows that it does not.
SUPPORTED_SAMPLING_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "n",
                           "skip_special_tokens", "no_stop_trim", "sampling_seed"}
KNOWN_SAMPLING_KEYS = SUPPORTED_SAMPLING_KEYS | {
    "stop", "stop_regex", "min_p", "ignore_eos", "frequency_penalty", "presence_penalty", "repetition_penalty",
    "min_new_tokens", "spaces_between_special_tokens", "json_schema", "regex", "ebnf", "structural_tag",
    "custom_params", "logit_bias", "stream_interval"}
DIE = object()  # handler result: drop the connection and stop, like a crashed process


class BadRequest(ValueError):
    """Answered with HTTP 400 and the message."""


@dataclass
class Faults:
    fail_next: int = 0
    delay_s: float = 0.0
    never_healthy: bool = False
    die_on_generate: int = 0
    flush_busy: int = 0


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class InProcessBroadcast:
    """Test stand-in for the NCCL group: the trainer's `broadcast_fn` puts tensors here and every receiving
    rank of every server takes them in order (both ends run in this process)."""

    def __init__(self) -> None:
        self.channels: list[queue.Queue] = []  # one per receiving rank (server TP rank)

    def new_channel(self) -> queue.Queue:
        self.channels.append(queue.Queue())
        return self.channels[-1]

    def broadcast_fn(self, tensor: torch.Tensor, src: int, group) -> None:
        assert src == 0 and group == "in-process-group"
        for channel in self.channels:
            channel.put(tensor.clone())

    def group_init_fn(self, master_address, master_port, rank, world_size, group_name, backend):
        assert rank == 0
        return "in-process-group"


def _tp_worker_main(conn) -> None:
    """Helper process = one more TP rank of a real-group ContractServer: joins, receives, reports digests."""
    from megatron_copsd.rollout.sglang_weights import init_custom_process_group

    torch.set_num_threads(1)
    pg = None
    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "init":
                pg = init_custom_process_group(*args, timeout_s=60.0)
                conn.send(("ok", None))
            elif cmd == "recv":
                digests = []
                for dtype, shape in args[0]:
                    t = torch.empty(shape, dtype=getattr(torch, dtype))
                    torch.distributed.broadcast(t, src=0, group=pg)
                    digests.append(tensor_digest(t))
                conn.send(("ok", digests))
            elif cmd == "destroy":
                if pg is not None:
                    torch.distributed.destroy_process_group(pg)
                pg = None
                conn.send(("ok", None))
            else:
                return
        except Exception as e:  # noqa: BLE001 - reported to the server, which answers 400
            conn.send(("err", f"{type(e).__name__}: {e}"))


class _HTTPDouble:
    """A JSON HTTP server on 127.0.0.1 whose subclasses answer `get(path)` / `post(path, req)`."""

    def __init__(self) -> None:
        self.faults = Faults()
        self.calls: list[tuple[str, dict]] = []
        self.connections: set[socket.socket] = set()
        self.stopped = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        # stop() joins the handler threads, so none is left running torch at interpreter exit.
        self.httpd.daemon_threads = False
        self.httpd.block_on_close = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.alive = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stops listening and cuts every open (keep-alive) connection, like a crashed process."""
        if self.alive:
            self.alive = False
            self.stopped.set()
            self.httpd.shutdown()
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.httpd.server_close()

    def paths(self) -> list[str]:
        return [p for p, _ in self.calls]


class ContractServer(_HTTPDouble):
    def __init__(self, engine: EmbeddedEngine, broadcast: InProcessBroadcast | None = None, *,
                 real_group: bool = False, tp_size: int = 1, dp_size: int = 1,
                 weight_version: str = "default", deterministic: bool = False,
                 rl_on_policy_target: str | None = None) -> None:
        """Launch arguments as SGLang's: `tp_size` receiving ranks in the weight group, `dp_size` (reported
        only), `weight_version` (--weight-version), `deterministic` (--enable-deterministic-inference)."""
        self.engine = engine
        self.tp_size, self.dp_size = tp_size, dp_size
        self.version, self.deterministic = str(weight_version), deterministic
        self.rl_on_policy_target = rl_on_policy_target
        self.channels = [broadcast.new_channel() for _ in range(tp_size)] if broadcast is not None else []
        self.real_group = real_group
        self.pg = None
        self.group: dict | None = None
        self.group_ranks: list[int] = []  # the weight-group ranks the TP ranks joined as
        self.workdir = tempfile.mkdtemp(prefix="contract-server-cwd-")
        self._lock = threading.Lock()  # one generate / weight load at a time (the model is shared)
        self._running = threading.Event()
        self._running.set()
        self.workers = []
        if real_group:
            ctx = mp.get_context("spawn")
            for _ in range(tp_size - 1):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_tp_worker_main, args=(child,), daemon=True)
                proc.start()
                self.workers.append((proc, parent))
        super().__init__()

    def stop(self) -> None:
        super().stop()
        for proc, conn in self.workers:
            try:
                conn.send(("stop",))
            except OSError:
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self.workers = []

    # ------------------------------------------------------------------ endpoints
    def get(self, path: str):
        f = self.faults
        if path in ("/health", "/health_generate"):
            return 503 if f.never_healthy else 200, {}
        if path in ("/model_info", "/get_model_info"):  # the second spelling: deprecated, still served
            return 200, {"model_path": "contract-test", "tokenizer_path": None, "is_generation": True,
                         "weight_version": self.version}
        if path in ("/server_info", "/get_server_info"):
            return 200, {"tp_size": self.tp_size, "dp_size": self.dp_size, "pp_size": 1,
                         "enable_deterministic_inference": self.deterministic, "skip_tokenizer_init": True,
                         "rl_on_policy_target": self.rl_on_policy_target, "weight_version": self.version,
                         "version": "0.5.23-contract"}
        return 404, {"error": f"unknown path {path}"}

    def post(self, path: str, req: dict):
        f = self.faults
        if path == "/generate":
            if f.die_on_generate:
                f.die_on_generate -= 1
                if f.die_on_generate == 0:
                    return DIE
            if f.delay_s and self.stopped.wait(f.delay_s):
                return DIE
            if f.fail_next:
                f.fail_next -= 1
                return 500, {"error": "injected failure"}
            return 200, self.generate(req)
        if path == "/pause_generation":
            self._running.clear()
        elif path == "/continue_generation":
            self._running.set()
        elif path == "/flush_cache":
            if f.flush_busy:
                f.flush_busy -= 1
                return 400, {"error": "requests pending"}
        elif path == "/update_weights_from_disk":
            self.update_from_disk(req)
        elif path == "/init_weights_update_group":
            self.init_group(req)
        elif path == "/update_weights_from_distributed":
            self.update_from_distributed(req)
        elif path == "/destroy_weights_update_group":
            self.destroy_group()
        else:
            return 404, {"error": f"unknown path {path}"}
        return 200, {"success": True, "message": "ok"}

    def _params(self, sp) -> SamplingParams:
        if not isinstance(sp, dict):
            raise BadRequest(f"sampling_params must be an object, got {type(sp).__name__}")
        unknown = sorted(set(sp) - KNOWN_SAMPLING_KEYS)
        if unknown:
            raise BadRequest(f"SamplingParams got unexpected keyword argument(s) {unknown}")
        if sp.get("stop"):
            raise BadRequest("stop strings need the tokenizer; the server runs with --skip-tokenizer-init")
        unsupported = sorted(set(sp) - SUPPORTED_SAMPLING_KEYS - {"stop"})
        if unsupported:
            raise BadRequest(f"the contract stand-in does not implement {unsupported}")
        seed = sp.get("sampling_seed") if self.deterministic else None
        return SamplingParams(
            max_new_tokens=int(sp.get("max_new_tokens", 128)), temperature=float(sp.get("temperature", 1.0)),
            top_p=float(sp.get("top_p", 1.0)), top_k=int(sp.get("top_k", -1)),
            stop_token_ids=tuple(sp.get("stop_token_ids") or ()), n=int(sp.get("n", 1)),
            # Without --enable-deterministic-inference the seed is ignored: fresh randomness per row.
            seed=int(seed) if seed is not None else None)

    def generate(self, req: dict) -> list[dict]:
        if "text" in req:
            raise BadRequest("text prompts need the tokenizer; the server runs with --skip-tokenizer-init")
        if req.get("stream") or req.get("logprob_start_len", -1) != -1 or req.get("top_logprobs_num"):
            raise BadRequest("stream / logprob_start_len / top_logprobs_num: not implemented by the stand-in")
        ids = req.get("input_ids")
        if not isinstance(ids, list) or not ids:
            raise BadRequest("input_ids must be a non-empty list")
        batch = [ids] if isinstance(ids[0], int) else ids
        sps = req.get("sampling_params") or {}
        sps = sps if isinstance(sps, list) else [sps] * len(batch)
        if len(sps) != len(batch):
            raise BadRequest("sampling_params list length != batch size")
        params = [self._params(sp) for sp in sps]
        rids = req.get("rid") or [None] * len(batch)
        rids = rids if isinstance(rids, list) else [rids]
        if len(rids) != len(batch):
            raise BadRequest("rid list length != batch size")
        self._running.wait(timeout=30)
        out = []
        with self._lock:
            for prompt, p, rid in zip(batch, params, rids):
                t0 = time.perf_counter()
                for s in self.engine.generate([prompt], p)[0]:
                    meta = {
                        "id": rid, "prompt_tokens": len(prompt), "completion_tokens": len(s.response_ids),
                        "cached_tokens": 0, "e2e_latency": time.perf_counter() - t0,
                        "finish_reason": {"type": s.finish_reason,
                                          "matched": s.response_ids[-1] if s.finish_reason == "stop" else None},
                        "weight_version": self.version,
                    }
                    if req.get("return_logprob"):
                        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(s.logprobs, s.response_ids)]
                    out.append({"output_ids": s.response_ids, "meta_info": meta})  # no text: no tokenizer
        return out

    def load_named(self, named: list[tuple[str, torch.Tensor]], version: str | None) -> None:
        """Partial load (a bucket), like SGLang's loader: names and shapes must match the model."""
        state = self.engine.model.state_dict(keep_vars=True)
        with self._lock, torch.no_grad():
            for name, t in named:
                if name not in state or tuple(state[name].shape) != tuple(t.shape):
                    raise BadRequest(f"cannot load {name} {tuple(t.shape)}")
            for name, t in named:
                state[name].data.copy_(t.to(state[name].dtype))
        if version is not None:
            self.version = str(version)

    def update_from_disk(self, req: dict) -> None:
        from safetensors.torch import load_file

        path = Path(self.workdir) / req["model_path"]  # an absolute model_path stays as it is
        files = sorted(path.glob("*.safetensors"))
        if not (path / "config.json").is_file() or not files:
            raise BadRequest(f"no HF checkpoint at {path}")
        self.load_named([kv for f in files for kv in load_file(str(f)).items()], req.get("weight_version"))

    def _ask_workers(self, message) -> list:
        for _, conn in self.workers:
            conn.send(message)
        return [self._answer(conn) for _, conn in self.workers]

    @staticmethod
    def _answer(conn):
        if not conn.poll(90):
            raise BadRequest("a TP worker did not answer")
        status, value = conn.recv()
        if status != "ok":
            raise BadRequest(f"TP worker: {value}")
        return value

    def init_group(self, req: dict) -> None:
        base, world, name = int(req["rank_offset"]), int(req["world_size"]), req["group_name"]
        if base < 1 or base + self.tp_size > world:
            raise BadRequest(f"rank_offset {base} + tp_size {self.tp_size} does not fit world_size {world}")
        self.group = req
        self.group_ranks = [base + r for r in range(self.tp_size)]
        if self.real_group:
            from megatron_copsd.rollout.sglang_weights import init_custom_process_group

            args = (req["master_address"], req["master_port"])
            for r, (_, conn) in enumerate(self.workers, start=1):
                conn.send(("init", *args, base + r, world, name, req["backend"]))
            self.pg = init_custom_process_group(*args, base, world, name, req["backend"], 60.0)
            for _, conn in self.workers:
                self._answer(conn)

    def destroy_group(self) -> None:
        if self.pg is not None:
            torch.distributed.destroy_process_group(self.pg)
            self._ask_workers(("destroy",))
        self.group = self.pg = None

    def update_from_distributed(self, req: dict) -> None:
        if self.group is None or req.get("group_name") != self.group["group_name"]:
            raise BadRequest("no weight update group with that name")
        specs = list(zip(req["dtypes"], req["shapes"]))
        for _, conn in self.workers:
            conn.send(("recv", specs))
        named, digests = [], []
        for name, (dtype, shape) in zip(req["names"], specs):
            copies = [self._receive(k, dtype, shape) for k in range(1 if self.real_group else self.tp_size)]
            for t in copies:
                if str(t.dtype).removeprefix("torch.") != dtype or list(t.shape) != list(shape):
                    raise BadRequest(f"{name}: received {t.dtype} {list(t.shape)}, announced {dtype} {shape}")
            if any(not torch.equal(c, copies[0]) for c in copies[1:]):
                raise BadRequest(f"{name}: TP ranks received different tensors")
            named.append((name, copies[0]))
            digests.append(tensor_digest(copies[0]))
        for _, conn in self.workers:
            if self._answer(conn) != digests:
                raise BadRequest("a TP worker received different tensors than TP rank 0")
        self.load_named(named, req.get("weight_version"))

    def _receive(self, tp_rank: int, dtype: str, shape: list[int]) -> torch.Tensor:
        if self.pg is not None:
            t = torch.empty(shape, dtype=getattr(torch, dtype))
            torch.distributed.broadcast(t, src=0, group=self.pg)
            return t
        if not self.channels:
            raise BadRequest("no weight channel configured")
        return self.channels[tp_rank].get(timeout=10)


class ContractRouter(_HTTPDouble):
    """sglang_router stand-in: proxies /generate, /flush_cache, /workers and health only (module docstring)."""

    def __init__(self, worker_urls=()) -> None:
        self.workers = list(worker_urls)
        self._next = itertools.count()
        super().__init__()

    def get(self, path: str):
        if path in ("/health", "/health_generate"):
            ok = any(_status(u, path) == 200 for u in self.workers)
            return (200 if ok else 503), {}
        if path == "/workers":
            return 200, {"workers": [{"url": u} for u in self.workers]}
        return 404, {"error": f"route {path} not found"}

    def post(self, path: str, req: dict):
        if path == "/workers":
            self.workers.append(req["url"])
            return 200, {"status": "ok"}
        if path == "/generate":
            if not self.workers:
                return 503, {"error": "no workers"}
            r = requests.post(self.workers[next(self._next) % len(self.workers)] + path, json=req, timeout=60)
            return r.status_code, r.json()
        if path == "/flush_cache":
            codes = [requests.post(u + path, json={}, timeout=30).status_code for u in self.workers]
            return max(codes, default=200), {}
        return 404, {"error": f"route {path} not found"}


def _status(url: str, path: str) -> int:
    try:
        return requests.get(url + path, timeout=5).status_code
    except requests.RequestException:
        return 0


def _make_handler(double: _HTTPDouble):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def setup(self):
            super().setup()
            double.connections.add(self.connection)

        def finish(self):
            double.connections.discard(self.connection)
            try:
                super().finish()
            except OSError:
                pass

        def _send(self, status: int, body) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _reply(self, fn, *args) -> None:
            try:
                result = fn(*args)
            except (BadRequest, KeyError, TypeError, ValueError, queue.Empty) as e:
                result = 400, {"success": False, "message": f"{type(e).__name__}: {e}"}
            if result is DIE:
                return self._die()
            self._send(*result)

        def do_GET(self):
            if not double.alive:
                return self._die()
            double.calls.append((self.path, {}))
            self._reply(double.get, self.path)

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            try:
                req = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                return self._send(400, {"error": "body is not JSON"})
            if not double.alive:
                return self._die()
            double.calls.append((self.path, req))
            self._reply(double.post, self.path, req)

        def _die(self) -> None:
            # Drop this connection without an answer, then stop listening: a crashed server.
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if double.alive:
                threading.Thread(target=double.stop, daemon=True).start()

    return Handler
