"""SGLangEngine over real HTTP against the contract-test server (SGLang 0.5.23's schema, not SGLang):
generation, failover, faults and both weight-sync paths. The 0.5.23 specifics (strict validation,
/model_info, seeds, router, start-up checks) are in test_sglang_contract.py.

Every test is bounded: short timeouts, few retries, tiny back-off; the slowest waits ~1-2 s on purpose.
"""
from __future__ import annotations

import time

import pytest
import torch

from megatron_copsd.rollout.embedded import EmbeddedEngine
from megatron_copsd.rollout.sglang_client import SGLangEngine, SGLangError, _Retryable, parse_generate_item
from megatron_copsd.rollout.types import RolloutEngine, SamplingParams
from tests.unit.sglang_contract_server import SUPPORTED_SAMPLING_KEYS, InProcessBroadcast
from tests.unit.sglang_fixtures import FAST, PROMPTS, after_startup, model_dirs, servers  # noqa: F401

GREEDY = SamplingParams(max_new_tokens=8, temperature=0, n=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(out):
    return [[s.response_ids for s in per] for per in out]


def _reference(model_dir, params=GREEDY):
    return _ids(EmbeddedEngine(str(model_dir)).generate(PROMPTS, params))


def test_batch_spread_n_and_logprobs(servers, model_dirs):
    a, b = servers(2)
    engine = SGLangEngine([a.url, b.url], max_rows_per_request=2, **FAST)
    assert isinstance(engine, RolloutEngine) and engine.health()
    out = engine.generate(PROMPTS, GREEDY)
    assert _ids(out) == _reference(model_dirs[0])  # n=2 greedy: both samples equal the reference
    assert [len(per) for per in out] == [2, 2, 2]
    assert a.paths().count("/generate") == 2 and b.paths().count("/generate") == 1  # 6 rows / 2 per request
    req = next(p for path, p in a.calls if path == "/generate")
    assert req["return_logprob"] is True and req["input_ids"] == [PROMPTS[0], PROMPTS[0]]
    # Sampled log-probs parsed from output_token_logprobs equal a full forward over prompt + response.
    sampled = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.8, n=2))
    ref_model = EmbeddedEngine(str(model_dirs[0])).model
    for p, per in zip(PROMPTS, sampled):
        for s in per:
            with torch.no_grad():
                logits = ref_model(input_ids=torch.tensor([p + s.response_ids])).logits[0, len(p) - 1 : -1]
            ref = torch.log_softmax(logits / 0.8, -1).gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0]
            assert torch.allclose(ref, torch.tensor(s.logprobs), atol=1e-5)
            assert s.meta["server_weight_version"] == "0" and s.weight_version == 0


def test_seeds_and_stop_tokens(servers, model_dirs):
    (a,) = servers(1, deterministic=True)  # --enable-deterministic-inference: sampling_seed honoured
    engine = SGLangEngine(a.url, eos_token_ids=[1], send_seed=True, **FAST)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=4)
    first, again = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert _ids(first) == _ids(again) and first[0][0].response_ids != first[0][1].response_ids
    base = engine.generate(PROMPTS, GREEDY)
    stop = base[0][0].response_ids[2]
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=(stop,)))
    assert out[0][0].response_ids == base[0][0].response_ids[:3] and out[0][0].finish_reason == "stop"
    assert len(out[0][0].logprobs) == 3
    sent = [p for path, p in a.calls if path == "/generate"][-1]["sampling_params"]
    assert sent["stop_token_ids"] == sorted({1, stop}) and "sampling_seed" not in sent
    for path, req in a.calls:  # only keys the strict 0.5.23 validation accepts (and the stand-in implements)
        if path == "/generate":
            sps = req["sampling_params"] if isinstance(req["sampling_params"], list) else [req["sampling_params"]]
            assert all(set(sp) <= SUPPORTED_SAMPLING_KEYS for sp in sps)


