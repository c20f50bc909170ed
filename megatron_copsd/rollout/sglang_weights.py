"""Pushing trainer weights into SGLang servers: via a shared disk or a broadcast process group.

Both run, on every server, `POST /pause_generation` -> load the weights -> `POST /flush_cache` (retried
while the server answers 400, i.e. requests are still pending) -> `POST /continue_generation` (always,
also after a failure), then check that `GET /model_info` reports the new `weight_version` (SGLang 0.5.23
serves the version there; `/get_weight_version` is gone). Every call goes to each server's own URL: an
`sglang_router` proxies neither `/pause_generation` nor `/update_weights_*`, so an engine that only knows
a router cannot sync weights and says so.

- `DiskWeightSync` (`weight_sync="disk"`): writes an HF checkpoint (safetensors + config.json) to
  `shared_dir/weights_v{version}` through a temp dir + rename, then `POST /update_weights_from_disk
  {"model_path", "weight_version"}` on every server in parallel. `model_path` is absolute (each server
  would resolve a relative one against its own working directory); `shared_dir` must be on a filesystem
  every server reads. `save_fn(state_dict, out_dir)` writes the checkpoint; the trainer passes
  e.g. `lambda sd, d: save_hf_checkpoint(sd, hf_config, d, tokenizer_dir=...)`; the default writes one
  `model.safetensors` + `config.json` from `hf_config`. Keeps the newest `keep_last` exports.
- `DistributedWeightSync` (`weight_sync="nccl"`): trainer = rank 0 of a group with every server GPU
  (`world_size = 1 + sum of gpus_per_server`, server k's `rank_offset = 1 + GPUs of servers before it`;
  SGLang gives its TP rank r the group rank `rank_offset + r`). `gpus_per_server` is each server's
  `tp_size` from `/server_info` (`sglang_checks.py`; servers with DP or PP replicas are refused there);
  an explicit value must agree with it. The group is created with `/init_weights_update_group` while the
  trainer joins through `group_init_fn`; the servers dial `master_address` (`sglang_checks.
  resolve_master_address`: explicit, else the IPv4 of `socket_ifname`, never loopback for remote servers). Weights go in buckets of
  ~`bucket_bytes` (tensor order preserved): the bucket's `/update_weights_from_distributed {"names",
  "dtypes", "shapes"}` is posted to every server, the trainer broadcasts the tensors in list order from
  rank 0 (`broadcast_fn`), and the next bucket starts only after every server answered (the send buffers
  stay alive until then). The group is destroyed after each update (`/destroy_weights_update_group`)
  unless `keep_group=True`, then at `close()`.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch


WEIGHT_SYNC_KINDS = ("disk", "nccl")


def make_weight_sync(kind: str, engine, **kwargs):
    if kind == "disk":
        return DiskWeightSync(engine, **kwargs)
    if kind == "nccl":
        return DistributedWeightSync(engine, **kwargs)
    raise ValueError(f"weight_sync must be one of {list(WEIGHT_SYNC_KINDS)}, got {kind!r}")


def bucketize(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
              ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most `bucket_bytes` (a larger tensor forms its own bucket); lazy."""
    bucket, size = [], 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def default_save_fn(hf_config) -> Callable[[dict, Path], None]:
    """A `save_fn` writing `model.safetensors` + `config.json` (from a transformers config or a dict)."""
    from safetensors.torch import save_file

    def save(state: dict[str, torch.Tensor], out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=False)
        # safetensors refuses shared storage (tied weights): write independent contiguous copies.
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
                  str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))

    return save


@contextmanager
def paused(engine, *, mode: str = "abort", flush_attempts: int = 60, flush_wait_s: float = 0.5):
    """Pause every server, run the body, flush every cache; continue generation whatever happened."""
    urls = engine.server_urls
    if not urls:  # a router alone: it does not proxy /pause_generation
        from megatron_copsd.rollout.sglang_client import SGLangError

        raise SGLangError(engine.router_only_message("pause / flush / weight updates"))
    paused_urls = []
    try:
        for url in urls:
            engine.post_ok(url, "/pause_generation", {"mode": mode})
            paused_urls.append(url)
        yield
        for url in urls:
            _flush_cache(engine, url, flush_attempts, flush_wait_s)
    finally:
        errors = []
        for url in paused_urls:
            try:
                engine.post_ok(url, "/continue_generation", {})
            except Exception as e:  # report, but do not hide the body's own exception
                errors.append(str(e))
        if errors:
            warnings.warn(f"continue_generation failed: {errors}", stacklevel=3)


