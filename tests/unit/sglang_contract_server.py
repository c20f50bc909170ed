"""A contract-test double of SGLang's documented native HTTP schema -- this is NOT SGLang.

It serves the request/response shapes written down in docs/sglang_api.md (`/generate` with
`input_ids`, `sampling_params`, `return_logprob`; `meta_info.output_token_logprobs`, `finish_reason`,
`weight_version`; health, pause / continue / flush, disk and distributed weight updates) over real HTTP
(`http.server.ThreadingHTTPServer` on 127.0.0.1, port 0), with the project's `EmbeddedEngine` doing the
actual generation. The SGLang client is tested against it; the real server is only exercised on a GPU
cluster. No sglang package is imported.

Fault knobs (`server.faults`): `fail_next` (answer HTTP 500 to the next k `/generate`), `delay_s` (sleep
before answering `/generate`), `never_healthy` (503 on the health endpoints), `die_on_generate` (the
k-th `/generate` from now drops its connection and the server stops listening), `flush_busy` (answer
400 to the next k `/flush_cache`). Every request is logged in `server.calls` as (path, payload).
"""
from __future__ import annotations

import json
import queue
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from megatron_copsd.rollout.embedded import EmbeddedEngine
from megatron_copsd.rollout.types import SamplingParams


@dataclass
class Faults:
    fail_next: int = 0
    delay_s: float = 0.0
    never_healthy: bool = False
    die_on_generate: int = 0
    flush_busy: int = 0


class InProcessBroadcast:
    """Test stand-in for the NCCL group: the trainer's `broadcast_fn` puts tensors here and the server's
    `/update_weights_from_distributed` takes them in order (both ends run in this process)."""

    def __init__(self) -> None:
        self.channels: list[queue.Queue] = []  # one per server, like one receiving rank per server

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


class ContractServer:
    def __init__(self, engine: EmbeddedEngine, broadcast: InProcessBroadcast | None = None, *,
                 real_group: bool = False) -> None:
        """`broadcast`: in-process stand-in for the weight-update group; `real_group=True` instead joins a
        real torch.distributed group (gloo) like SGLang does -- only one server per process then."""
        self.engine = engine
        self.channel = broadcast.new_channel() if broadcast is not None else None
        self.real_group = real_group
        self.pg = None
        self.faults = Faults()
        self.calls: list[tuple[str, dict]] = []
        self.version = str(engine.weight_version)
        self._lock = threading.Lock()  # one generate / weight load at a time (the model is shared)
        self._running = threading.Event()
        self._running.set()
        self.group: dict | None = None
        self.connections: set[socket.socket] = set()
        self.stopped = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        # stop() joins the handler threads, so none is left running torch at interpreter exit.
        self.httpd.daemon_threads = False
        self.httpd.block_on_close = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        self.alive = True

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

    # ------------------------------------------------------------------ endpoints
    def generate(self, req: dict) -> list[dict]:
        ids = req["input_ids"]
        batch = [ids] if ids and isinstance(ids[0], int) else ids
        sps = req.get("sampling_params") or {}
        sps = sps if isinstance(sps, list) else [sps] * len(batch)
        if len(sps) != len(batch):
            raise ValueError("sampling_params list length != batch size")
        rids = req.get("rid") or [None] * len(batch)
        rids = rids if isinstance(rids, list) else [rids]
        self._running.wait(timeout=30)
        out = []
        with self._lock:
            for prompt, sp, rid in zip(batch, sps, rids):
                n = int(sp.get("n", 1))
                params = SamplingParams(
                    max_new_tokens=int(sp.get("max_new_tokens", 128)),
                    temperature=float(sp.get("temperature", 1.0)), top_p=float(sp.get("top_p", 1.0)),
                    top_k=int(sp.get("top_k", -1)), stop_token_ids=tuple(sp.get("stop_token_ids") or ()),
                    n=n, seed=sp.get("sampling_seed"),
                )
                t0 = time.perf_counter()
                for s in self.engine.generate([prompt], params)[0]:
                    meta = {
                        "id": rid, "prompt_tokens": len(prompt), "completion_tokens": len(s.response_ids),
                        "cached_tokens": 0, "e2e_latency": time.perf_counter() - t0,
                        "finish_reason": {"type": s.finish_reason,
                                          "matched": s.response_ids[-1] if s.finish_reason == "stop" else None},
                        "weight_version": self.version,
                    }
                    if req.get("return_logprob"):
                        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(s.logprobs, s.response_ids)]
                    out.append({"text": "", "output_ids": s.response_ids, "meta_info": meta})
        return out

    def load_named(self, named: list[tuple[str, torch.Tensor]], version: str | None) -> None:
        """Partial load (a bucket), like SGLang's loader: names and shapes must match the model."""
        state = self.engine.model.state_dict(keep_vars=True)
        with self._lock, torch.no_grad():
            for name, t in named:
                if name not in state or tuple(state[name].shape) != tuple(t.shape):
                    raise ValueError(f"cannot load {name} {tuple(t.shape)}")
            for name, t in named:
                state[name].data.copy_(t.to(state[name].dtype))
        if version is not None:
            self.version = str(version)

    def update_from_disk(self, req: dict) -> None:
        from safetensors.torch import load_file

        path = Path(req["model_path"])
        files = sorted(path.glob("*.safetensors"))
        if not (path / "config.json").is_file() or not files:
            raise ValueError(f"no HF checkpoint at {path}")
        named = [kv for f in files for kv in load_file(str(f)).items()]
        self.engine.update_weights(named, int(req.get("weight_version") or 0))
        self.version = str(req.get("weight_version", self.version))

    def init_group(self, req: dict) -> None:
        self.group = req
        if self.real_group:
            from megatron_copsd.rollout.sglang_weights import init_custom_process_group

            self.pg = init_custom_process_group(req["master_address"], req["master_port"], req["rank_offset"],
                                                req["world_size"], req["group_name"], req["backend"], 60.0)

    def destroy_group(self) -> None:
        if self.pg is not None:
            torch.distributed.destroy_process_group(self.pg)
        self.group = self.pg = None

    def _receive(self, dtype: str, shape: list[int]) -> torch.Tensor:
        if self.pg is not None:
            t = torch.empty(shape, dtype=getattr(torch, dtype))
            torch.distributed.broadcast(t, src=0, group=self.pg)
            return t
        if self.channel is None:
            raise ValueError("no weight channel configured")
        return self.channel.get(timeout=10)

    def update_from_distributed(self, req: dict) -> None:
        if self.group is None or req.get("group_name") != self.group["group_name"]:
            raise ValueError("no weight update group with that name")
        named = []
        for name, dtype, shape in zip(req["names"], req["dtypes"], req["shapes"]):
            t = self._receive(dtype, shape)
            if str(t.dtype).removeprefix("torch.") != dtype or list(t.shape) != list(shape):
                raise ValueError(f"{name}: received {t.dtype} {list(t.shape)}, announced {dtype} {shape}")
            named.append((name, t))
        self.load_named(named, req.get("weight_version"))


