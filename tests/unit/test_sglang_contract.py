"""SGLang 0.5.23 specifics, one test per item of issue 16, against the strict contract stand-in (real HTTP
on 127.0.0.1; `sglang_contract_server.py` -- not SGLang).

What these cannot prove: that a real 0.5.23 server answers exactly so. The stand-in's behaviour is taken
from docs/sglang_api.md (read from the 0.5.23 server code); a GPU cluster run is the real check.
"""
from __future__ import annotations

import socket

import pytest
import requests

from megatron_copsd.config import config_from_dict
from megatron_copsd.rollout import sglang_checks
from megatron_copsd.rollout.sglang_checks import resolve_master_address
from megatron_copsd.rollout.sglang_client import SGLangEngine, SGLangError, engine_from_config
from megatron_copsd.rollout.sglang_weights import paused
from megatron_copsd.rollout.types import SamplingParams
from tests.unit.sglang_contract_server import ContractRouter, InProcessBroadcast
from tests.unit.sglang_fixtures import FAST, PROMPTS, after_startup, model_dirs, servers  # noqa: F401

GREEDY = SamplingParams(max_new_tokens=6, temperature=0)
SAMPLED = SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=4)

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(out):
    return [[s.response_ids for s in per] for per in out]


def test_unknown_sampling_keys_rejected_with_400(servers):
    (a,) = servers(1)
    base = {"input_ids": [5, 6, 7], "return_logprob": True}
    ok = requests.post(a.url + "/generate", json={**base, "sampling_params": {"max_new_tokens": 2}}, timeout=30)
    assert ok.status_code == 200 and "text" not in ok.json()[0]  # --skip-tokenizer-init: no text
    bad = requests.post(a.url + "/generate", json={**base, "sampling_params": {"max_new_tokens": 2, "foo": 1}},
                        timeout=30)
    assert bad.status_code == 400 and "foo" in bad.text and "unexpected" in bad.text
    stop = requests.post(a.url + "/generate", json={**base, "sampling_params": {"stop": ["x"]}}, timeout=30)
    assert stop.status_code == 400 and "tokenizer" in stop.text
    # The client turns a 400 into an immediate SGLangError (not retried).
    engine = SGLangEngine(a.url, **FAST)
    calls = a.paths().count("/generate")
    with pytest.raises(SGLangError, match="HTTP 400"):
        engine.generate([[5, 100_000]], GREEDY)
    assert a.paths().count("/generate") == calls + 1


def test_weight_version_from_model_info_checked_after_every_update(servers, model_dirs, tmp_path):
    """The check runs (GET /model_info after the update, never the removed /get_weight_version), fails
    a server that did not take the version, and rows from other weights fail the batch."""
    a, b = servers(2)
    _, _, m1 = model_dirs
    engine = SGLangEngine([a.url, b.url], shared_dir=tmp_path, hf_config=m1.config, **FAST)
    assert a.paths()[:3] == ["/health_generate", "/model_info", "/server_info"]
    assert requests.get(a.url + "/get_weight_version", timeout=5).status_code == 404  # gone in 0.5.23
    engine.update_weights(m1.state_dict().items(), version=1)
    assert after_startup(a)[-1] == "/model_info" and "/get_weight_version" not in b.paths()[1:]
    original = b.load_named

    def load_without_version(named, version):  # a server that loads the weights but keeps its version tag
        original(named, None)

    b.load_named = load_without_version
    with pytest.raises(SGLangError, match=rf"{b.url}/model_info: weight_version is '1' after the update, expected '2'"):
        engine.update_weights(m1.state_dict().items(), version=2)
    b.load_named = original
    engine.update_weights(m1.state_dict().items(), version=3)
    assert [s[0].meta["server_weight_version"] for s in engine.generate(PROMPTS, GREEDY)] == ["3"] * 3
    a.version = b.version = "0"  # e.g. restarted with --weight-version 0: rows from other weights
    with pytest.raises(SGLangError, match=r"weight version\(s\) \['0'\], expected '3'"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=4, temperature=0, n=2))


