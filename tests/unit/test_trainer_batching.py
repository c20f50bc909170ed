import pytest
import torch

from megatron_copsd.batching import TrainItem, collate, gather_response_hidden, pack_microbatches, shard_for_dp


def _item(i, ps, pt, r):
    return TrainItem(list(range(10, 10 + ps)), list(range(50, 50 + pt)), list(range(100, 100 + r)),
                     rollout_logprobs=[-0.5] * r, advantage=float(i), index=i)


def test_alignment_student_teacher_positions():
    items = [_item(0, 3, 5, 4), _item(1, 2, 6, 2)]
    mb = collate(items, pad_id=0)
    # student row 0: 3 prompt + 4 response - 1 = 6 inputs; response positions 2..5
    assert mb.student.tokens.shape == (2, 6) and mb.teacher.tokens.shape == (2, 8)
    assert mb.student.resp_pos_idx.tolist() == [2, 3, 4, 5, 1, 2]
    assert mb.teacher.resp_pos_idx.tolist() == [4, 5, 6, 7, 5, 6]
    assert mb.student.resp_batch_idx.tolist() == [0, 0, 0, 0, 1, 1]
    assert mb.targets.tolist() == [100, 101, 102, 103, 100, 101]
    # the token at a response position is the one *before* the target (next-token prediction)
    s_in = mb.student.tokens[mb.student.resp_batch_idx, mb.student.resp_pos_idx].tolist()
    assert s_in == [12, 100, 101, 102, 11, 100]
    t_in = mb.teacher.tokens[mb.teacher.resp_batch_idx, mb.teacher.resp_pos_idx].tolist()
    assert t_in == [54, 100, 101, 102, 55, 100]
    assert mb.advantages.tolist() == [0, 0, 0, 0, 1, 1] and mb.has_rollout_logprobs
    hidden = torch.arange(8 * 2 * 3, dtype=torch.float32).view(8, 2, 3)  # [s, b, h]
    rows = gather_response_hidden(hidden, mb.teacher)
    assert torch.equal(rows[0], hidden[4, 0]) and torch.equal(rows[5], hidden[6, 1])


def test_pack_budget_and_dp_shard():
    items = [_item(i, 3 + i % 3, 4, 2 + i) for i in range(9)]
    mbs = pack_microbatches(items, token_budget=30)
    assert sorted(it.index for mb in mbs for it in mb) == list(range(9))
    for mb in mbs:
        assert len(mb) == 1 or max(it.cost for it in mb) * len(mb) <= 30
    shards = [shard_for_dp(items, r, 2) for r in range(2)]
    assert sorted(it.index for s in shards for it in s) == list(range(9))
    loads = [sum(it.cost for it in s) for s in shards]
    assert abs(loads[0] - loads[1]) <= max(it.cost for it in items)
    with pytest.raises(ValueError, match="empty response"):
        TrainItem([1], [1], [])