def _flush_cache(engine, url: str, attempts: int, wait_s: float) -> None:
    import time

    from megatron_copsd.rollout.sglang_client import SGLangError

    last = None
    for _ in range(attempts):
        r = engine.request("POST", url, "/flush_cache", {})
        if r.status_code == 200:
            return
        if r.status_code != 400:  # 400 = requests still pending: wait and retry
            raise SGLangError(f"{url}/flush_cache: HTTP {r.status_code}: {r.text[:200]}")
        last = r.text[:200]
        time.sleep(wait_s)
    raise SGLangError(f"{url}/flush_cache: still HTTP 400 after {attempts} attempts: {last}")


def check_weight_version(engine, version: int) -> None:
    """Every server reports `version` as `weight_version` in GET /model_info; SGLangError otherwise."""
    from megatron_copsd.rollout.sglang_checks import read_weight_version
    from megatron_copsd.rollout.sglang_client import SGLangError

    for url in engine.server_urls:
        got = read_weight_version(engine, url)
        if got != str(version):
            raise SGLangError(f"{url}/model_info: weight_version is {got!r} after the update, expected {str(version)!r}")


def _parallel(fn, urls):
    with ThreadPoolExecutor(max_workers=max(1, len(urls))) as pool:
        return [f.result() for f in [pool.submit(fn, u) for u in urls]]


