"""tools/memory_table.py: the arithmetic that turns 1- and 2-layer dry runs into full-depth cells (the dry
runs themselves are tested in test_dry_run.py)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("memory_table", ROOT / "tools" / "memory_table.py")
mt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mt)
GB = 1024 ** 3


def _run(layers, phases):
    return dict(model="Qwen3-8B", tp=4, response=2048, recompute="none", layers=layers, per_mb=5, seconds=1.0,
                peak=max(sum(b.values()) for b in phases.values()), breakdown={}, phase_peaks=phases)


def test_each_phase_is_extrapolated_and_the_largest_wins():
    # teacher pass: a 10 GiB transient that does not grow with depth; student pass: 1 GiB per layer
    one = _run(1, {"teacher-pass outputs": {"weights": 1 * GB, "teacher-pass outputs": 10 * GB},
                   "activations": {"weights": 1 * GB, "optimizer state": 2 * GB, "activations": 1 * GB}})
    two = _run(2, {"teacher-pass outputs": {"weights": 2 * GB, "teacher-pass outputs": 10 * GB},
                   "activations": {"weights": 2 * GB, "optimizer state": 4 * GB, "activations": 2 * GB}})
    cell = mt.combine([one, two])[("Qwen3-8B", 4, 2048, "none")]
    assert cell["phase"] == "activations"  # 36 layers: 36 + 72 + 36 GiB beats 36 + 10
    extra = (16 - 5) * 2048 * 4096 * 2  # teacher hidden states of the step's other sequences on this rank
    assert cell["peak_on"] == (36 + 72 + 36) * GB + extra
    assert cell["peak_off"] == cell["peak_on"] + 72 * GB * (2 - 1)  # DP = 8 / 4: the unsharded state


def test_render_marks_fit_and_missing_cells():
    one = _run(1, {"activations": {"weights": GB}})
    two = _run(2, {"activations": {"weights": 2 * GB}})
    text = mt.render(mt.combine([one, two]))
    assert "| Qwen3-8B | 4 | 2 | 2048 | none | 36.2 | yes |" in text  # 36 GiB + 0.17 GiB of teacher outputs
    assert "| Qwen3-1.7B | 1 | 8 | 2048 | none | not run |" in text
