"""checkpoint/state.py on a real one-process gloo group and real megatron-core dist_checkpointing:
atomic step folders, keep-last-N, async save + finalize, refusal of partial / damaged folders, RNG."""
import json
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_copsd.checkpoint.state import (
    MARKER,
    CheckpointWriter,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_rng,
    load_sharded,
    resolve_resume,
    restore_rng_state,
    validate_checkpoint,
)


@pytest.fixture
def group():
    from megatron_copsd.megatron.cpu_compat import enable_cpu_compat

    enable_cpu_compat()  # what init_distributed does on a machine without CUDA
    if dist.is_initialized():
        pytest.skip("a process group is already live in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sd(value: float, step: int) -> dict:
    from megatron.core.dist_checkpointing import ShardedTensor

    w = torch.full((4, 3), value)
    return {"w": ShardedTensor.from_rank_offsets("w", w, replica_id=0), "common": {"step": step}}


def _load(path) -> tuple[torch.Tensor, int]:
    from megatron.core.dist_checkpointing import ShardedTensor

    out = load_sharded(path, {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4, 3), replica_id=0)})
    return out["w"], out["common"]["step"]


@pytest.mark.parametrize("async_save", [False, True])
def test_save_keep_last_resume_and_log(tmp_path, group, async_save):
    records = []
    writer = CheckpointWriter(tmp_path, keep_last=2, async_save=async_save, on_complete=records.append)
    for step in (1, 2, 3):
        writer.save(step, _sd(float(step), step), {"rng": capture_rng_state()}, meta={"tp": 1})
        if async_save and step == 3:
            assert writer.pending == 3 and latest_checkpoint(tmp_path).name == "step_2"  # not final yet
    writer.wait()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert not list(tmp_path.glob("*.tmp"))
    path = resolve_resume("auto", tmp_path)
    assert path.name == "step_3"
    w, step = _load(path)
    assert step == 3 and torch.equal(w, torch.full((4, 3), 3.0))
    meta = validate_checkpoint(path)
    assert meta["tp"] == 1 and meta["save"]["async"] is async_save and meta["save"]["bytes"] > 0
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["mb_per_s"] > 0 for r in records)
    assert resolve_resume("none", tmp_path) is None
    with pytest.raises(ValueError, match="checkpoint.resume"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_crash_mid_save_leaves_previous(tmp_path, group, monkeypatch):
    writer = CheckpointWriter(tmp_path)
    writer.save(1, _sd(1.0, 1), {"rng": capture_rng_state()})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(CheckpointWriter, "_finalize", boom)
    with pytest.raises(OSError):
        writer.save(2, _sd(2.0, 2), {"rng": capture_rng_state()})
    monkeypatch.undo()
    assert (tmp_path / "step_2.tmp").exists() and not (tmp_path / "step_2").exists()
    assert resolve_resume("auto", tmp_path).name == "step_1"
    assert _load(latest_checkpoint(tmp_path))[1] == 1
    writer.save(2, _sd(2.0, 2), {"rng": capture_rng_state()})  # a later save of the same step replaces the leftover
    assert latest_checkpoint(tmp_path).name == "step_2" and not (tmp_path / "step_2.tmp").exists()


def test_partial_or_damaged_checkpoint_is_refused_naming_the_file(tmp_path, group):
    CheckpointWriter(tmp_path).save(1, _sd(1.0, 1), {"rng": capture_rng_state()})
    path = tmp_path / "step_1"
    shard = next(p for p in path.iterdir() if p.name.endswith(".distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])  # truncated shard
    with pytest.raises(ValueError, match=f"damaged: {shard}"):
        resolve_resume(str(path), tmp_path)
    shard.unlink()  # missing shard
    with pytest.raises(ValueError, match=f"missing file {shard}"):
        resolve_resume("auto", tmp_path)
    shard.write_bytes(data)
    (path / "rng" / "rank_00000.pt").unlink()
    with pytest.raises(ValueError, match="rank_00000.pt"):
        load_sharded(path, {})
    (path / MARKER).write_text("{not json")
    with pytest.raises(ValueError, match=f"bad completion marker {path / MARKER}"):
        validate_checkpoint(path)
    (path / MARKER).unlink()
    with pytest.raises(ValueError, match=f"incomplete: missing {path / MARKER}"):
        resolve_resume(str(path), tmp_path)
    assert resolve_resume("auto", tmp_path) is None  # without its marker the folder is not a checkpoint


def test_rng_roundtrip_and_per_rank_files(tmp_path, group):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2))
    CheckpointWriter(tmp_path).save(1, _sd(1.0, 1), {"rng": state, "tp_rank": 0})
    rec, exact = load_rng(tmp_path / "step_1", 0)
    assert exact and rec["tp_rank"] == 0
    restore_rng_state(rec["rng"])
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert load_rng(tmp_path / "step_1", 3)[1] is False  # more ranks than the saving run: rank 0's state
    assert json.loads((tmp_path / "step_1" / MARKER).read_text())["world_size"] == 1