def test_disk_weight_update_in_order(servers, model_dirs, tmp_path, monkeypatch):
    """Also: a relative shared_dir is sent as an absolute model_path (the stand-in, like a server on
    another node, resolves relative paths against its own working directory and would not find it)."""
    a, b = servers(2)
    b.faults.flush_busy = 2  # the first two /flush_cache answer 400: retried
    _, m1_dir, m1 = model_dirs
    monkeypatch.chdir(tmp_path)
    engine = SGLangEngine([a.url, b.url], shared_dir="shared", hf_config=m1.config, **FAST)
    engine.update_weights(m1.state_dict().items(), version=3)
    for s in (a, b):
        tail = after_startup(s)
        assert tail[:3] == ["/pause_generation", "/update_weights_from_disk", "/flush_cache"]
        assert tail[-2:] == ["/continue_generation", "/model_info"]  # the version check ran
        assert s.version == "3"
    assert b.paths().count("/flush_cache") == 3
    load = next(p for path, p in a.calls if path == "/update_weights_from_disk")
    assert load["model_path"] == str(tmp_path / "shared" / "weights_v3") and load["weight_version"] == "3"
    out = engine.generate(PROMPTS, GREEDY)
    assert _ids(out) == _reference(m1_dir) and out[0][0].weight_version == 3
    assert out[0][0].meta["server_weight_version"] == "3"
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["weights_v3"]  # no temp dirs left


def test_nccl_weight_update_in_buckets(servers, model_dirs):
    """weight_sync="nccl" with servers of TP=2 and TP=1 (sizes read from /server_info): world size
    1 + 2 + 1 = 4, rank offsets 1 and 3; every TP rank receives every tensor (in-process channels)."""
    bc = InProcessBroadcast()
    (a,), (b,) = servers(1, bc, tp_size=2), servers(1, bc)
    _, m1_dir, m1 = model_dirs
    engine = SGLangEngine([a.url, b.url], weight_sync="nccl", master_address="127.0.0.1",
                          master_port=29999, backend="gloo", bucket_bytes=100_000,
                          group_init_fn=bc.group_init_fn, broadcast_fn=bc.broadcast_fn,
                          group_destroy_fn=lambda g: None, **FAST)
    named = list(m1.state_dict().items())
    engine.update_weights(named, version=5)
    num_buckets = a.paths().count("/update_weights_from_distributed")
    assert num_buckets > 2  # ~0.3 MB of fp32 weights in 100 kB buckets
    for s, offset, ranks in ((a, 1, [1, 2]), (b, 3, [3])):
        assert after_startup(s) == (["/pause_generation", "/init_weights_update_group"]
                                    + ["/update_weights_from_distributed"] * num_buckets
                                    + ["/destroy_weights_update_group", "/flush_cache", "/continue_generation",
                                       "/model_info"])
        init = next(p for path, p in s.calls if path == "/init_weights_update_group")
        assert (init["rank_offset"], init["world_size"], init["backend"]) == (offset, 4, "gloo")
        assert s.group_ranks == ranks
    buckets = [p for path, p in a.calls if path == "/update_weights_from_distributed"]
    assert [n for bk in buckets for n in bk["names"]] == [n for n, _ in named]  # order kept
    assert buckets[0]["dtypes"][0] == "float32" and buckets[0]["weight_version"] == "5"
    assert _ids(engine.generate(PROMPTS, GREEDY)) == _reference(m1_dir)


def test_http_500s_then_success_and_exhausted(servers):
    (a,) = servers(1)
    engine = SGLangEngine(a.url, **FAST)
    a.faults.fail_next = 2
    out = engine.generate(PROMPTS[:1], GREEDY)
    assert len(out[0]) == 2 and a.paths().count("/generate") == 3
    a.faults.fail_next = 10
    with pytest.raises(SGLangError, match=rf"request copsd-1-\w+-r0 .*failed after 3 attempts.*{a.url}: HTTP 500"):
        engine.generate(PROMPTS, GREEDY)


