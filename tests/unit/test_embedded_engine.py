"""EmbeddedEngine against transformers on tiny random models and the real SmolLM2-135M-Instruct (CPU, fp32)."""
from __future__ import annotations

import pytest
import torch

from megatron_copsd.rollout.embedded import (
    EmbeddedEngine,
    derive_seed,
    filter_logits,
    sample_from_uniforms,
)
from megatron_copsd.rollout.types import RolloutEngine, SamplingParams
from megatron_copsd.testing.tiny import make_tiny_hf_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return make_tiny_hf_model(None, "qwen3", seed=0)


def _ids(samples):
    return [[s.response_ids for s in per] for per in samples]


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2"])
def test_greedy_matches_transformers_generate(family):
    m = make_tiny_hf_model(None, family, seed=1)
    engine = EmbeddedEngine(m, eos_token_ids=1, pad_token_id=0, max_batch_size=3)
    assert isinstance(engine, RolloutEngine)
    assert engine.decoder is not None  # the static-cache path, with continuous refill (4 prompts, 3 slots)
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=24, temperature=0))
    for p, per in zip(PROMPTS, out):
        # Reference: each prompt alone, unpadded, through transformers' own generate loop.
        ref = m.generate(
            torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=24, do_sample=False, eos_token_id=1, pad_token_id=0,
        )[0, len(p):].tolist()
        assert per[0].response_ids == ref
        assert len(per[0].logprobs) == len(ref)
        assert per[0].finish_reason == ("stop" if ref[-1] == 1 else "length")


def _recomputed_logprobs(m, prompt, response, temperature, valid_vocab):
    """What the trainer does: one full forward over prompt + response, log_softmax(logits / T)."""
    full = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = m(input_ids=full).logits[0, len(prompt) - 1 : -1, :valid_vocab].float()
    lp = torch.log_softmax(logits / temperature, dim=-1)
    return lp.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


def test_sampled_logprobs_match_full_forward(model):
    valid_vocab = 290  # logits are 301 wide: the last 11 rows play Megatron's vocab padding
    engine = EmbeddedEngine(model, max_batch_size=5, valid_vocab=valid_vocab)
    params = SamplingParams(max_new_tokens=20, temperature=0.7, top_p=0.9, top_k=100, n=3, seed=3)
    out = engine.generate(PROMPTS, params)
    max_diff = 0.0
    for p, per in zip(PROMPTS, out):
        assert len(per) == 3
        for s in per:
            assert all(t < valid_vocab for t in s.response_ids)
            ref = _recomputed_logprobs(model, p, s.response_ids, 0.7, valid_vocab)
            max_diff = max(max_diff, (ref - torch.tensor(s.logprobs)).abs().max().item())
    print(f"max |engine logprob - full-forward logprob| = {max_diff:.2e}")
    assert max_diff < 1e-5


def test_stop_tokens_end_only_their_row(model):
    engine = EmbeddedEngine(model, max_batch_size=4)
    base = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=0))
    stop = base[0][0].response_ids[3]
    assert stop not in base[1][0].response_ids  # keep row 1 as an unaffected control
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=(stop,)))
    cut = base[0][0].response_ids.index(stop)
    assert out[0][0].response_ids == base[0][0].response_ids[: cut + 1]
    assert out[0][0].finish_reason == "stop" and len(out[0][0].logprobs) == cut + 1
    assert out[0][0].logprobs == pytest.approx(base[0][0].logprobs[: cut + 1], abs=1e-6)
    assert out[1][0].response_ids == base[1][0].response_ids
    assert out[1][0].finish_reason == "length"
    # The same token as EOS (engine-level) stops the same way.
    eos_engine = EmbeddedEngine(model, eos_token_ids=[1, stop], max_batch_size=4)
    out_eos = eos_engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=0))
    assert _ids(out_eos) == _ids(out)


