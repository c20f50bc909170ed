"""The Megatron knobs change how a step is computed, not what it computes: the same 2-step tiny COPSD run
(real loop, embedded rollouts, one process on gloo) with full recomputation, the distributed optimizer and
overlapped gradient reduce / parameter gather gives the losses of the plain run. The second step's loss
depends on the first update, so a missing parameter gather or an unreduced gradient would show.

What CPU cannot prove: the overlap itself (gloo runs the bucket collectives, a GPU overlaps them) and the
memory the recomputation saves (the dry run measures that).
"""
import pytest

from tests.e2e.test_train_tiny import run_tiny

pytestmark = pytest.mark.e2e

COMMON = ["eval.every=-1", "checkpoint.save_every=0", "checkpoint.export_hf=false", "objective.teacher=ema",
          "objective.ema_decay=0.5"]


def test_recompute_and_overlap_match_the_plain_run(tmp_path):
    _, plain = run_tiny(tmp_path, "plain", COMMON)
    knobs = ["parallel.recompute=full", "parallel.recompute_num_layers=1", "parallel.use_distributed_optimizer=true",
             "parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true", "parallel.bucket_size=5000"]
    _, tuned = run_tiny(tmp_path, "tuned", COMMON + knobs)
    assert [r["step"] for r in tuned] == [1, 2]
    for a, b in zip(plain, tuned):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert plain[1]["loss"] != plain[0]["loss"]  # the second step really saw the first update
