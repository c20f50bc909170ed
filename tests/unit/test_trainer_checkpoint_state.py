import random

import numpy as np
import pytest
import torch

from megatron_copsd.checkpoint.state import (
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    resolve_resume,
    restore_rng_state,
    save_training_state,
)


def test_save_keep_last_and_resume(tmp_path):
    for step in (1, 2, 3):
        save_training_state(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    path = resolve_resume("auto", tmp_path)
    assert path.name == "step_3"
    st = load_training_state(path)
    assert st["step"] == 3 and st["w"][0].item() == 3.0
    assert resolve_resume("none", tmp_path) is None
    with pytest.raises(ValueError, match="checkpoint.resume"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_crash_mid_save_leaves_previous(tmp_path, monkeypatch):
    save_training_state(tmp_path, 1, {"v": 1})
    real = torch.save

    def boom(obj, f, *a, **k):
        real(obj, f, *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_training_state(tmp_path, 2, {"v": 2})
    monkeypatch.setattr(torch, "save", real)
    assert (tmp_path / "step_2.tmp").exists() and not (tmp_path / "step_2").exists()
    assert latest_checkpoint(tmp_path).name == "step_1"
    assert load_training_state(latest_checkpoint(tmp_path))["v"] == 1
    save_training_state(tmp_path, 2, {"v": 2})  # a later save of the same step replaces the leftover
    assert latest_checkpoint(tmp_path).name == "step_2" and not (tmp_path / "step_2.tmp").exists()


def test_rng_roundtrip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
