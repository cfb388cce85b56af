"""Every kernel, at the tiles and launch options a GPU uses for the networks' real channel counts, compiles for
Ampere (sm_80) and Hopper (sm_90) with zero spill bytes and every dot on tensor cores.

The interpreter accepts code a GPU rejects (dots under 16, out-of-bounds loads) and is blind to registers;
ptxas is not. This runs on CPU-only machines: Triton compiles to PTX and cubin without a device, and both
Triton's cache and gpu_compile's ptxas-report cache make a second run take seconds.

Fast path: C = 24/24 (Mobile U-Net), 256/256 (FANet) and 256/24 (teacher with student) in fp32 and bf16,
which reaches every kernel at both tile classes (channel counts ≤ 32 and above) on both arches. C = 64, 96
and 512 launch the same tile classes as 256 (the configs in launcher.py depend only on C ≤ 32), and fp16
differs from bf16 only in its loads; the `slow` sweep compiles those too.
"""
import pytest

from cocofast.kernels.gpu_compile import (
    ARCHS,
    DTYPES,
    PROBE_SPECS,
    PRODUCTION_PAIRS,
    check_all,
    compile_in_subprocess,
    problems,
)

FAST_PAIRS = ((24, 24), (256, 256), (256, 24))
KERNELS = {"row_norm_kernel", "channel_extrema_kernel", "gram_forward_kernel", "gram_backward_kernel",
           "maxpool_add_kernel", "chain_backward_kernel", "maxpool_scatter_kernel", "tiled_forward_kernel",
           "tiled_backward_kernel",
           "pixel_relation_forward_kernel", "pixel_relation_backward_kernel"}
DOT_KERNELS = {"gram_forward_kernel", "gram_backward_kernel", "tiled_forward_kernel", "tiled_backward_kernel",
               "pixel_relation_forward_kernel", "pixel_relation_backward_kernel"}


@pytest.fixture(scope="module")
def compiled():
    return check_all(pairs=FAST_PAIRS, dtypes=("float32", "bfloat16"))


def test_every_kernel_compiles_for_every_arch_at_both_tile_classes(compiled):
    seen = {(row["kernel"], row["arch"]) for row in compiled}
    assert seen == {(k, f"sm_{a}") for k in KERNELS for a in ARCHS}
    # Both channel classes (≤ 32 and the 64-wide tiles C = 256 uses) reach the GEMM kernels on each arch.
    for kernel, key in (("gram_forward_kernel", "BLOCK_C"), ("gram_backward_kernel", "CP1")):
        widths = {(r["arch"], r["constexprs"][key]) for r in compiled if r["kernel"] == kernel}
        assert {a for a, _ in widths} == {f"sm_{a}" for a in ARCHS} and len(widths) >= 2, (kernel, widths)


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


@pytest.mark.slow
def test_full_production_sweep():
    rows = check_all(pairs=PRODUCTION_PAIRS, dtypes=DTYPES)
    assert {r["dtype"] for r in rows} >= {"*fp32", "*fp16", "*bf16"}
    bad = [(r["kernel"], r["arch"], r["dtype"], p) for r in rows for p in problems(r)]
    assert not bad