def test_sampling_n_and_seeds(model):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=4, seed=11)
    a = EmbeddedEngine(model, max_batch_size=32).generate(PROMPTS, params)
    # Another chunking and a different set of companions: the samples of a prompt do not change.
    b = EmbeddedEngine(model, max_batch_size=3).generate(PROMPTS, params)
    assert _ids(a) == _ids(b)
    c = EmbeddedEngine(model, max_batch_size=32).generate(PROMPTS[:1], params)
    assert _ids(c)[0] == _ids(a)[0]
    assert all(len(per) == 4 for per in a)
    assert len({tuple(s.response_ids) for s in a[0]}) == 4  # n samples are distinct draws
    other = EmbeddedEngine(model).generate(PROMPTS, SamplingParams(max_new_tokens=12, n=4, seed=12))
    assert _ids(other) != _ids(a)
    assert a[0][1].meta["seed"] == derive_seed(11, 0, 1)


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    engine = EmbeddedEngine(model)
    greedy = _ids(engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0)))
    k1 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.3, top_k=1, seed=0))
    p0 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.3, top_p=1e-6, seed=0))
    assert _ids(k1) == greedy and _ids(p0) == greedy
    # Log-probs stay those of the full temperature-scaled distribution (before truncation).
    assert max(k1[0][0].logprobs) < 0


def test_filter_and_inverse_cdf_sampling():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, -1, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 3, 1.0)).sum().item() == 3
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    picks = sample_from_uniforms(logits.expand(20000, 4), u)
    freq = torch.bincount(picks, minlength=4).double() / 20000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64), atol=0.015)


def test_update_weights_strict_and_versioned(tmp_path):
    m0 = make_tiny_hf_model(None, "qwen3", seed=0, tie_word_embeddings=True)
    m1 = make_tiny_hf_model(tmp_path / "m1", "qwen3", seed=5, tie_word_embeddings=True)
    engine = EmbeddedEngine(m0)
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    target = _ids(EmbeddedEngine(str(tmp_path / "m1")).generate(PROMPTS, greedy))
    named = list(m1.state_dict().items())
    with pytest.raises(ValueError, match="unknown parameter name 'bogus'"):
        engine.update_weights(named + [("bogus", torch.zeros(1))], version=1)
    bad_shape = [(n, t[:-1] if n.endswith("q_proj.weight") else t) for n, t in named]
    with pytest.raises(ValueError, match="shape of 'model.layers.0.self_attn.q_proj.weight'"):
        engine.update_weights(bad_shape, version=1)
    with pytest.raises(ValueError, match="missing 1 parameters"):
        engine.update_weights([(n, t) for n, t in named if "layers.1.mlp.up_proj" not in n], version=1)
    assert engine.weight_version == 0 and _ids(engine.generate(PROMPTS, greedy)) != target
    # Tied embeddings: the lm_head alias alone is enough.
    engine.update_weights([(n, t) for n, t in named if n != "model.embed_tokens.weight"], version=7)
    out = engine.generate(PROMPTS, greedy)
    assert _ids(out) == target and out[0][0].weight_version == 7 and engine.weight_version == 7


def test_packed_weights_follow_in_place_changes():
    """The CPU decode step reads packed copies of the weights; a change made in place outside
    `update_weights` (here `load_state_dict`) must reach them, and packed equals unpacked decoding."""
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    m0 = make_tiny_hf_model(None, "qwen3", seed=0)
    m1 = make_tiny_hf_model(None, "qwen3", seed=5)
    engine = EmbeddedEngine(m0, eos_token_ids=1, max_batch_size=3)
    assert engine.decoder.packed
    before = _ids(engine.generate(PROMPTS, greedy))  # builds the packed copies of m0's weights
    unpacked = EmbeddedEngine(make_tiny_hf_model(None, "qwen3", seed=5), eos_token_ids=1, max_batch_size=3,
                              packed_weights=False)
    assert not unpacked.decoder.packed
    target = _ids(unpacked.generate(PROMPTS, greedy))
    assert before != target
    m0.load_state_dict(m1.state_dict())
    assert _ids(engine.generate(PROMPTS, greedy)) == target


