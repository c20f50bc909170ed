"""Every Triton kernel x autotune configuration compiles ahead of time for Hopper (sm_90, no GPU needed):
the GEMM tiles use wgmma, shared memory fits 227 KB and `ptxas -v` reports no register spills."""
import pytest

pytestmark = pytest.mark.kernels

aot = pytest.importorskip("copsd_kernels.aot", reason="triton is not installed")
CASES = [(name, fn, cfg, extra) for name, fn, cfgs, extra in aot.VARIANTS for cfg in cfgs]


@pytest.mark.parametrize("name,fn,cfg,extra", CASES,
                         ids=[f"{c[0]}-T{c[2]['BLOCK_T']}V{c[2]['BLOCK_V']}w{c[2]['num_warps']}" for c in CASES])
def test_kernel_config_compiles_for_hopper(name, fn, cfg, extra):
    if aot.ptxas_path() is None:
        pytest.skip("the triton wheel ships no ptxas: cannot compile or count registers")
    r = aot.compile_variant(name, fn, cfg, extra)
    assert r.wgmma, f"{name} {r.config}: no wgmma in the PTX (GEMM tiles not on Hopper tensor cores)"
    assert r.shared_bytes <= aot.SHARED_LIMIT, f"{name} {r.config}: {r.shared_bytes} B shared memory"
    assert r.registers is not None and r.spill_bytes is not None, "could not parse ptxas -v output"
    assert r.spill_bytes == 0, f"{name} {r.config}: {r.spill_bytes} bytes of register spills"
    assert r.num_warps == cfg["num_warps"]
