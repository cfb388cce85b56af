"""The shared ops floor: backend tables and their validator, input checks, the CPU gram path's pieces, the
traffic counter and the roofline model behind backend='auto'."""
import numpy as np
import pytest
import torch

import cocofast
from cocofast.ops import roofline
from cocofast.ops.backends import BACKEND_TABLES, PIXEL_RELATION_BACKENDS, SIMILARITY_BACKENDS, check_backend
from cocofast.ops.checks import check_map, largest_safe_magnitude
from cocofast.ops.pixel_relation import pixel_relation_kl
from cocofast.ops.similarity.gram_torch import TorchGramStats, max_positions, traffic
from cocofast.ops.torch_traffic import TrafficCounter
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


def test_gram_traffic_model_matches_counted_bytes():
    """gram_torch.traffic lists the passes of the code; the dispatch-level counter sees the ops actually run."""
    for c1, c2 in ((24, 40), (64, 64)):
        f1 = torch.randn(2, c1, 128, 128).relu_().requires_grad_(True)
        f2 = torch.randn(2, c2, 128, 128).requires_grad_(True)
        with TrafficCounter() as counter:
            torch.aminmax(f1.detach()), torch.aminmax(f2.detach())  # the public call's input checks
            k, p, q = TorchGramStats.apply(f1, f2, True, 1e-6)
            (k / (p * q).sqrt()).sum().backward()
        model = sum(nbytes for _, nbytes, _ in traffic(2, 128 * 128, c1, c2))
        assert 0.95 < counter.total_bytes / model < 1.1, (c1, c2, counter.total_bytes / model)


def test_traffic_counter_counts_reads_writes_and_skips_views():
    x, y = torch.randn(1000), torch.randn(1000)
    with TrafficCounter() as counter:
        z = x * x           # x read once, z written
        x.view(10, 100).t()  # a view moves nothing
        torch.add(x, y, out=z)  # out= is only written
    assert counter.total_bytes == (4000 + 4000) + (8000 + 4000)


def test_roofline_is_the_max_of_bandwidth_and_compute():
    gpu = roofline.GPUS["H100"]
    memory_bound = roofline.Step("stream", bytes=3.35e9, flops=1e9, math="fp32")
    compute_bound = roofline.Step("gemm", bytes=1e6, flops=67e12, math="fp32")
    assert roofline.step_time(memory_bound, gpu) == pytest.approx(1e-3)
    assert roofline.step_time(compute_bound, gpu) == pytest.approx(1.0)
    assert roofline.step_time(roofline.Step("dot", 0, 494.7e12 / 3, "tf32x3"), gpu) == pytest.approx(1.0)
    assert roofline.modelled_time([memory_bound, compute_bound], gpu) == pytest.approx(1.001)
    with pytest.raises(ValueError, match="math must be one of"):
        gpu.peak("fp8")


def test_faster_backend_picks_the_least_time_and_the_first_on_a_tie():
    assert roofline.faster_backend({"triton": 2.0, "gram": 1.0}) == "gram"
    assert roofline.faster_backend({"triton": 1.0, "gram": 1.0}) == "triton"
    with pytest.raises(ValueError, match="empty"):
        roofline.faster_backend({})


def test_auto_follows_the_model():
    f = torch.randn(2, 24, 8, 8)
    assert roofline.similarity_auto_backend(f, f) == "gram"  # off CUDA, whatever the model says
    gpu = roofline.GPUS["A100"]
    shape = (8, 65_536, 256, 256)
    fused = roofline.modelled_time(roofline.triton_gram_steps(*shape), gpu)
    eager = roofline.modelled_time(roofline.gram_torch_steps(*shape, matmul_math="fp32"), gpu)
    assert fused < eager  # fp32 GEMMs on SIMT units against tf32x3 tensor cores, and fewer passes
    # A fused kernel that moved 10× the bytes would lose at small C, where both paths are memory-bound.
    heavy = roofline.triton_gram_steps(8, 65_536, 24, 24, forward_bytes=10 * 8 * 65_536 * 48 * 4 * 15)
    small = roofline.gram_torch_steps(8, 65_536, 24, 24, matmul_math="fp32")
    assert roofline.modelled_time(heavy, gpu) > roofline.modelled_time(small, gpu)
    assert roofline.gpu_spec("NVIDIA A100-SXM4-80GB") is gpu and roofline.gpu_spec("Tesla T4").name == "H100 SXM"


def test_the_fused_forward_reads_its_maps_twice_unless_they_fit_in_l2():
    h100 = roofline.GPUS["H100"]
    maps = lambda b, n, c1, c2: b * n * (c1 + c2) * 4  # noqa: E731
    # Mobile U-Net's maps at a 1024² patch, B = 8: 100 MB, twice the L2: both forward reads from DRAM.
    big = roofline.triton_gram_steps(8, 65_536, 24, 24, gpu=h100)[0]
    assert big.bytes == pytest.approx(maps(8, 65_536, 24, 24) * roofline.TRITON_FORWARD_PASSES)
    # One 64² image: 0.8 MB, the Gram launch's re-read of what the channel max read comes from L2.
    small = roofline.triton_gram_steps(1, 4_096, 24, 24, gpu=h100)[0]
    assert small.bytes == pytest.approx(maps(1, 4_096, 24, 24) * (roofline.TRITON_FORWARD_PASSES - 1))
    # The boundary is the usable share of this GPU's L2 (A100: 40 MB), and no GPU means no L2.
    a100 = roofline.GPUS["A100"]
    edge = int(roofline.L2_USABLE * a100.l2_bytes) // (48 * 4)
    assert roofline.forward_passes(1, edge, 24, 24, 4, a100) == roofline.TRITON_FORWARD_PASSES - 1
    assert roofline.forward_passes(1, edge + 1, 24, 24, 4, a100) == roofline.TRITON_FORWARD_PASSES
    assert roofline.forward_passes(1, 4_096, 24, 24, 4, None) == roofline.TRITON_FORWARD_PASSES


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
    picked = roofline.similarity_auto_backend(f1, f2)
    assert picked in ("gram", "triton") and torch.equal(out["auto"][0], out[picked][0])