def _make_handler(server: ContractServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def setup(self):
            super().setup()
            server.connections.add(self.connection)

        def finish(self):
            server.connections.discard(self.connection)
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

        def do_GET(self):
            if not server.alive:
                return self._die()
            server.calls.append((self.path, {}))
            f = server.faults
            if self.path in ("/health", "/health_generate"):
                self._send(503 if f.never_healthy else 200, {})
            elif self.path == "/get_weight_version":
                self._send(200, {"weight_version": server.version})
            elif self.path == "/get_model_info":
                self._send(200, {"model_path": "contract-test", "weight_version": server.version})
            else:
                self._send(404, {"error": f"unknown path {self.path}"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            try:
                req = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                return self._send(400, {"error": "body is not JSON"})
            if not server.alive:
                return self._die()
            server.calls.append((self.path, req))
            f = server.faults
            try:
                if self.path == "/generate":
                    if f.die_on_generate:
                        f.die_on_generate -= 1
                        if f.die_on_generate == 0:
                            return self._die()
                    if f.delay_s and server.stopped.wait(f.delay_s):
                        return self._die()
                    if f.fail_next:
                        f.fail_next -= 1
                        return self._send(500, {"error": "injected failure"})
                    return self._send(200, server.generate(req))
                if self.path == "/pause_generation":
                    server._running.clear()
                elif self.path == "/continue_generation":
                    server._running.set()
                elif self.path == "/flush_cache":
                    if f.flush_busy:
                        f.flush_busy -= 1
                        return self._send(400, {"error": "requests pending"})
                elif self.path == "/update_weights_from_disk":
                    server.update_from_disk(req)
                elif self.path == "/init_weights_update_group":
                    server.init_group(req)
                elif self.path == "/update_weights_from_distributed":
                    server.update_from_distributed(req)
                elif self.path == "/destroy_weights_update_group":
                    server.destroy_group()
                else:
                    return self._send(404, {"error": f"unknown path {self.path}"})
                return self._send(200, {"success": True, "message": "ok"})
            except (ValueError, KeyError, queue.Empty) as e:
                return self._send(400, {"success": False, "message": f"{type(e).__name__}: {e}"})

        def _die(self) -> None:
            # Drop this connection without an answer, then stop listening: a crashed server.
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if server.alive:
                threading.Thread(target=server.stop, daemon=True).start()

    return Handler