def test_server_started_without_weight_version_is_reported(servers):
    (a,) = servers(1, weight_version="default")  # what SGLang does without --weight-version
    with pytest.warns(UserWarning, match=r"\['default'\].*launched without --weight-version"):
        engine = SGLangEngine(a.url, **FAST)
    assert engine.generate(PROMPTS[:1], GREEDY)[0][0].meta["server_weight_version"] == "default"


def test_seeds_only_with_deterministic_inference(servers):
    plain, det = servers(1)[0], servers(1, deterministic=True)[0]
    # The stand-in, like 0.5.23, ignores sampling_seed unless launched deterministic.
    req = {"input_ids": [PROMPTS[0]] * 4, "return_logprob": True,
           "sampling_params": {"max_new_tokens": 12, "temperature": 1.0, "sampling_seed": 7}}

    def outputs(url):
        return [r["output_ids"] for r in requests.post(url + "/generate", json=req, timeout=30).json()]

    assert outputs(plain.url) != outputs(plain.url)
    assert outputs(det.url) == outputs(det.url)
    with pytest.raises(SGLangError, match=r"without --enable-deterministic-inference, so it would ignore sampling_seed"):
        SGLangEngine(plain.url, send_seed=True, **FAST)
    engine = SGLangEngine(det.url, send_seed=True, **FAST)
    assert _ids(engine.generate(PROMPTS, SAMPLED)) == _ids(engine.generate(PROMPTS, SAMPLED))


def test_logprob_environment_checked_at_start_up(servers):
    (a,) = servers(1)
    with pytest.raises(ValueError, match="SGLANG_RETURN_ORIGINAL_LOGPROB=1 .*unscaled"):
        SGLangEngine(a.url, environ={"SGLANG_RETURN_ORIGINAL_LOGPROB": "1"}, **FAST)
    SGLangEngine(a.url, environ={"SGLANG_RETURN_ORIGINAL_LOGPROB": "0"}, **FAST)  # off: fine
    (b,) = servers(1, rl_on_policy_target="fsdp")
    with pytest.raises(SGLangError, match=r"--rl-on-policy-target=fsdp"):
        SGLangEngine(b.url, **FAST)


def test_router_only_config_refuses_weight_sync(servers, model_dirs, tmp_path):
    a, b = servers(2)
    router = ContractRouter([a.url, b.url])
    try:
        engine = SGLangEngine(router_url=router.url, shared_dir=tmp_path, hf_config=model_dirs[2].config, **FAST)
        assert len(engine.generate(PROMPTS, GREEDY)) == 3  # generation through the router works
        with pytest.raises(SGLangError, match=r"only a router was given .*not /pause_generation or /update_weights_\*"):
            engine.update_weights(model_dirs[2].state_dict().items(), version=1)
        with pytest.raises(SGLangError, match=r"pause / flush / weight updates need every SGLang server's own URL"):
            with paused(engine):
                pass
        assert {"/pause_generation", "/update_weights_from_disk"}.isdisjoint(router.paths() + a.paths() + b.paths())
        # The stand-in, like sglang_router, has no such routes; a router listed as a server is caught.
        for path in ("/pause_generation", "/update_weights_from_disk", "/init_weights_update_group"):
            assert requests.post(router.url + path, json={}, timeout=5).status_code == 404
        with pytest.raises(SGLangError, match=r"/model_info: not served .*Is .* an sglang_router"):
            SGLangEngine([router.url], **FAST)
        # Router for generation + the servers for weight sync: both work.
        both = SGLangEngine([a.url, b.url], router_url=router.url, shared_dir=tmp_path, hf_config=model_dirs[2].config,
                            **FAST)
        both.update_weights(model_dirs[2].state_dict().items(), version=1)
        assert both.generate(PROMPTS, GREEDY)[0][0].meta["server_weight_version"] == "1"
    finally:
        router.stop()
    with pytest.raises(ValueError, match=r"rollout.sglang_urls: must list every SGLang server: weight sync cannot go"):
        config_from_dict({"rollout": {"engine": "sglang", "sglang_router_url": "http://r:30100"}})


