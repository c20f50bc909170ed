"""Rollout engine that drives SGLang servers (or an `sglang_router`) over SGLang's native HTTP API.

No SGLang package is imported: everything goes through `requests` (schema: docs/sglang_api.md, SGLang
0.5.23, whose request validation is strict: only documented `sampling_params` keys are sent).

Endpoints: `server_urls` are the SGLang servers themselves; `router_url` an optional `sglang_router` for
generation. The router proxies `/generate`, `/workers`, `/flush_cache` and health but not
`/pause_generation` or `/update_weights_*`, so weight updates always go to every server directly, and an
engine given only a router generates but refuses `update_weights` with a message saying why. (Asking the
router's `GET /workers` for the servers is not done: its answer is not part of the documented contract.)

Start-up: after the health check every server is asked `GET /model_info` and `GET /server_info`
(`sglang_checks.py`): log-prob semantics (no `--rl-on-policy-target`, no
`SGLANG_RETURN_ORIGINAL_LOGPROB=1`), deterministic inference when seeds are sent, TP (the NCCL weight
group's size), no DP/PP replicas for NCCL sync, and the weight version the servers start at.

Generation: the batch is expanded to rows (prompt i, sample j) in prompt-major order -- `n > 1` is sent
as repeated prompts, not SGLang's `n` parameter, so every row is one entry of a batched `input_ids`
request with its own output and the radix cache shares the prompt prefix anyway. Rows are cut into
requests of at most `max_rows_per_request` and spread round-robin over the generation endpoints (the
router alone, or every server), at most `max_concurrency` in flight. Each request is retried up to
`max_retries` times with exponential back-off, moving to the next endpoint each time (failover); an
endpoint that refused a connection is skipped for `dead_cooldown_s`. HTTP 4xx other than 408/429 is
the caller's fault and fails at once. A response that is malformed, short, or contains an aborted row is
retried as a whole. If any request fails for good, `generate` raises `SGLangError` naming the endpoint,
the request and the status -- it never returns a partial batch.

Seeds: `send_seed=True` adds `sampling_seed` (derived per row from (seed, prompt, sample)) to every row.
SGLang honours it only when the server runs with `--enable-deterministic-inference` (and silently ignores
it otherwise), so `send_seed=True` is refused at start-up for servers that do not report that flag.

Weight versions: every row's `meta_info.weight_version` is kept in `Sample.meta["server_weight_version"]`
and must equal the version of the last weight update (before the first one: what the servers reported at
start-up); a row from other weights fails the batch (SGLangError).

Log-probs: `output_token_logprobs` of each row, which must follow the convention in `types.py`
(temperature-scaled, before top-k/top-p; check the SGLang version's behaviour / env settings).

Weight sync lives in `sglang_weights.py` (disk export or NCCL broadcast, with pause / flush / continue).
"""
from __future__ import annotations

import itertools
import threading
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, Iterable, Sequence

import requests
import torch

from megatron_copsd.rollout.embedded import derive_seed
from megatron_copsd.rollout.types import Sample, SamplingParams


class SGLangError(RuntimeError):
    """A request to an SGLang server failed for good (after retries) or a server is unusable."""


class _Retryable(Exception):
    """A failed attempt worth retrying elsewhere."""


