"""NCCL-style weight sync selected from the run config, over a real gloo group: trainer -> a TP=2 server.

Process 0 is the trainer: it builds its rollout engine with the trainer's own `_build_engine` from a
config with `rollout.weight_sync=nccl`, `rollout.sglang_tp=2`, `parallel.backend=gloo` and
`COPSD_SOCKET_IFNAME=lo`, then pushes new weights (default `init_custom_process_group` +
`torch.distributed.broadcast`, 100 kB buckets) and samples from them. Process 1 hosts the contract-test
server (SGLang 0.5.23's HTTP schema, not SGLang) launched with TP=2: its TP rank 0 joins the weight group
in that process, TP rank 1 in a helper process it spawns, as group ranks rank_offset + 0 and + 1; both
receive every tensor. No default process group exists in any process.

Not proven here: NCCL itself (gloo stands in), and a real SGLang server's sharded loading.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from megatron_copsd.testing.multiproc import run_distributed


def _wait_for(path: Path, timeout_s: float = 120.0) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)
    return path.read_text()


def _role(rank: int, world_size: int, m0: str, m1: str, work: str):
    import torch

    from megatron_copsd.rollout.embedded import EmbeddedEngine
    from megatron_copsd.rollout.types import SamplingParams

    work_dir = Path(work)
    prompts = [[5, 6, 7], [8, 9]]
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    if rank == 1:
        from tests.unit.sglang_contract_server import ContractServer

        server = ContractServer(EmbeddedEngine(m0), real_group=True, tp_size=2, weight_version="0")
        try:
            (work_dir / "url.tmp").write_text(server.url)
            (work_dir / "url.tmp").rename(work_dir / "url")
            _wait_for(work_dir / "done", 200.0)
        finally:
            server.stop()
        init = next(p for path, p in server.calls if path == "/init_weights_update_group")
        return server.paths(), server.group_ranks, init
    from types import SimpleNamespace

    from megatron_copsd.config import config_from_dict
    from megatron_copsd.trainer import _build_engine

    url = _wait_for(work_dir / "url")
    cfg = config_from_dict({"rollout": {"engine": "sglang", "sglang_urls": [url], "sglang_tp": 2,
                                        "weight_sync": "nccl", "weight_sync_bucket_mb": 1},
                            "parallel": {"backend": "gloo"}})
    tok = SimpleNamespace(stop_token_ids=[], eos_token_id=1, pad_token_id=0)
    import os

    os.environ["COPSD_SOCKET_IFNAME"] = "lo"  # this child process only
    try:
        m1_model = EmbeddedEngine(m1).model
        engine = _build_engine(cfg, m1, m1_model.config, tok, work_dir)
        sync = engine.weight_sync
        sync.bucket_bytes = 100_000  # several buckets for the tiny model (the config's unit is MB)
        engine.update_weights(list(m1_model.state_dict().items()), version=2)
        got = [[s.response_ids for s in per] for per in engine.generate(prompts, greedy)]
        want = [[s.response_ids for s in per] for per in EmbeddedEngine(m1).generate(prompts, greedy)]
        return (got == want, engine.weight_version, torch.distributed.is_initialized(), type(sync).__name__,
                sync.world_size, sync.rank_offsets, sync.master_address, sync.backend)
    finally:
        (work_dir / "done").write_text("1")


@pytest.mark.distributed
def test_config_selected_nccl_sync_to_tp2_server_over_gloo(tmp_path):
    from megatron_copsd.testing.tiny import make_tiny_hf_model

    make_tiny_hf_model(tmp_path / "m0", seed=0)
    make_tiny_hf_model(tmp_path / "m1", seed=9)
    trainer, (server_paths, group_ranks, init) = run_distributed(
        _role, 2, args=(str(tmp_path / "m0"), str(tmp_path / "m1"), str(tmp_path)),
        timeout=240, init_process_group=False,
    )
    assert trainer == (True, 2, False, "DistributedWeightSync", 3, [1], "127.0.0.1", "gloo")
    assert (init["world_size"], init["rank_offset"], init["backend"]) == (3, 1, "gloo")
    assert group_ranks == [1, 2]  # TP rank r of the server joined as rank_offset + r
    assert server_paths.count("/update_weights_from_distributed") > 2
    assert server_paths.index("/init_weights_update_group") < server_paths.index("/destroy_weights_update_group")
    control = [p for p in server_paths if p != "/generate"]
    assert control[-2:] == ["/continue_generation", "/model_info"]  # the weight-version check ran after it
