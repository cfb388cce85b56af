"""Every kernel, at the tiles, launch options and argument specialisation a GPU gets for the networks' real
channel counts, compiles for Ampere (sm_80) and Hopper (sm_90) with zero spill bytes and every dot on
tensor cores.

The interpreter accepts code a GPU rejects (dots under 16, out-of-bounds loads) and is blind to registers;
ptxas is not. This runs on CPU-only machines: Triton compiles to PTX and cubin without a device, and both
Triton's cache and gpu_compile's ptxas-report cache make a second run take seconds.

The launches are recorded at the production launch (B = 8 images of 256² maps: SPLITS = 11 at C = 24, 3 at
256) with Triton's JIT specialisation of that launch (integers equal to 1, such as the unit pixel stride,
compiled as constants; 16-divisible integers and aligned pointers with alignment hints), which the generic
signature does not show. Fast path: C = 24/24 (the ≤ 32 tile class), 64/64 (the backward's
32-row class) and 512/24 (the two-pass backward beside a narrow map), fp32, the kernels backend='triton'
(and 'auto' on CUDA) launches. Cold (an empty Triton cache) that is 24 compiles, about a minute on 2 shared
cores; warm, a few seconds (compile readings are cached by source hash). The `slow` sweep compiles every
path (the SS ablation's unmixed Gram, the tiled walk, CPKD's pixel relation), every production pair,
fp16 and bf16, and the small launch (B = 1, 8², SPLITS = 1): 528 compiles, 17 min on a shared 2-core machine
with the fast set already cached.
"""
import pytest

from cocofast.perf.gpu_compile import (
    ARCHS,
    DTYPES,
    PROBE_SPECS,
    PRODUCTION_PAIRS,
    PRODUCTION_SHAPES,
    UnreadableReport,
    check_all,
    compile_in_subprocess,
    parse_ptxas_log,
    problems,
    run_python,
)

FAST_PAIRS = ((24, 24), (64, 64), (512, 24))
GRAM_KERNELS = {"channel_extrema_kernel", "gram_forward_kernel", "gram_backward_kernel", "maxpool_add_kernel"}
KERNELS = {"row_norm_kernel", "channel_extrema_kernel", "gram_forward_kernel", "gram_backward_kernel",
           "maxpool_add_kernel", "chain_backward_kernel", "maxpool_scatter_kernel", "tiled_forward_kernel",
           "tiled_backward_kernel",
           "pixel_relation_forward_kernel", "pixel_relation_backward_kernel"}
DOT_KERNELS = {"gram_forward_kernel", "gram_backward_kernel", "tiled_forward_kernel", "tiled_backward_kernel",
               "pixel_relation_forward_kernel", "pixel_relation_backward_kernel"}


@pytest.fixture(scope="module")
def compiled():
    return check_all(pairs=FAST_PAIRS, dtypes=("float32",), shapes=((8, 256),), paths=("gram",))


def test_every_gram_kernel_compiles_for_every_arch_at_every_tile_class(compiled):
    seen = {(row["kernel"], row["arch"]) for row in compiled}
    assert seen == {(k, f"sm_{a}") for k in GRAM_KERNELS for a in ARCHS}
    for arch in (f"sm_{a}" for a in ARCHS):
        fwd = [r["constexprs"] for r in compiled if r["kernel"] == "gram_forward_kernel" and r["arch"] == arch]
        bwd = [r["constexprs"] for r in compiled if r["kernel"] == "gram_backward_kernel" and r["arch"] == arch]
        assert {c["BLOCK_C"] for c in fwd} == {32, 64}
        assert max(c["SPLITS"] for c in fwd) == 11  # the production row splits, not SPLITS = 1
        assert {c["BLOCK_N"] for c in bwd} == {64, 32, 16}  # C ≤ 32, 64, and 512's class
        assert any(c["TWO_PASS_1"] and not c["TWO_PASS_2"] for c in bwd)
    # The launch's own specialisation: the unit pixel stride is a constant, the pixel count aligned.
    for r in compiled:
        if r["kernel"] == "gram_forward_kernel":
            assert r["specialisation"]["a_stride_w"] == "1" and r["specialisation"]["n_pix"] == "D", r


def test_no_spills_and_every_dot_on_tensor_cores(compiled):
    bad = [(r["kernel"], r["arch"], r["dtype"], r["constexprs"], p) for r in compiled for p in problems(r)]
    assert not bad
    for r in compiled:
        assert (r["dots"] > 0) == (r["kernel"] in DOT_KERNELS), r
        if r["dots"]:
            assert {"HMMA", "HGMMA"} & set(r["mma"]), r
        assert r["ctas_per_sm"] >= 1, r


def test_the_guard_fails_on_a_spilling_kernel_and_an_fma_dot():
    rows = {r["kernel"]: r for r in compile_in_subprocess(PROBE_SPECS, archs=(90,))}
    spill = rows["spill_probe_kernel"]
    assert spill["spill_stores"] > 0 and spill["stack"] > 0
    assert any("spills" in p for p in problems(spill))
    fma = rows["fma_dot_probe_kernel"]
    assert fma["dots"] == 1 and fma["dots_on_mma"] == 0 and not fma["mma"]
    assert any("off the tensor cores" in p for p in problems(fma))


def test_a_missing_report_field_is_an_error_not_a_zero():
    log = "ptxas info    : Used 128 registers, 16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
    assert parse_ptxas_log(log) == {"registers": 128, "stack": 16, "spill_stores": 0, "spill_loads": 0}
    with pytest.raises(UnreadableReport, match="spill_loads"):
        parse_ptxas_log(log.replace(", 0 bytes spill loads", ""))


def test_help_does_not_start_the_sweep():
    out = run_python("import sys; from cocofast.perf.gpu_compile import main; sys.argv[1:] = ['--help']; main()",
                     None)
    assert "usage:" in out and "compiles" not in out


@pytest.mark.slow
def test_full_production_sweep():
    rows = check_all(pairs=PRODUCTION_PAIRS, dtypes=DTYPES, shapes=PRODUCTION_SHAPES)
    assert {r["dtype"] for r in rows} >= {"*fp32", "*fp16", "*bf16"}
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, f"sm_{a}") for k in KERNELS for a in ARCHS}
    for r in rows:
        assert (r["dots"] > 0) == (r["kernel"] in DOT_KERNELS), r
    bad = [(r["kernel"], r["arch"], r["dtype"], p) for r in rows for p in problems(r)]
    assert not bad
