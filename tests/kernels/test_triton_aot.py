"""Every Triton kernel x shipped configuration compiles ahead of time for Hopper (sm_90a, no GPU needed),
specialized exactly as a launch at the headline shape would be (kernels/aot.py runs triton's own JIT
binder on the launch arguments): 0 register spills, shared memory within 227 KB, wgmma with N >= 128 on
the GEMM-like kernels, 64-bit row offsets wherever a [T_c, V_local] buffer is addressed (store-mode row
kernels, the recompute dZ stores). Registers / shared memory per
config are printed (pytest -s). What this cannot prove: speed, or that the driver will schedule the cubin
as ptxas predicts."""
import pytest
import torch

pytestmark = pytest.mark.kernels

aot = pytest.importorskip("copsd_kernels.aot", reason="triton is not installed")
# ~3-10 s per compile + ptxas here: by default the first config of every recompute kernel and of the store
# row kernels with the most live values (row_lse, JSD with the per-entry clip); of the recompute per-entry clip
# variants only the JSD ones (aot.SLOW_VARIANTS); the rest are marked slow.
DEFAULT_ROW = {"row_lse", "row_sums[KIND=2,CLIP=True]", "row_grad[KIND=2,CLIP=True]"}
CASES = [pytest.param(v, cfg, marks=[pytest.mark.slow] if i or (not v[5] and v[0] not in DEFAULT_ROW)
                      or v[0] in aot.SLOW_VARIANTS else [],
                      id=f"{v[0]}-" + "x".join(str(x) for k, x in cfg.items() if k.startswith("BLOCK"))
                         + f"w{cfg['num_warps']}s{cfg['num_stages']}")
         for v in aot.VARIANTS for i, cfg in enumerate(v[2])]


@pytest.mark.parametrize("variant,cfg", CASES)
def test_shipped_config_compiles_for_hopper(variant, cfg):
    if aot.ptxas_path() is None:
        pytest.skip("the triton wheel ships no ptxas: cannot compile or count registers")
    name, fn, _, extra, make_args, gemm = variant
    r = aot.compile_variant(name, fn, cfg, extra, make_args, gemm)
    print(f"\n{aot.format_table([r])}")
    assert r.problems() == [], f"{name} {r.config}: {r.problems()}"
    assert r.num_warps == cfg["num_warps"]
    pointers = sum(1 for a in fn.arg_names if a.endswith("_ptr"))
    assert r.divisible_args > pointers, "the launch specialization (tt.divisibility=16) was not applied"
    if gemm:
        assert r.min_wgmma_n >= aot.MIN_WGMMA_N
    if "SHARED_W" in extra:  # the autotuner's shared-memory pruning counts what triton allocates
        from copsd_kernels.triton_common import pair_shared_bytes
        assert r.shared_bytes == pair_shared_bytes(cfg, extra["SHARED_W"])
    if not gemm or "grad" in name:  # kernels that address [T_c, V_local] buffers (can exceed 2^31 elements)
        assert r.int64_offsets, "row offsets are not computed in 64-bit"


def test_separate_teacher_head_launches_only_configs_that_fit_shared_memory():
    """With a separate teacher head (SHARED_W=False) a pipeline stage holds 4 bf16 tiles: the 4-stage config
    would need 256 KB (> 227 KB). The autotuners prune it at launch, and the AOT variants compile exactly the
    configs that remain."""
    from copsd_kernels import divergence_triton as dt
    from copsd_kernels import triton_common as tc
    assert tc.pair_shared_bytes(tc.STATS_CONFIGS[1], False) == 256 * 1024 > tc.SHARED_LIMIT
    for tuned in (dt._stats_tuned, dt._sums_tuned, dt._grad_tuned):
        assert tuned.early_config_prune is tc._prune_pair  # what Autotuner.prune_configs calls with the launch kwargs
        assert [c.num_stages for c in tc._prune_pair(tuned.configs, {}, SHARED_W=False)] == [3]
        assert [c.num_stages for c in tc._prune_pair(tuned.configs, {}, SHARED_W=True)] == [3, 4]
    configs = {v[0]: v[2] for v in aot.VARIANTS}
    assert [c["num_stages"] for c in configs["div_stats[SHARED_W=False]"]] == [3]
    assert [c["num_stages"] for c in configs["div_grad[KIND=2,CLIP=True,SHARED_W=False]"]] == [3]
    assert [c["num_stages"] for c in configs["div_sums[KIND=2,CLIP=True]"]] == [3, 4]


def test_tile_convert_rule_counts_fp32_tile_conversions_only():
    """The `cvt` rule (aot.tile_converts) on TTGIR lines: an fp32 [128, 32] tile converted from the wgmma-derived
    linear layout counts; the row-sum vectors and the bf16 dZ store conversions do not."""
    tile = "%5 = ttg.convert_layout %4 : tensor<128x32xf32, #linear> -> tensor<128x32xf32, #blocked1> loc(#l)"
    row = "%6 = ttg.convert_layout %3 : tensor<128xf32, #ttg.slice<{dim = 1, parent = #linear}>> -> tensor<128xf32, #b>"
    dz = "%25 = ttg.convert_layout %24 : tensor<128x32xbf16, #linear> -> tensor<128x32xbf16, #blocked1>"
    assert aot.tile_converts("\n".join([tile, row, dz, tile])) == 2
    assert aot.tile_converts("\n".join([row, dz])) == 0


def test_specialization_follows_the_launch_arguments():
    """The attrs come from the actual arguments, as at launch: an odd token count or row stride is not
    marked divisible by 16, the multiples of 16 and the (aligned) pointers are."""
    from copsd_kernels import divergence_triton as dt
    args = list(aot._recompute_args(dt._div_stats_kernel, T=4097, H=4096, V=151936))
    src = aot.jit_source(dt._div_stats_kernel, args, dict(SHARED_W=True, GROUP=8, BLOCK_T=128, BLOCK_V=128,
                                                          BLOCK_H=64, UPCAST_DOT=False))
    names = dt._div_stats_kernel.arg_names
    marked = {names[k[0]] for k, v in src.attrs.items() if ["tt.divisibility", 16] in v}
    assert {"HS_ptr", "W_ptr", "STATS_ptr", "NV", "H", "stride_x"} <= marked
    assert "T" not in marked and "inv_tau" not in marked
    assert src.constants[(names.index("BLOCK_T"),)] == 128


def test_int32_offsets_would_overflow_at_the_store_chunk():
    """Why the row kernels need int64: one stored chunk at the headline shape spans more than 2^31 fp32
    elements ([2 T_c, V_local] = 2 x 2048 x 151,936 = 6.2e8 -- and with a 12 GiB budget 2.5e9)."""
    from copsd_kernels import divergence_store as ds
    tc = ds.store_chunk_tokens(16384, 151936, torch.bfloat16, 12 * 2 ** 30)
    assert 2 * tc * 151936 > 2 ** 31
