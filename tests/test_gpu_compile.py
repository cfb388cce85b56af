"""Every kernel, at the tile sizes a GPU launch uses, compiles for Ampere (sm_80) and Hopper (sm_90).

The interpreter accepts code a GPU rejects (dots under 16, out-of-bounds loads); ptxas does not. This
runs on CPU-only machines: Triton compiles to PTX and cubin without a device.
"""
import pytest

from cocofast.kernels.gpu_compile import ARCHS, check_all

KERNELS = {"row_norm_kernel", "gram_partial_kernel", "chain_backward_kernel", "maxpool_scatter_kernel",
           "tiled_forward_kernel", "tiled_backward_kernel"}
# Kernels whose inner products are tl.dot and must land on tensor cores (HMMA / HGMMA).
DOT_KERNELS = {"gram_partial_kernel", "tiled_forward_kernel", "tiled_backward_kernel"}


@pytest.fixture(scope="module")
def compiled():
    return check_all(dtypes=("float32", "bfloat16"))


def test_every_kernel_compiles_for_every_arch(compiled):
    seen = {(row["kernel"], row["arch"]) for row in compiled}
    assert seen == {(k, f"sm_{a}") for k in KERNELS for a in ARCHS}


def test_no_register_spills(compiled):
    spills = [(r["kernel"], r["arch"], r["constexprs"]) for r in compiled if r["spill_bytes"] > 0]
    assert not spills


def test_dots_use_tensor_cores(compiled):
    for row in compiled:
        if row["kernel"] in DOT_KERNELS:
            assert row["tensor_core"], row
    chain = [r for r in compiled if r["kernel"] == "chain_backward_kernel" and not r["constexprs"]["FROM_BUFFER"]]
    assert chain and all(r["tensor_core"] for r in chain)
