"""Fixtures shared by the SGLang client tests: tiny models on disk and contract-test servers (not SGLang).

Imported by the test modules (`from tests.unit.sglang_fixtures import model_dirs, servers`)."""
from __future__ import annotations

import pytest

from megatron_copsd.rollout.embedded import EmbeddedEngine
from megatron_copsd.testing.tiny import make_tiny_hf_model
from tests.unit.sglang_contract_server import ContractServer

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
# Few retries, tiny back-off: failure paths end fast. The request timeout is generous so that a loaded shared
# machine does not turn a slow answer into a retry; tests of timeouts set their own.
FAST = dict(health_timeout_s=30, timeout_s=30, max_retries=2, backoff_s=0.01, connect_timeout_s=1)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_tiny_hf_model(root / "m0", seed=0)
    new = make_tiny_hf_model(root / "m1", seed=7)
    return root / "m0", root / "m1", new


@pytest.fixture
def servers(model_dirs):
    """`servers(k, broadcast=None, **launch)`: k contract servers on the m0 weights, launched like
    slurm/sglang_servers.sh does (`--weight-version 0`) unless `launch` says otherwise; stopped afterwards."""
    started: list[ContractServer] = []

    def start(k: int, broadcast=None, **launch) -> list[ContractServer]:
        launch = {"weight_version": "0", **launch}
        new = [ContractServer(EmbeddedEngine(str(model_dirs[0])), broadcast, **launch) for _ in range(k)]
        started.extend(new)
        return new

    yield start
    for s in started:
        s.stop()


def after_startup(server: ContractServer) -> list[str]:
    """The server's request paths after the client's start-up checks (health, /model_info, /server_info),
    without /generate."""
    paths = server.paths()
    start = paths.index("/server_info") + 1 if "/server_info" in paths else 0
    return [p for p in paths[start:] if p != "/generate"]