def test_tp_and_dp_checked_against_server_info(servers):
    (tp2,) = servers(1, tp_size=2)
    with pytest.raises(SGLangError, match=r"tp_size=2, but rollout.sglang_tp=1"):
        SGLangEngine(tp2.url, server_tp=1, **FAST)
    bc = InProcessBroadcast()
    (dp2,) = servers(1, bc, dp_size=2)
    with pytest.raises(SGLangError, match=r"dp_size=2: NCCL weight sync .*one server per replica"):
        SGLangEngine(dp2.url, weight_sync="nccl", master_address="127.0.0.1", backend="gloo", **FAST)
    SGLangEngine(dp2.url, weight_sync="disk", shared_dir="/tmp/unused", **FAST)  # disk sync copes with DP
    assert "/init_weights_update_group" not in dp2.paths()
    with pytest.raises(ValueError, match=r"gpus_per_server=1 for .* reports tp_size=2"):
        SGLangEngine(tp2.url, weight_sync="nccl", gpus_per_server=1, master_address="127.0.0.1", **FAST)


def test_master_address_from_interface_or_setting(monkeypatch):
    local, remote = ["http://127.0.0.1:30000"], ["http://127.0.0.1:30000", "http://10.9.8.7:30000"]
    assert resolve_master_address("10.0.0.5", None, remote) == "10.0.0.5"
    assert resolve_master_address(None, "lo", local) == "127.0.0.1"
    with pytest.raises(ValueError, match=r"127.0.0.1 \(from interface lo\) is a loopback address.*10.9.8.7"):
        resolve_master_address(None, "lo", remote)
    with pytest.raises(ValueError, match=r"interface 'no-such-if0' \(COPSD_SOCKET_IFNAME\) does not exist"):
        resolve_master_address(None, "no-such-if0", remote)
    # Debian maps the host name to 127.0.1.1: never used for servers on other hosts.
    monkeypatch.setattr(sglang_checks.socket, "gethostbyname",
                        lambda host: "127.0.1.1" if host == socket.gethostname() else "10.9.8.7")
    with pytest.raises(ValueError, match=r"127.0.1.1 \(from host name .*set COPSD_SOCKET_IFNAME"):
        resolve_master_address(None, None, ["http://node7:30000"])
    assert resolve_master_address(None, None, local) == "127.0.1.1"


def test_weight_sync_selected_from_config(servers, model_dirs, tmp_path, monkeypatch):
    """The trainer's engine (`engine_from_config`): disk by default with an absolute checkpoint path
    under a relative output dir; nccl with the group sized from rollout.sglang_tp and the master address
    of COPSD_SOCKET_IFNAME."""
    a, b = servers(2)
    _, _, m1 = model_dirs
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"rollout": {"engine": "sglang", "sglang_urls": [a.url, b.url]}})
    engine = engine_from_config(cfg, eos_token_ids=[1], hf_config=m1.config, work_dir="run")
    engine.update_weights(m1.state_dict().items(), version=1)
    load = next(p for path, p in a.calls if path == "/update_weights_from_disk")
    assert load["model_path"] == str(tmp_path / "run" / "weight_sync" / "weights_v1")
    (c,) = servers(1, tp_size=2)
    cfg = config_from_dict({"rollout": {"engine": "sglang", "sglang_urls": [c.url, a.url], "sglang_tp": 2,
                                        "weight_sync": "nccl"}, "parallel": {"backend": "gloo"}})
    with pytest.raises(SGLangError, match=r"tp_size=1, but rollout.sglang_tp=2"):
        engine_from_config(cfg, eos_token_ids=[1], hf_config=m1.config, work_dir="run",
                           environ={"COPSD_SOCKET_IFNAME": "lo"})
    cfg.rollout.sglang_urls = [c.url]
    engine = engine_from_config(cfg, eos_token_ids=[1], hf_config=m1.config, work_dir="run",
                                environ={"COPSD_SOCKET_IFNAME": "lo"})
    sync = engine.weight_sync
    assert (type(sync).__name__, sync.world_size, sync.rank_offsets, sync.master_address, sync.backend,
            sync.device, sync.bucket_bytes) == ("DistributedWeightSync", 3, [1], "127.0.0.1", "gloo", "cpu", 512 << 20)
    with pytest.raises(ValueError, match=r"rollout.weight_sync: must be one of \['disk', 'nccl'\]"):
        config_from_dict({"rollout": {"weight_sync": "distributed"}})