def _clean(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def parse_generate_item(item: Any, prompt_index: int, sample_index: int, max_new_tokens: int) -> Sample:
    """One `/generate` result object -> `Sample`. Raises `_Retryable` for aborted rows and ValueError
    for anything that does not follow the schema. Extra fields are ignored."""
    if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
        raise ValueError(f"result has no meta_info object: {str(item)[:200]}")
    meta = item["meta_info"]
    fr = meta.get("finish_reason")
    kind = fr.get("type") if isinstance(fr, dict) else fr
    if kind == "abort":
        raise _Retryable(f"row aborted by the server: {fr}")
    if kind not in ("stop", "length"):
        raise ValueError(f"unexpected finish_reason {fr!r}")
    entries = meta.get("output_token_logprobs")
    if not isinstance(entries, list):
        raise ValueError("meta_info.output_token_logprobs missing (was return_logprob sent?)")
    try:
        logprobs = [float(e[0]) for e in entries]
        ids = [int(e[1]) for e in entries]
    except (TypeError, ValueError, IndexError) as e:
        raise ValueError(f"bad output_token_logprobs entry: {e}; first entries {entries[:3]}") from None
    output_ids = item.get("output_ids")
    if output_ids is not None and [int(t) for t in output_ids] != ids:
        raise ValueError(f"output_ids ({len(output_ids)}) disagree with output_token_logprobs ({len(ids)})")
    if len(ids) > max_new_tokens:
        raise ValueError(f"{len(ids)} output tokens exceed max_new_tokens={max_new_tokens}")
    version = meta.get("weight_version")
    sample = Sample(prompt_index=prompt_index, response_ids=ids, logprobs=logprobs, finish_reason=kind)
    sample.meta = {
        "sample_index": sample_index,
        "server_weight_version": version,
        **{k: meta[k] for k in ("id", "cached_tokens", "e2e_latency", "prompt_tokens") if k in meta},
    }
    return sample


class SGLangEngine:
    """`RolloutEngine` over SGLang servers; see the module docstring."""

    def __init__(
        self,
        server_urls: str | Sequence[str] | None = None,
        *,
        router_url: str | None = None,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        health_timeout_s: float = 600.0,
        wait_healthy: bool = True,
        max_rows_per_request: int = 64,
        max_concurrency: int | None = None,
        dead_cooldown_s: float = 30.0,
        eos_token_ids: Sequence[int] = (),
        send_seed: bool = False,
        weight_sync: str = "disk",
        weight_version: int = 0,
        server_tp: int | None = None,
        check_servers: bool = True,
        environ: dict | None = None,
        **weight_sync_kwargs,
    ) -> None:
        """`server_urls`: the SGLang servers (weight updates always go to each of them; generation too
        unless `router_url` is given). `router_url`: generation goes to the router; alone, weight updates
        are refused (module docstring). `weight_sync`: "disk" or "nccl"; extra keyword arguments go to the
        weight syncer (`sglang_weights.DiskWeightSync` / `DistributedWeightSync`), e.g. `shared_dir`,
        `save_fn`, `master_address`, `socket_ifname`, `backend`, `broadcast_fn`. `server_tp`: the TP size
        the servers must report (rollout.sglang_tp). `check_servers`: run the start-up checks (needs
        `wait_healthy`); `environ`: the environment they inspect (default `os.environ`)."""
        if isinstance(server_urls, str):
            server_urls = [server_urls]
        servers = [_clean(u) for u in (server_urls or [])]
        if not servers and not router_url:
            raise ValueError("server_urls / router_url: give at least one SGLang endpoint")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if max_rows_per_request < 1:
            raise ValueError(f"max_rows_per_request must be >= 1, got {max_rows_per_request}")
        self.router_url = _clean(router_url) if router_url else None
        self.server_urls = servers
        self.generate_urls = [self.router_url] if router_url else list(servers)
        self.timeout_s, self.connect_timeout_s = float(timeout_s), float(connect_timeout_s)
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.max_rows_per_request = max_rows_per_request
        self.max_concurrency = max_concurrency or 4 * len(self.generate_urls)
        self.dead_cooldown_s = dead_cooldown_s
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.send_seed = send_seed
        self._weight_version = int(weight_version)
        self._dead_until: dict[str, float] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._call_ids = itertools.count()
        self._expected_version: str | None = None  # what every row's meta_info.weight_version must say
        self.server_facts: list = []
        from megatron_copsd.rollout.sglang_weights import WEIGHT_SYNC_KINDS, make_weight_sync

        if weight_sync not in WEIGHT_SYNC_KINDS:
            raise ValueError(f"weight_sync must be one of {list(WEIGHT_SYNC_KINDS)}, got {weight_sync!r}")
        if wait_healthy:
            self.wait_until_healthy(health_timeout_s)
            if check_servers and servers:
                self._check_servers(environ, server_tp, weight_sync)
        # A router alone cannot take weight updates: update_weights() says so instead.
        self.weight_sync = make_weight_sync(weight_sync, self, **weight_sync_kwargs) if servers else None

    def _check_servers(self, environ, server_tp, weight_sync) -> None:
        import os

        from megatron_copsd.rollout.sglang_checks import check_servers, read_server_facts

        self.server_facts = [read_server_facts(self, u) for u in self.server_urls]
        check_servers(self.server_facts, environ=os.environ if environ is None else environ,
                      send_seed=self.send_seed, server_tp=server_tp, weight_sync=weight_sync,
                      expected_version=str(self._weight_version))
        versions = {f.weight_version for f in self.server_facts}
        if len(versions) == 1:
            self._expected_version = versions.pop()

    def router_only_message(self, what: str) -> str:
        return (f"{what} need every SGLang server's own URL, but only a router was given ({self.router_url}): "
                "sglang_router proxies /generate, /workers, /flush_cache and health, not /pause_generation or "
                "/update_weights_*. List the servers in rollout.sglang_urls (the router may stay in "
                "rollout.sglang_router_url for generation)")

    # ------------------------------------------------------------------ HTTP plumbing
    def _session(self) -> requests.Session:
        # requests.Session is not documented as thread-safe: one per thread.
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def request(self, method: str, url: str, path: str, payload: dict | None = None,
                timeout_s: float | None = None) -> requests.Response:
        """One HTTP call, no retries; connection errors / timeouts propagate as requests exceptions."""
        timeout = (self.connect_timeout_s, self.timeout_s if timeout_s is None else timeout_s)
        return self._session().request(method, url + path, json=payload, timeout=timeout)

    def post_ok(self, url: str, path: str, payload: dict | None = None, *,
                timeout_s: float | None = None) -> dict:
        """POST that must answer 200 (and `success: true` when the body says so); else SGLangError."""
        try:
            r = self.request("POST", url, path, payload, timeout_s)
        except requests.RequestException as e:
            raise SGLangError(f"{url}{path}: {type(e).__name__}: {e}") from e
        body = _json_or_text(r)
        if r.status_code != 200:
            raise SGLangError(f"{url}{path}: HTTP {r.status_code}: {str(body)[:300]}")
        if isinstance(body, dict) and body.get("success") is False:
            raise SGLangError(f"{url}{path}: success=false: {body.get('message', body)}")
        return body if isinstance(body, dict) else {"body": body}

    # ------------------------------------------------------------------ health
    def wait_until_healthy(self, timeout_s: float, poll_s: float = 0.5) -> None:
        """Polls GET /health_generate on every endpoint until all answer 200; SGLangError at the bound."""
        deadline = time.monotonic() + timeout_s
        pending = dict.fromkeys(dict.fromkeys(self.generate_urls + self.server_urls), "not polled yet")
        while True:
            for url in list(pending):
                left = max(0.1, deadline - time.monotonic())
                try:
                    r = self.request("GET", url, "/health_generate", timeout_s=min(left, 10.0))
                    if r.status_code == 200:
                        del pending[url]
                    else:
                        pending[url] = f"HTTP {r.status_code}"
                except requests.RequestException as e:
                    pending[url] = type(e).__name__
            if not pending:
                return
            if time.monotonic() >= deadline:
                status = ", ".join(f"{u} ({s})" for u, s in pending.items())
                raise SGLangError(f"SGLang endpoints not healthy after {timeout_s:.1f}s: {status}")
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))

    def health(self) -> bool:
        """True when every endpoint answers GET /health with 200 (short timeout, no retries)."""
        for url in dict.fromkeys(self.generate_urls + self.server_urls):
            try:
                if self.request("GET", url, "/health", timeout_s=5.0).status_code != 200:
                    return False
            except requests.RequestException:
                return False
        return True

    # ------------------------------------------------------------------ generation
    @property
    def weight_version(self) -> int:
        return self._weight_version

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Sample]]:
        """Per prompt, `params.n` complete samples, or SGLangError (never a partial batch)."""
        prompts = [[int(t) for t in p] for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        if not rows:
            return []
        call = f"copsd-{next(self._call_ids)}-{uuid.uuid4().hex[:8]}"
        chunks = [rows[k : k + self.max_rows_per_request] for k in range(0, len(rows), self.max_rows_per_request)]
        cancel = threading.Event()
        pool = ThreadPoolExecutor(max_workers=min(len(chunks), self.max_concurrency))
        try:
            futures = [
                pool.submit(self._run_request, f"{call}-r{k}", chunk, prompts, params, k, cancel)
                for k, chunk in enumerate(chunks)
            ]
            wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                if f.done() and f.exception() is not None:
                    cancel.set()  # stop the other requests' retry loops early
                    raise f.exception()
            results = [f.result() for f in futures]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        out: list[list[Sample | None]] = [[None] * params.n for _ in prompts]
        for chunk, samples in zip(chunks, results):
            for (i, j), s in zip(chunk, samples):
                s.weight_version = self._weight_version
                out[i][j] = s
        self._check_row_versions([s for per in out for s in per])
        assert all(s is not None for per in out for s in per)
        return out  # type: ignore[return-value]

    def _check_row_versions(self, samples: list[Sample]) -> None:
        if self._expected_version is None:
            return
        wrong = sorted({str(s.meta.get("server_weight_version")) for s in samples} - {self._expected_version})
        if wrong:
            raise SGLangError(f"rollout rows came from weight version(s) {wrong}, expected {self._expected_version!r} "
                              "(a server missed a weight update, or was restarted)")

    def _payload(self, rid: str, rows, prompts, params: SamplingParams) -> dict:
        sp: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "stop_token_ids": sorted(set(params.stop_token_ids) | set(self.eos_token_ids)),
            "skip_special_tokens": False,
            "no_stop_trim": True,
        }
        payload: dict[str, Any] = {
            "input_ids": [prompts[i] for i, _ in rows],
            "return_logprob": True,
            "logprob_start_len": -1,
            "rid": [f"{rid}-{n}" for n in range(len(rows))],
        }
        if self.send_seed and params.seed is not None:
            # One sampling_params object per row so each row gets its own derived seed.
            payload["sampling_params"] = [
                {**sp, "sampling_seed": derive_seed(params.seed, i, j) % (2**31)} for i, j in rows
            ]
        else:
            payload["sampling_params"] = sp
        return payload

    def _pick_url(self, k: int) -> str:
        urls = self.generate_urls
        now = time.monotonic()
        for off in range(len(urls)):
            url = urls[(k + off) % len(urls)]
            if self._dead_until.get(url, 0.0) <= now:
                return url
        return urls[k % len(urls)]  # all marked dead: try anyway, the cooldown is only a hint

    def _run_request(self, label, rows, prompts, params, k, cancel: threading.Event) -> list[Sample]:
        errors: list[str] = []
        for attempt in range(self.max_retries + 1):
            if cancel.is_set():
                raise SGLangError(f"request {label}: cancelled because another request of the batch failed")
            url = self._pick_url(k + attempt)
            payload = self._payload(f"{label}-a{attempt}", rows, prompts, params)
            try:
                r = self.request("POST", url, "/generate", payload)
                if r.status_code != 200:
                    body = str(_json_or_text(r))[:300]
                    if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                        raise SGLangError(
                            f"/generate request {label} ({len(rows)} rows) rejected by {url}: "
                            f"HTTP {r.status_code}: {body}"
                        )
                    raise _Retryable(f"HTTP {r.status_code}: {body}")
                return self._parse(r, rows, params)
            except requests.ConnectionError as e:
                with self._lock:
                    self._dead_until[url] = time.monotonic() + self.dead_cooldown_s
                errors.append(f"{url}: connection error ({type(e).__name__}: {str(e)[:160]})")
            except requests.Timeout:
                errors.append(f"{url}: no answer within timeout_s={self.timeout_s}")
            except (_Retryable, ValueError) as e:
                errors.append(f"{url}: {e}")
            if attempt < self.max_retries:
                cancel.wait(min(self.max_backoff_s, self.backoff_s * 2**attempt))
        raise SGLangError(
            f"/generate request {label} ({len(rows)} rows, prompts {sorted({i for i, _ in rows})[:8]}...) "
            f"failed after {self.max_retries + 1} attempts; last: {errors[-1]}; all: {errors}"
        )

    def _parse(self, r: requests.Response, rows, params: SamplingParams) -> list[Sample]:
        try:
            body = r.json()
        except ValueError:
            raise ValueError(f"response is not JSON: {r.text[:200]!r}") from None
        items = body if isinstance(body, list) else [body]
        if len(items) != len(rows):
            raise ValueError(f"response has {len(items)} results for {len(rows)} rows")
        return [parse_generate_item(it, i, j, params.max_new_tokens) for it, (i, j) in zip(items, rows)]

    # ------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Pushes HF-named weights to every server (see `sglang_weights.py`); later samples get `version`."""
        if self.weight_sync is None:
            raise SGLangError(self.router_only_message("weight updates"))
        self.weight_sync.update(named_tensors, int(version))
        self._weight_version = int(version)
        self._expected_version = str(int(version))

    def close(self) -> None:
        """Releases the weight-sync resources (e.g. destroys the NCCL group)."""
        if self.weight_sync is not None:
            self.weight_sync.close()