def test_edge_cases(model):
    engine = EmbeddedEngine(model)
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=0, n=2))
    assert all(s.response_ids == [] and s.finish_reason == "length" for per in out for s in per)
    assert engine.generate([], SamplingParams()) == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[3], []], SamplingParams())
    with pytest.raises(ValueError, match="prompt 0 has token ids outside"):
        engine.generate([[3, 999]], SamplingParams())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.generate([[3]], SamplingParams(max_new_tokens=10_000))


def test_continuous_batching_equals_reference_path(model):
    """Rows that stop at different steps, refilled from the queue into 3 slots (prefills while other rows
    decode, slot compaction), give what the reference path (HF forward + DynamicCache, one chunk) gives."""
    prompts = [[(7 * i + 3 * t) % 280 + 2 for t in range(3 + (5 * i) % 11)] for i in range(9)]
    params = SamplingParams(max_new_tokens=14, temperature=1.0, n=2, seed=5, stop_token_ids=(40, 77, 123, 200))
    fast = EmbeddedEngine(model, max_batch_size=3)
    calls = []
    prefill = fast.decoder.prefill
    fast.decoder.prefill = lambda cache, slot0, ps: calls.append((slot0, len(ps))) or prefill(cache, slot0, ps)
    out = fast.generate(prompts, params)
    ref = EmbeddedEngine(model, max_batch_size=32, static_cache=False).generate(prompts, params)
    assert _ids(out) == _ids(ref)
    for per, per_ref in zip(out, ref):
        for s, r in zip(per, per_ref):
            assert s.finish_reason == r.finish_reason and s.meta["seed"] == r.meta["seed"]
            assert s.logprobs == pytest.approx(r.logprobs, abs=1e-5)
    reasons = [s.finish_reason for per in out for s in per]
    assert 0 < reasons.count("stop") < len(reasons)  # rows really left at different times
    assert len(calls) > 2 and any(slot0 > 0 for slot0, _ in calls)  # refills joined running rows


def test_unsupported_architecture_warns_and_uses_reference_path():
    m = make_tiny_hf_model(None, "llama", seed=1)
    ref = _ids(EmbeddedEngine(m, static_cache=False).generate(PROMPTS, SamplingParams(max_new_tokens=6,
                                                                                       temperature=0)))
    m.config.hidden_act = "gelu"  # what the static-cache decoder does not implement
    m.model.layers[0].mlp.act_fn = torch.nn.GELU()
    with pytest.warns(UserWarning, match="static-cache decoder unsupported .*hidden_act 'gelu'"):
        engine = EmbeddedEngine(m)
    assert engine.decoder is None
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=0))
    assert len(out) == len(PROMPTS) and _ids(out) != ref  # the reference path ran the changed model


def test_smollm2_greedy_matches_transformers_generate(smollm2_hf_dir):
    """The real SmolLM2-135M-Instruct (GQA 9/3 heads, 30 layers, tied embeddings), chat-formatted prompts
    of different lengths decoded together in 2 slots with refill, against transformers' generate on each
    prompt alone."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_hf_dir))
    m = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_hf_dir), dtype=torch.float32).eval()
    questions = ["Tom has 3 apples and buys 5 more. How many apples does he have?",
                 "Tom a 3 pommes et en achète 5 de plus. Combien de pommes a-t-il ?",
                 "What is 12 times 4?"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for q in questions]
    engine = EmbeddedEngine(m, eos_token_ids=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_batch_size=2)
    assert engine.decoder is not None
    out = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    for p, per in zip(prompts, out):
        with torch.inference_mode():
            ref = m.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert per[0].response_ids == ref, (tok.decode(per[0].response_ids), tok.decode(ref))
