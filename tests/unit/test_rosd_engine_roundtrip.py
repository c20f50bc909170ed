"""Reflection requests through the real embedded engine on a tiny random model, then finalize + counters.

The tiny model writes noise, so this checks the plumbing and the fallbacks (no tags parsed -> whole
response for the failed rollout, correct sibling solution as teacher context), not reflection quality."""
import torch

from megatron_copsd.rollout.embedded import EmbeddedEngine
from megatron_copsd.rollout.types import SamplingParams
from megatron_copsd.rosd.groups import RosdGroup, RosdRollout, RosdSettings, RosdStats, finalize_group, plan_group
from megatron_copsd.testing.tiny import tiny_hf_config
from tests.unit.rosd_cases import CORRECT, FAILED, PROBLEM, tokenizer


def test_reflections_from_embedded_engine():
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(1)
    tok = tokenizer("bpe")
    cfg = tiny_hf_config("qwen3", vocab_size=tok.vocab_size, max_position_embeddings=4096,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    engine = EmbeddedEngine(transformers.AutoModelForCausalLM.from_config(cfg), eos_token_ids=tok.stop_token_ids,
                            pad_token_id=tok.pad_token_id)
    group = RosdGroup(problem=PROBLEM, gold_answer="38", domain="biology",
                      rollouts=[RosdRollout(tok.encode(CORRECT) + [tok.eos_token_id], True),
                                RosdRollout(tok.encode(FAILED) + [tok.eos_token_id], False)])
    settings = RosdSettings(max_reflection_prompt_tokens=900, max_teacher_prompt_tokens=900)
    plan = plan_group(tok, group, settings)
    assert [len(r.prompt.ids) <= 900 for r in plan.requests] == [True, True]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, stop_token_ids=tok.stop_token_ids, seed=3)
    samples = engine.generate([r.prompt.ids for r in plan.requests], params)
    texts = [tok.decode(s[0].response_ids) for s in samples]
    result = finalize_group(tok, plan, texts, settings)
    failed, correct = result.targets[1], result.targets[0]
    assert correct.distill and correct.mask == [1] * correct.num_tokens
    assert failed.reflection is not None and failed.distill
    if failed.localization.found:  # noise can, in principle, contain a matching quote; then k is valid
        assert 0 <= failed.distill_start < failed.num_tokens
    else:
        assert failed.distill_start == 0
    for t in result.targets:
        assert t.teacher_prompt is not None and len(t.teacher_prompt.ids) <= 900
    stats = RosdStats()
    stats.add(result)
    m = stats.metrics()
    assert m["rosd/reflections"] == 2.0 and m["rosd/rollouts_distilled"] == 2.0
    assert 0.0 <= m["rosd/reflection_parse_rate"] <= 1.0 and m["rosd/train_accuracy/biology"] == 0.5
