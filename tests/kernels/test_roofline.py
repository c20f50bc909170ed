"""The roofline model (kernels/roofline.py): pass lists that count what the code does, the issue's
target for the shipped store mode, and the tile constants it uses equal what kernels/aot.py compiles.
What it cannot prove: that a GPU reaches the assumed efficiencies (`bench-kernels --model` on a GPU prints
measured next to predicted)."""
import pytest

from copsd_kernels import roofline as rf

pytestmark = pytest.mark.kernels
HEAD = (16384, 4096, 151936)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("dev", rf.DEVICES, ids=lambda d: d.name.split()[0])
def test_store_mode_predicts_at_least_70_percent_of_the_4_gemm_roofline(kind, dev):
    eff = rf.Efficiency()
    floor = rf.four_gemm_floor(*HEAD, dev, eff)
    store = rf.store_model(*HEAD, kind)
    assert store.flop() == 8 * HEAD[0] * HEAD[1] * HEAD[2]  # exactly the 4 GEMMs: nothing recomputed
    t = store.time(dev, eff)
    print(f"{dev.name} {kind}: store {t * 1e3:.1f} ms vs roofline {floor * 1e3:.1f} ms = {floor / t:.1%}")
    assert floor / t >= 0.70
    # the recompute mode does 8 GEMM-equivalents (stats, cancellation-free sums, grad: 2 each; dH, dW) and is
    # predicted slower
    rec = rf.recompute_model(*HEAD, kind, dev, eff)
    assert rec.flop() == 16 * HEAD[0] * HEAD[1] * HEAD[2]
    assert rec.time(dev, eff) > t


def test_roofline_matches_the_documented_table():
    # docs/kernels.md: H=4096, TP=1 -> 103.3 ms at 790 TF/s; H=2560 -> 64.5 ms; TP=8 -> 12.9 ms
    eff = rf.Efficiency()
    assert rf.four_gemm_floor(*HEAD, rf.H100, eff) == pytest.approx(0.1033, rel=0.01)
    assert rf.four_gemm_floor(16384, 2560, 151936, rf.H100, eff) == pytest.approx(0.0645, rel=0.01)
    assert rf.four_gemm_floor(16384, 4096, 151936 // 8, rf.H100, eff) == pytest.approx(0.0129, rel=0.01)


def test_model_bytes_follow_the_store_chunk():
    """A smaller memory budget means more chunks, so more W re-reads and fp32 dW read-modify-writes."""
    big = rf.store_model(*HEAD, "forward_kl", memory_budget=6 * 2 ** 30)
    small = rf.store_model(*HEAD, "forward_kl", memory_budget=2 ** 30)
    assert small.bytes() > big.bytes()
    assert small.extra_memory_bytes < big.extra_memory_bytes
    with pytest.raises(ValueError, match="memory_budget"):
        rf.store_model(*HEAD, "forward_kl", memory_budget=10 ** 6)


def test_tile_constants_equal_the_aot_compile():
    aot = pytest.importorskip("copsd_kernels.aot", reason="triton is not installed")
    if aot.ptxas_path() is None:
        pytest.skip("no ptxas in the triton wheel")
    from copsd_kernels import divergence_triton as dt
    from copsd_kernels.triton_common import STATS_CONFIGS
    r = aot.compile_variant("div_stats", dt._div_stats_kernel, STATS_CONFIGS[0],
                            {"SHARED_W": True, "GROUP": dt.GROUP_T}, aot._recompute_args, True)
    cfg = rf.TileConfig()
    assert (cfg.block_t, cfg.block_v, cfg.block_h, cfg.num_warps) == tuple(
        STATS_CONFIGS[0][k] for k in ("BLOCK_T", "BLOCK_V", "BLOCK_H", "num_warps"))
    assert (cfg.registers, cfg.shared_bytes, cfg.wgmma_n) == (r.registers, r.shared_bytes, r.min_wgmma_n)


def test_cli_model_prints_both_devices(capsys):
    from copsd_kernels import bench
    assert bench.main(["--model", "--mode", "cpu", "--divergence", "jsd"]) == 0
    out = capsys.readouterr().out
    assert "H100" in out and "H200" in out and "store" in out and "liger" in out and "% of roofline" in out