def engine_from_config(cfg, *, eos_token_ids: Sequence[int], hf_config, work_dir, environ=None) -> SGLangEngine:
    """The trainer's SGLang engine from the run config (`cfg.rollout`, `cfg.parallel.backend`).

    disk: checkpoints under `work_dir/weight_sync` (absolute; a shared filesystem). nccl: the weight group
    uses the trainer's backend (NCCL on GPU, gloo on CPU) on rank 0's device; each server's group size is
    `rollout.sglang_tp`, checked against what the server reports; the servers dial
    `rollout.weight_sync_master_address`, else the address of `COPSD_SOCKET_IFNAME`."""
    import os
    from pathlib import Path

    environ = os.environ if environ is None else environ
    r = cfg.rollout
    if r.weight_sync == "nccl":
        backend = cfg.parallel.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu"
        sync = dict(master_address=r.weight_sync_master_address, socket_ifname=environ.get("COPSD_SOCKET_IFNAME"),
                    gpus_per_server=r.sglang_tp, backend=backend, device=device,
                    bucket_bytes=int(r.weight_sync_bucket_mb) << 20)
    else:
        sync = dict(shared_dir=str(Path(work_dir).resolve() / "weight_sync"), hf_config=hf_config)
    return SGLangEngine(r.sglang_urls, router_url=r.sglang_router_url, eos_token_ids=eos_token_ids,
                        send_seed=r.sglang_deterministic, server_tp=r.sglang_tp, environ=environ,
                        weight_sync=r.weight_sync, **sync)


def _json_or_text(r: requests.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text
