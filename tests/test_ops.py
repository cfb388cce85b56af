"""The shared ops floor: backend tables and their validator, input checks, the CPU gram path's pieces and
the roofline model behind backend='auto' and its reports."""
import numpy as np
import pytest
import torch

import cocofast
from cocofast.ops.backends import BACKEND_TABLES, PIXEL_RELATION_BACKENDS, SIMILARITY_BACKENDS, check_backend
from cocofast.ops.checks import check_map, largest_safe_magnitude
from cocofast.ops.pixel_relation import pixel_relation_kl
from cocofast.ops.similarity import auto
from cocofast.ops.similarity.gram_torch import TorchGramStats, max_positions
from cocofast.perf.roofline import breakdown, walk_steps
from reference import features
from reference import phi as ref_phi


def test_backend_tables_are_what_the_ops_dispatch_on():
    assert cocofast.BACKENDS == SIMILARITY_BACKENDS and BACKEND_TABLES["similarity"] == SIMILARITY_BACKENDS
    assert "chunked" in PIXEL_RELATION_BACKENDS and "chunked" not in SIMILARITY_BACKENDS
    for family, table in BACKEND_TABLES.items():
        for name in table:
            assert check_backend(family, name) == name


def test_check_backend_lists_the_valid_names():
    with pytest.raises(ValueError) as err:
        check_backend("pixel_relation", "gram")
    assert "pixel_relation backend must be one of naive, chunked, triton, auto; got 'gram'" in str(err.value)
    with pytest.raises(ValueError, match="similarity backend must be one of naive, gram, triton, tiled, auto"):
        check_backend("similarity", "chunked")
    with pytest.raises(ValueError, match="op_family must be one of similarity, pixel_relation; got 'cmss'"):
        check_backend("cmss", "gram")


def test_finite_but_huge_features_are_named_as_overflow_not_nan():
    huge = torch.full((1, 4, 3, 3), 1e38)
    for call in (lambda: cocofast.cross_layer_correlation(huge, huge, backend="gram"),
                 lambda: pixel_relation_kl(huge, huge, backend="chunked")):
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert "NaN" not in msg and "Inf" not in msg, msg
        assert "too large" in msg and "overflows" in msg and "1e+38" in msg and "(1, 4, 3, 3)" in msg, msg
    # Just inside the limit the row norms stay finite: φ matches the float64 reference at that scale, and
    # the unmixed distance (scale-invariant: rows are normalised, no softmax of magnitudes) its value at 1.
    f1, f2 = features(1, 2, 24, 5, 5, torch.float32), features(2, 2, 40, 5, 5, torch.float32)
    big1 = f1 * (0.5 * largest_safe_magnitude(24, torch.float32) / f1.abs().max())
    big2 = f2 * (0.5 * largest_safe_magnitude(40, torch.float32) / f2.abs().max())
    got = cocofast.cross_layer_correlation(big1, big2, backend="gram")
    assert np.allclose(got.numpy(), ref_phi(big1.double().numpy(), big2.double().numpy()), rtol=1e-5)
    d_big = cocofast.similarity_distance(big1, big2, channel_mix=False, backend="gram")
    d_one = cocofast.similarity_distance(f1, f2, channel_mix=False, backend="gram")
    assert abs(d_big.item() - d_one.item()) <= 1e-5 * d_one.item()


def test_nan_and_inf_are_still_told_apart():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="contains NaN"):
        check_map("op", "feat", x.index_fill(1, torch.tensor([2]), float("nan")))
    with pytest.raises(ValueError, match="contains Inf"):
        check_map("op", "feat", x.index_fill(1, torch.tensor([0]), -float("inf")))
    check_map("op", "feat", torch.full((1, 3, 4, 4), 1e4, dtype=torch.float16))  # fp16 accumulates in fp32


