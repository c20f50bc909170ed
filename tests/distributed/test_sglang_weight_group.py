"""Distributed weight sync over a real gloo group: trainer process -> contract-test server process.

Process 0 is the trainer (`SGLangEngine(weight_sync="distributed")` with the default
`init_custom_process_group` + `torch.distributed.broadcast`); process 1 hosts the contract-test server
(SGLang's documented HTTP schema, not SGLang), which joins the same group as rank `rank_offset` and
receives every bucket. No default process group exists in either process.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from megatron_copsd.testing.multiproc import free_port, run_distributed


def _wait_for(path: Path, timeout_s: float = 120.0) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)
    return path.read_text()


def _role(rank: int, world_size: int, m0: str, m1: str, work: str, port: int):
    import torch

    from megatron_copsd.rollout.embedded import EmbeddedEngine
    from megatron_copsd.rollout.types import SamplingParams

    work_dir = Path(work)
    prompts = [[5, 6, 7], [8, 9]]
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    if rank == 1:
        from tests.unit.sglang_contract_server import ContractServer

        server = ContractServer(EmbeddedEngine(m0), real_group=True)
        (work_dir / "url.tmp").write_text(server.url)
        (work_dir / "url.tmp").rename(work_dir / "url")
        _wait_for(work_dir / "done")
        server.stop()
        return server.paths()
    from megatron_copsd.rollout.sglang_client import SGLangEngine

    url = _wait_for(work_dir / "url")
    engine = SGLangEngine(url, weight_sync="distributed", master_address="127.0.0.1", master_port=port,
                          backend="gloo", bucket_bytes=100_000, health_timeout_s=30, timeout_s=60)
    try:
        named = list(EmbeddedEngine(m1).model.state_dict().items())
        engine.update_weights(named, version=2)
        got = [[s.response_ids for s in per] for per in engine.generate(prompts, greedy)]
        want = [[s.response_ids for s in per] for per in EmbeddedEngine(m1).generate(prompts, greedy)]
        return got == want, engine.weight_version, torch.distributed.is_initialized()
    finally:
        (work_dir / "done").write_text("1")


@pytest.mark.distributed
def test_real_gloo_weight_broadcast(tmp_path):
    from megatron_copsd.testing.tiny import make_tiny_hf_model

    make_tiny_hf_model(tmp_path / "m0", seed=0)
    make_tiny_hf_model(tmp_path / "m1", seed=9)
    trainer, server_paths = run_distributed(
        _role, 2, args=(str(tmp_path / "m0"), str(tmp_path / "m1"), str(tmp_path), free_port()),
        timeout=240, init_process_group=False,
    )
    assert trainer == (True, 2, False)
    assert server_paths.count("/update_weights_from_distributed") > 2
    assert server_paths.index("/init_weights_update_group") < server_paths.index("/destroy_weights_update_group")