def test_client_errors_are_not_retried(servers):
    (a,) = servers(1)
    engine = SGLangEngine(a.url, **FAST)
    with pytest.raises(SGLangError, match="rejected by .*HTTP 400.*outside"):
        engine.generate([[5, 100_000]], GREEDY)
    assert a.paths().count("/generate") == 1


def test_slow_server_times_out_then_fails_over(servers, model_dirs):
    """The slow server would answer after 30 s; the batch is served by the other one long before (bounds
    generous for a loaded shared machine: the point is not waiting for the slow server)."""
    slow, fast = servers(2)
    slow.faults.delay_s = 30.0  # cut short when the fixture stops the server
    reference = _reference(model_dirs[0])
    engine = SGLangEngine([slow.url, fast.url], **{**FAST, "timeout_s": 3.0})
    t0 = time.monotonic()
    assert _ids(engine.generate(PROMPTS, GREEDY)) == reference
    assert time.monotonic() - t0 < 20.0
    only_slow = SGLangEngine(slow.url, **{**FAST, "timeout_s": 0.3, "max_retries": 1})
    t0 = time.monotonic()
    with pytest.raises(SGLangError, match=r"no answer within timeout_s=0.3"):
        only_slow.generate(PROMPTS, GREEDY)
    assert time.monotonic() - t0 < 10.0


def test_server_killed_mid_batch(servers, model_dirs):
    a, b = servers(2)
    a.faults.die_on_generate = 2  # a's second request of the batch: dropped connection, a is gone
    engine = SGLangEngine([a.url, b.url], max_rows_per_request=1, max_concurrency=1, **FAST)
    out = engine.generate(PROMPTS, GREEDY)
    assert not a.alive and _ids(out) == _reference(model_dirs[0])  # complete, served by b
    (c,) = servers(1)
    c.faults.die_on_generate = 2
    lonely = SGLangEngine(c.url, max_rows_per_request=1, max_concurrency=1, **FAST)
    with pytest.raises(SGLangError, match=rf"failed after 3 attempts.*{c.url}: connection error"):
        lonely.generate(PROMPTS, GREEDY)
    assert not lonely.health()


def test_never_healthy_fails_within_bound(servers):
    (a,) = servers(1)
    a.faults.never_healthy = True
    t0 = time.monotonic()
    with pytest.raises(SGLangError, match=rf"not healthy after 1.0s: {a.url} \(HTTP 503\)"):
        SGLangEngine(a.url, **{**FAST, "health_timeout_s": 1.0})
    assert time.monotonic() - t0 < 2.5
    a.stop()  # nobody listening at all
    with pytest.raises(SGLangError, match=r"ConnectionError"):
        SGLangEngine(a.url, **{**FAST, "health_timeout_s": 0.5})


def test_parse_generate_item_rejects_bad_results():
    good = {"output_ids": [4, 1], "meta_info": {"finish_reason": {"type": "stop", "matched": 1},
                                                 "output_token_logprobs": [[-0.5, 4, None], [-1.0, 1, None]],
                                                 "weight_version": "2", "unknown_extra": 1}}
    s = parse_generate_item(good, 0, 1, 8)
    assert (s.response_ids, s.logprobs, s.finish_reason) == ([4, 1], [-0.5, -1.0], "stop")
    with pytest.raises(_Retryable):
        parse_generate_item({"meta_info": {"finish_reason": {"type": "abort"}}}, 0, 0, 8)
    with pytest.raises(ValueError, match="output_token_logprobs missing"):
        parse_generate_item({"meta_info": {"finish_reason": "length"}}, 0, 0, 8)
    with pytest.raises(ValueError, match="disagree"):
        parse_generate_item({**good, "output_ids": [4]}, 0, 0, 8)
    with pytest.raises(ValueError, match="exceed max_new_tokens"):
        parse_generate_item(good, 0, 0, 1)