@pytest.mark.parametrize("n", [64, 100, 4096 + 37])
def test_max_positions_finds_every_tie(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(6, n, generator=g)
    x[1] = 0.0                          # a dead channel: every pixel ties
    x[2, [3, n - 1]] = 9.0              # a tie across the ragged tail
    x[3, :5] = x[3].max()               # ties inside one span
    amax = x.amax(dim=1)
    chan, pix = max_positions(x, amax)
    want = (x == amax[:, None]).nonzero()
    got = torch.stack([chan, pix], 1)
    assert torch.equal(got[torch.argsort(got[:, 0] * n + got[:, 1])], want)


def test_gram_gradients_across_many_pixel_blocks_match_float64(monkeypatch):
    """The CPU path walks pixels in blocks; a tiny block budget forces several, ragged last one included."""
    import cocofast.ops.similarity.gram_torch as gt

    monkeypatch.setattr(gt, "_BLOCK_BYTES", 1)  # → the 1,024-pixel minimum
    f1 = features(3, 2, 24, 40, 61, torch.float32).clamp_min(0).requires_grad_(True)  # N = 2,440
    f2 = features(4, 2, 40, 61, 40, torch.float32).requires_grad_(True)
    assert gt.pixel_block(40 * 61, 64, f1.device) == 1024
    phi = cocofast.cross_layer_correlation(f1, f2, backend="gram")
    grads = torch.autograd.grad((phi * torch.tensor([0.7, 1.3])).sum(), [f1, f2])
    x1, x2 = (f.detach().double().requires_grad_(True) for f in (f1, f2))
    want = torch.autograd.grad((cocofast.cross_layer_correlation(x1, x2, backend="naive")
                                * torch.tensor([0.7, 1.3], dtype=torch.float64)).sum(), [x1, x2])
    for g, w in zip(grads, want):
        assert ((g.double() - w).norm() / w.norm()).item() < 1e-4


def test_roofline_is_the_max_of_bandwidth_and_compute():
    gpu = auto.GPUS["H100"]
    memory_bound = auto.Step("stream", bytes=3.35e9, flops=1e9, math="fp32")
    compute_bound = auto.Step("gemm", bytes=1e6, flops=67e12, math="fp32")
    assert auto.step_time(memory_bound, gpu) == pytest.approx(1e-3)
    assert auto.step_time(compute_bound, gpu) == pytest.approx(1.0)
    assert auto.step_time(auto.Step("dot", 0, 494.7e12 / 3, "tf32x3"), gpu) == pytest.approx(1.0)
    assert auto.modelled_time([memory_bound, compute_bound], gpu) == pytest.approx(1.001)
    with pytest.raises(ValueError, match="math must be one of"):
        gpu.peak("fp8")
    report = breakdown([memory_bound, compute_bound], gpu)
    assert report["memory_s"] == pytest.approx(1e-3 + 1e6 / 3.35e12)
    assert report["compute_s"] == pytest.approx(1e9 / 67e12 + 1.0)
    assert report["modelled_s"] == pytest.approx(1.001) and report["bound"] == "compute"
    assert report["bytes"] == 3.35e9 + 1e6 and report["math"] == "fp32"


def test_the_walk_steps_count_the_n_squared_dots():
    fwd, bwd = walk_steps("pixel_relation", 2, 100, 24, 8, forward_bytes=1.0, backward_bytes=2.0)
    assert fwd.flops == 2 * 2 * 100 * 100 * 32 and bwd.flops == fwd.flops + 2 * 2 * 100 * 100 * 8
    assert (fwd.bytes, bwd.bytes, fwd.math) == (1.0, 2.0, "tf32x3")
    assert walk_steps("tiled", 2, 100, 24, 8, 1.0, 2.0)[1].flops == 3 * fwd.flops
    with pytest.raises(ValueError, match="path must be"):
        walk_steps("gram", 2, 100, 24, 8, 1.0, 2.0)


def test_faster_backend_picks_the_least_time_and_the_first_on_a_tie():
    assert auto.faster_backend({"triton": 2.0, "gram": 1.0}) == "gram"
    assert auto.faster_backend({"triton": 1.0, "gram": 1.0}) == "triton"
    with pytest.raises(ValueError, match="empty"):
        auto.faster_backend({})


def test_auto_follows_the_model():
    f = torch.randn(2, 24, 8, 8)
    assert auto.similarity_auto_backend(f, f) == "gram"  # off CUDA, whatever the model says
    gpu = auto.GPUS["A100"]
    shape = (8, 65_536, 256, 256)
    fused = auto.modelled_time(auto.triton_gram_steps(*shape), gpu)
    eager = auto.modelled_time(auto.gram_torch_steps(*shape, matmul_math="fp32"), gpu)
    assert fused < eager  # fp32 GEMMs on SIMT units against tf32x3 tensor cores, and fewer passes
    # A fused kernel that moved 10× the bytes would lose at small C, where both paths are memory-bound.
    heavy = auto.triton_gram_steps(8, 65_536, 24, 24, forward_bytes=10 * 8 * 65_536 * 48 * 4 * 15)
    small = auto.gram_torch_steps(8, 65_536, 24, 24, matmul_math="fp32")
    assert auto.modelled_time(heavy, gpu) > auto.modelled_time(small, gpu)
    assert auto.gpu_spec("NVIDIA A100-SXM4-80GB") is gpu and auto.gpu_spec("Tesla T4").name == "H100 SXM"


def test_the_fused_forward_reads_its_maps_twice_unless_they_fit_in_l2():
    h100 = auto.GPUS["H100"]
    maps = lambda b, n, c1, c2: b * n * (c1 + c2) * 4  # noqa: E731
    # Mobile U-Net's maps at a 1024² patch, B = 8: 100 MB, twice the L2: both forward reads from DRAM.
    big = auto.triton_gram_steps(8, 65_536, 24, 24, gpu=h100)[0]
    assert big.bytes == pytest.approx(maps(8, 65_536, 24, 24) * auto.TRITON_FORWARD_PASSES)
    # One 64² image: 0.8 MB, the Gram launch's re-read of what the channel max read comes from L2.
    small = auto.triton_gram_steps(1, 4_096, 24, 24, gpu=h100)[0]
    assert small.bytes == pytest.approx(maps(1, 4_096, 24, 24) * (auto.TRITON_FORWARD_PASSES - 1))
    # The boundary is the usable share of this GPU's L2 (A100: 40 MB), and no GPU means no L2.
    a100 = auto.GPUS["A100"]
    edge = int(auto.L2_USABLE * a100.l2_bytes) // (48 * 4)
    assert auto.forward_passes(1, edge, 24, 24, 4, a100) == auto.TRITON_FORWARD_PASSES - 1
    assert auto.forward_passes(1, edge + 1, 24, 24, 4, a100) == auto.TRITON_FORWARD_PASSES
    assert auto.forward_passes(1, 4_096, 24, 24, 4, None) == auto.TRITON_FORWARD_PASSES


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_auto_runs_what_the_model_picks_and_every_gram_path_agrees():
    """At a 1024² patch's H/4 maps: the eager and fused paths agree in value and gradient, and 'auto' runs
    whichever the roofline picks for this GPU."""
    g = torch.Generator(device="cuda").manual_seed(0)
    f1 = torch.randn(2, 24, 256, 256, device="cuda", generator=g).relu_().requires_grad_(True)
    f2 = torch.randn(2, 64, 256, 256, device="cuda", generator=g).requires_grad_(True)
    out = {}
    for backend in ("gram", "triton", "auto"):
        phi = cocofast.cross_layer_correlation(f1, f2, backend=backend)
        out[backend] = (phi.detach(), *torch.autograd.grad(phi.sum(), [f1, f2]))
    for got in (out["triton"], out["auto"]):
        assert torch.allclose(got[0], out["gram"][0], rtol=1e-5)
        for a, b in zip(got[1:], out["gram"][1:]):
            assert ((a - b).norm() / b.norm()).item() < 1e-4
    picked = auto.similarity_auto_backend(f1, f2)
    assert picked in ("gram", "triton") and torch.equal(out["auto"][0], out[picked][0])
