"""Every Triton kernel x autotune configuration compiles ahead of time for Hopper (sm_90, no GPU needed):
the GEMM tiles use wgmma, shared memory fits 227 KB and `ptxas -v` reports no register spills."""
import pytest

pytestmark = pytest.mark.kernels

aot = pytest.importorskip("copsd_kernels.aot", reason="triton is not installed")
# ~5 s per compile + ptxas here: the first config of every kernel runs by default, the rest are marked slow.
CASES = [pytest.param(name, fn, cfg, extra, marks=[pytest.mark.slow] if i else [],
                      id=f"{name}-T{cfg['BLOCK_T']}V{cfg['BLOCK_V']}H{cfg['BLOCK_H']}w{cfg['num_warps']}")
         for name, fn, cfgs, extra in aot.VARIANTS for i, cfg in enumerate(cfgs)]


@pytest.mark.parametrize("name,fn,cfg,extra", CASES)
def test_kernel_config_compiles_for_hopper(name, fn, cfg, extra):
    if aot.ptxas_path() is None:
        pytest.skip("the triton wheel ships no ptxas: cannot compile or count registers")
    r = aot.compile_variant(name, fn, cfg, extra)
    assert r.wgmma, f"{name} {r.config}: no wgmma in the PTX (GEMM tiles not on Hopper tensor cores)"
    assert r.shared_bytes <= aot.SHARED_LIMIT, f"{name} {r.config}: {r.shared_bytes} B shared memory"
    assert r.registers is not None and r.spill_bytes is not None, "could not parse ptxas -v output"
    assert r.spill_bytes == 0, f"{name} {r.config}: {r.spill_bytes} bytes of register spills"
    assert r.num_warps == cfg["num_warps"]