class DiskWeightSync:
    """HF checkpoint on a shared filesystem + `/update_weights_from_disk` (module docstring)."""

    def __init__(self, engine, *, shared_dir: str | Path | None = None, save_fn=None, hf_config=None,
                 keep_last: int = 2, pause_mode: str = "abort", load_timeout_s: float = 1800.0) -> None:
        self.engine = engine
        # Absolute: the servers run elsewhere, with their own working directories.
        self.shared_dir = Path(shared_dir).resolve() if shared_dir is not None else None
        if save_fn is None and hf_config is not None:
            save_fn = default_save_fn(hf_config)
        self.save_fn, self.keep_last = save_fn, keep_last
        self.pause_mode, self.load_timeout_s = pause_mode, load_timeout_s

    def update(self, named_tensors, version: int) -> None:
        if self.shared_dir is None:
            raise ValueError("weight_sync='disk' needs shared_dir (a path every server can read)")
        if self.save_fn is None:
            raise ValueError("weight_sync='disk' needs save_fn or hf_config to write the checkpoint")
        state = {name: t.detach().to("cpu") for name, t in named_tensors}
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        final = self.shared_dir / f"weights_v{version}"
        tmp = self.shared_dir / f".tmp_{final.name}_{uuid.uuid4().hex[:8]}"
        try:
            self.save_fn(state, tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        payload = {"model_path": str(final), "weight_version": str(version), "flush_cache": False}
        with paused(self.engine, mode=self.pause_mode):
            _parallel(lambda u: self.engine.post_ok(u, "/update_weights_from_disk", payload,
                                                    timeout_s=self.load_timeout_s), self.engine.server_urls)
        check_weight_version(self.engine, version)
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        exports = sorted((p for p in self.shared_dir.glob("weights_v*") if p.is_dir() and p != keep),
                         key=lambda p: p.stat().st_mtime)
        for old in exports[: max(0, len(exports) - (self.keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        pass


def init_custom_process_group(master_address: str, master_port: int, rank: int, world_size: int,
                              group_name: str, backend: str = "nccl", timeout_s: float = 600.0):
    """A process group outside the default one (the trainer's side of SGLang's weight-update group).

    Same recipe as SGLang's server side: tcp rendezvous (rank 0 hosts the store), a store prefixed by
    the group name, and torch's own group constructor, so both ends agree on the store keys.
    """
    from torch.distributed import distributed_c10d as c10d
    from torch.distributed.rendezvous import rendezvous

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                              timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], backend, store, group_name=group_name,
                                           timeout=timeout)
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _default_broadcast(tensor: torch.Tensor, src: int, group) -> None:
    torch.distributed.broadcast(tensor, src=src, group=group)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class DistributedWeightSync:
    """Broadcast group + `/update_weights_from_distributed` in buckets (module docstring)."""

    def __init__(self, engine, *, master_address: str | None = None, socket_ifname: str | None = None,
                 master_port: int | None = None, gpus_per_server: int | list[int] | None = None,
                 group_name: str = "copsd_weight_sync", backend: str = "nccl", bucket_bytes: int = 512 << 20,
                 device: str | None = None, group_init_fn=None, broadcast_fn=None, group_destroy_fn=None,
                 keep_group: bool = False, pause_mode: str = "abort", init_timeout_s: float = 600.0) -> None:
        from megatron_copsd.rollout.sglang_checks import resolve_master_address

        self.engine = engine
        urls = engine.server_urls
        n = len(urls)
        reported = [f.tp_size for f in getattr(engine, "server_facts", None) or []]
        if gpus_per_server is None:
            if len(reported) != n or None in reported:
                raise ValueError("weight_sync='nccl': the servers' TP sizes are unknown (no tp_size in /server_info); "
                                 "give gpus_per_server (rollout.sglang_tp)")
            gpus_per_server = reported
        gpus = [gpus_per_server] * n if isinstance(gpus_per_server, int) else list(gpus_per_server)
        if len(gpus) != n or min(gpus) < 1:
            raise ValueError(f"gpus_per_server: need one positive count per server ({n}), got {gpus_per_server}")
        for url, want, got in zip(urls, gpus, reported):
            if got is not None and got != want:
                raise ValueError(f"gpus_per_server={want} for {url}, but it reports tp_size={got} in /server_info")
        self.rank_offsets = [1 + sum(gpus[:k]) for k in range(n)]
        self.world_size = 1 + sum(gpus)
        self.master_address = resolve_master_address(master_address, socket_ifname, urls)
        self.master_port = master_port
        self.group_name, self.backend, self.bucket_bytes = group_name, backend, int(bucket_bytes)
        self.device = device or ("cuda" if backend == "nccl" else "cpu")
        self.group_init_fn = group_init_fn or init_custom_process_group
        self.broadcast_fn = broadcast_fn or _default_broadcast
        self.group_destroy_fn = group_destroy_fn or torch.distributed.destroy_process_group
        self.keep_group, self.pause_mode, self.init_timeout_s = keep_group, pause_mode, init_timeout_s
        self.group = None

    def _init_group(self) -> None:
        port = self.master_port or _free_port()
        urls = self.engine.server_urls
        with ThreadPoolExecutor(max_workers=len(urls)) as pool:
            futures = [
                pool.submit(self.engine.post_ok, url, "/init_weights_update_group", {
                    "master_address": self.master_address, "master_port": port,
                    "rank_offset": offset, "world_size": self.world_size,
                    "group_name": self.group_name, "backend": self.backend,
                }, timeout_s=self.init_timeout_s)
                for url, offset in zip(urls, self.rank_offsets)
            ]
            # The servers block in their side of the rendezvous until rank 0 (us) joins.
            self.group = self.group_init_fn(self.master_address, port, 0, self.world_size,
                                            self.group_name, self.backend)
            for f in futures:
                f.result()

    def _destroy_group(self) -> None:
        if self.group is None:
            return
        try:
            _parallel(lambda u: self.engine.post_ok(u, "/destroy_weights_update_group",
                                                    {"group_name": self.group_name}), self.engine.server_urls)
        finally:
            self.group_destroy_fn(self.group)
            self.group = None

    def update(self, named_tensors, version: int) -> None:
        urls = self.engine.server_urls
        with paused(self.engine, mode=self.pause_mode):
            if self.group is None:
                self._init_group()
            try:
                for bucket in bucketize(named_tensors, self.bucket_bytes):
                    tensors = [t.detach().to(self.device).contiguous() for _, t in bucket]
                    payload = {
                        "names": [name for name, _ in bucket],
                        "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors],
                        "shapes": [list(t.shape) for t in tensors],
                        "group_name": self.group_name, "flush_cache": False,
                        "weight_version": str(version),
                    }
                    with ThreadPoolExecutor(max_workers=len(urls)) as pool:
                        futures = [pool.submit(self.engine.post_ok, u, "/update_weights_from_distributed",
                                               payload, timeout_s=self.init_timeout_s) for u in urls]
                        for t in tensors:
                            self.broadcast_fn(t, 0, self.group)
                        for f in futures:
                            f.result()  # the buffers in `tensors` stay alive until every server answered
            finally:
                if not self.keep_group:
                    self._destroy_group()
        check_weight_version(self.engine, version)

    def close(self) -> None:
        self._destroy_group()
