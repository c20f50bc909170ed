import json

import pytest

from megatron_copsd.experience import PromptSampler, Rollout, make_train_items, step_seed
from megatron_copsd.metrics_log import MetricsLogger, read_metrics, truncate_jsonl


def test_sampler_epochs_and_resume():
    s = PromptSampler(5, seed=3, shuffle=True)
    first = s.next_indices(3) + s.next_indices(3)  # crosses the epoch boundary
    assert sorted(first[:5]) == list(range(5)) and s.epoch == 1
    state = s.state_dict()
    cont = s.next_indices(4)
    s2 = PromptSampler(5, seed=3, shuffle=True)
    s2.load_state_dict(state)
    assert s2.next_indices(4) == cont
    with pytest.raises(ValueError, match="training prompts"):
        PromptSampler(6, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="no training examples"):
        PromptSampler(0, seed=0)


def test_step_seed_stable_and_distinct():
    assert step_seed(1, 5) == step_seed(1, 5)
    assert len({step_seed(1, s) for s in range(100)}) == 100 and step_seed(2, 5) != step_seed(1, 5)


class _P:
    def __init__(self, i):
        self.student_ids, self.teacher_ids = [1, 2, i], [1, 9, 9, i]
        self.example = None


def test_make_train_items_grpo_advantages_and_stats():
    batch = [_P(3), _P(4)]
    ro = [Rollout(0, [5, 6], [-1.0, -1.0], "stop", "a", True, True, "1"),
          Rollout(0, [5], [-1.0], "length", "b", False, False, None),
          Rollout(1, [], [], "stop", "", False, True, None),  # empty response: dropped from training
          Rollout(1, [7, 8, 9], [-1.0] * 3, "stop", "c", False, True, "2")]
    items, stats = make_train_items(batch, ro, objective="grpo", n=2)
    assert [it.index for it in items] == [0, 1, 3]
    assert items[0].advantage == pytest.approx(1.0, abs=1e-5) and items[1].advantage == pytest.approx(-1.0, abs=1e-5)
    assert items[2].advantage == 0.0 and items[2].teacher_prompt == [1, 9, 9, 4]
    assert stats["reward"] == 0.25 and stats["format_rate"] == 0.75 and stats["truncated_frac"] == 0.25
    assert stats["response_len"] == 1.5 and stats["zero_adv_groups"] == 1 and stats["zero_adv_share"] == 0.5
    _, copsd_stats = make_train_items(batch, ro, objective="copsd", n=2)  # logged for every objective
    assert copsd_stats["zero_adv_groups"] == 1 and copsd_stats["zero_adv_share"] == 0.5


def test_metrics_truncate_on_resume(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    truncate_jsonl(p, 2)
    assert [r["step"] for r in read_metrics(p)] == [1, 2]
    log = MetricsLogger(tmp_path, tensorboard=False, progress_bar=False, start_step=1)
    log.log(2, {"loss": float("nan")})
    log.close()
    recs = read_metrics(p)
    assert [r["step"] for r in recs] == [1, 2] and recs[1]["loss"] == "nan"
