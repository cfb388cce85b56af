"""The configuration a CUDA user runs, run here: GPU tiles, row splits and the wide-map classes in Triton's
interpreter, values and gradients against the float64 reference.

On CUDA, `auto` picks the fused Gram kernels with their GPU tiles (32-row steps, 32- or 64-wide channel
tiles), several row splits of the forward (SPLITS > 1, summed on the host), 32-row backward blocks at C = 64,
two sweeps of the backward above C = 256, and tf32x3 dots. The rest of the suite runs the interpreter's big
tiles with SPLITS = 1, so without this file no test computes a number on the path a GPU user gets.
`launcher.gpu_tiles()` switches every launch config to the GPU's for one test, and each case asserts that
its launch really reached the class it is named for (a config change that moves a class away fails here).

What the interpreter cannot reproduce: tf32x3. It evaluates every dot in fp32 ("ieee"), whereas a GPU
rounds each operand to TF32 (10 fraction bits, unit roundoff u = 2⁻¹¹) as a = a_hi + a_lo + r with
|r| ≤ u²|a|, and drops a_lo·b_lo. Each product is then off by at most 3u²|ab| (u² = 2⁻²², 3u² ≈ 7.2e-7),
so tf32x3 adds at most |δG| ≤ 3u²·|A|ᵀ|B| (entrywise) to each Gram block G = AᵀB over what the interpreter
computes. To first order δφ/φ = δk/k − δp/2p − δq/2q with δk/k ≤ 2‖δK‖/‖K‖ and δp/p ≤ 2‖δS₁‖/‖S₁‖, so

    |δφ/φ| ≤ 3u² (2‖|Â₁|ᵀ|Â₂|‖/‖K‖ + ‖|Â₁|ᵀ|Â₁|‖/‖S₁‖ + ‖|Â₂|ᵀ|Â₂|‖/‖S₂‖)

which for non-negative (post-ReLU) maps is exactly 4·3u² ≈ 2.9e-6, under the 1e-5 contract. For signed
maps of unrelated layers K cancels and this worst case is loose: 4e-5 to 6e-5 on the signed fp32 cases
below, above the contract, while tf32x3 as emulated in float64 (operands split into TF32 hi and lo, lo·lo
dropped) moves φ by far less. So each fp32 case adds to the interpreter's error the analytic bound where
the maps are non-negative and twice the emulated tf32x3 deviation where they are signed, and asserts the
sum stays under the tolerance; `test_tf32x3_bound_holds_for_an_emulated_tf32x3_gram` checks the emulation
against the bound. The gradients' tolerance (1e-4) is 100× the values'; the backward's dot adds the same
3u² relative to |A||cG|, orders below it.
"""
import math

import numpy as np
import pytest
import torch

import cocofast
from cocofast.kernels import gram as gram_module
from cocofast.kernels import launcher
from reference import phi as ref_phi
from reference import rows as ref_rows
from test_similarity import TOL, assert_grad_close, ref_grads, rel

U2 = 2.0 ** -22  # TF32's unit roundoff, squared


@pytest.fixture(autouse=True)
def gpu_tiles():
    with launcher.gpu_tiles():
        yield


@pytest.fixture
def launched(monkeypatch):
    """constexprs of every Gram-kernel launch in the test, by kernel name."""
    seen: dict[str, list[dict]] = {}
    real = gram_module.launch

    def record(kernel, grid, args, constexprs, **options):
        seen.setdefault(kernel.fn.__name__, []).append(dict(constexprs, **options))
        return real(kernel, grid, args, constexprs, **options)

    monkeypatch.setattr(gram_module, "launch", record)
    return seen


def maps(seed, batch, c1, c2, h, w, dtype, channels_last=(False, False), relu=False):
    """Reproducible (B, C₁, H, W) and (B, C₂, W, H) maps (equal N, transposed shapes), drawn in fp64."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c, shape, cl, scale in ((c1, (h, w), channels_last[0], 1.0), (c2, (w, h), channels_last[1], 3.0)):
        x = torch.randn(batch, c, *shape, generator=g, dtype=torch.float64) * scale
        x = (x.clamp_min(0) if relu else x).to(dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(x.requires_grad_(True))
    return out


def image_rows(f1: torch.Tensor, f2: torch.Tensor):
    """Per image, the float64 Â₁, Â₂ (N × C) rounded to fp32, as the kernels hold them before a dot."""
    for a, b in zip(f1.detach().double().numpy(), f2.detach().double().numpy()):
        yield tuple(ref_rows(x).astype(np.float32).astype(np.float64) for x in (a, b))


def tf32x3_phi_bound(f1: torch.Tensor, f2: torch.Tensor) -> np.ndarray:
    """Per image, the bound above on |δφ/φ| that tf32x3's rounding can add to the interpreter's fp32 dots."""
    ratio = lambda x, y: np.linalg.norm(np.abs(x).T @ np.abs(y)) / np.linalg.norm(x.T @ y)  # noqa: E731
    return np.array([3 * U2 * (2 * ratio(r1, r2) + ratio(r1, r1) + ratio(r2, r2))
                     for r1, r2 in image_rows(f1, f2)])


def tf32(x: np.ndarray) -> np.ndarray:
    """Round to nearest, ties away, to TF32's 10 fraction bits (cvt.rna.tf32.f32), in float64."""
    m, e = np.frexp(x)
    return np.ldexp(np.sign(m) * np.floor(np.abs(m) * 2.0 ** 11 + 0.5) / 2.0 ** 11, e)


def tf32x3_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """aᵀb as Triton's tf32x3 forms it: hi·hi + hi·lo + lo·hi of TF32 operand splits (lo·lo dropped)."""
    ah, bh = tf32(a), tf32(b)
    al, bl = tf32(a - ah), tf32(b - bh)
    return ah.T @ bh + ah.T @ bl + al.T @ bh


def phi_of(k, s1, s2) -> float:
    return float(np.sum(k * k) / math.sqrt(np.sum(s1 * s1) * np.sum(s2 * s2)))


def tf32x3_phi_deviation(f1: torch.Tensor, f2: torch.Tensor) -> np.ndarray:
    """Per image, |δφ/φ| of φ from emulated tf32x3 Grams against exact ones."""
    return np.array([abs(phi_of(tf32x3_dot(r1, r2), tf32x3_dot(r1, r1), tf32x3_dot(r2, r2))
                         / phi_of(r1.T @ r2, r1.T @ r1, r2.T @ r2) - 1) for r1, r2 in image_rows(f1, f2)])


def tf32x3_allowance(f1: torch.Tensor, f2: torch.Tensor) -> np.ndarray:
    """What tf32x3 may add on a GPU over the interpreter's fp32 dots (the module docstring says why)."""
    if f1.dtype != torch.float32:
        return np.zeros(f1.shape[0])  # half inputs: 1e-2 tolerance, five orders above tf32x3's rounding
    if (f1 >= 0).all() and (f2 >= 0).all():
        return tf32x3_phi_bound(f1, f2)
    return 2 * tf32x3_phi_deviation(f1, f2)


def check_against_reference(f1, f2, reference: str = "naive"):
    """φ and its gradients by backend='triton' against the float64 reference at the documented tolerances,
    φ's error with tf32x3's allowance added. reference='gram': the float64 gram path instead of the N×N
    matrices (itself checked against them in test_similarity.py), for N where those take gigabytes."""
    phi = cocofast.cross_layer_correlation(f1, f2, backend="triton")
    val_tol, grad_tol = TOL[f1.dtype]
    if reference == "gram":
        expected = cocofast.cross_layer_correlation(f1.detach().double(), f2.detach().double(),
                                                    backend="gram").numpy()
    else:
        expected = ref_phi(f1.detach().double().numpy(), f2.detach().double().numpy())
    err = np.abs(phi.detach().double().numpy() - expected) / np.maximum(np.abs(expected), 1e-2)
    allowance = tf32x3_allowance(f1, f2)
    assert np.all(err + allowance < val_tol), (err, allowance)
    weights = torch.linspace(0.5, 1.5, f1.shape[0], dtype=torch.float64)
    grads = torch.autograd.grad((phi * weights.to(phi.dtype)).sum(), [f1, f2])
    fn = cocofast.cross_layer_correlation
    if reference == "gram":
        fn = lambda a, b, backend: cocofast.cross_layer_correlation(a, b, backend="gram")  # noqa: E731
    for got, want in zip(grads, ref_grads(fn, f1, f2, weights=weights)):
        assert got.dtype == f1.dtype and got.shape == want.shape
        assert_grad_close(got, want, grad_tol)
    return err


def splits_of(launched) -> list[int]:
    return [c["SPLITS"] for c in launched["gram_forward_kernel"]]


# ------------------------------------------------------------------------------------ the fast set
# Each case is the smallest shape found that reaches its class (splits need N·(C₁+C₂)·4 B over the cap
# in gram_splits; spans need N > 1,024; the classes of launcher.py switch at C = 32, 64 and 256).


def test_row_splits_backward_spans_odd_n_mixed_channels_channels_last(launched):
    # N = 35·31 = 1,085 (odd): 34 row blocks over 4 splits (uneven), two backward spans of 1,024 rows.
    f1, f2 = maps(0, 2, 3, 4, 35, 31, torch.float32, channels_last=(True, False))
    check_against_reference(f1, f2)
    assert splits_of(launched) == [4]
    back = launched["gram_backward_kernel"][0]
    assert back["BLOCK_N"] == 64 and not back["TWO_PASS_1"]


def test_row_splits_without_channel_mixing_reduce_the_extrema_too(launched):
    # similarity_distance with channel_mix=False: the input check's extrema are reduced over the splits.
    ft, fs = maps(1, 1, 4, 3, 27, 25, torch.float32, relu=True)
    d = cocofast.similarity_distance(ft.detach(), fs, channel_mix=False, backend="triton")
    want = cocofast.similarity_distance(ft.detach().double(), fs.detach().double(), channel_mix=False,
                                        backend="naive")
    assert splits_of(launched) == [3]
    assert rel(d, want) < TOL[torch.float32][0]
    (g,) = torch.autograd.grad(d, [fs])
    fs64 = fs.detach().double().requires_grad_(True)
    (g64,) = torch.autograd.grad(cocofast.similarity_distance(ft.detach().double(), fs64, channel_mix=False,
                                                              backend="naive"), [fs64])
    assert_grad_close(g, g64, TOL[torch.float32][1])
    bad = ft.detach().clone()
    bad[0, 1, 18, 10] = float("nan")  # pixel 460, row block 14 of 22: the last of the 3 splits owns it
    with pytest.raises(ValueError, match="NaN"):
        cocofast.similarity_distance(bad, fs, channel_mix=False, backend="triton")


def test_c64_row_class_in_half_precision_channels_last(launched):
    f1, f2 = maps(2, 2, 64, 40, 5, 7, torch.float16, channels_last=(False, True))
    check_against_reference(f1, f2)
    fwd, back = launched["gram_forward_kernel"][0], launched["gram_backward_kernel"][0]
    assert (fwd["BLOCK_C"], fwd["num_warps"]) == (64, 8)
    assert (back["BLOCK_N"], back["BLOCK_K"], back["CP1"]) == (32, 16, 64)


def test_bfloat16_inputs_at_both_channel_classes(launched):
    f1, f2 = maps(3, 1, 64, 24, 7, 5, torch.bfloat16)
    check_against_reference(f1, f2)
    back = launched["gram_backward_kernel"][0]
    assert (back["CP1"], back["CP2"]) == (64, 32)


def test_c512_two_pass_backward_with_a_narrow_partner(launched):
    f1, f2 = maps(4, 1, 512, 24, 3, 5, torch.float32)
    check_against_reference(f1, f2)
    back = launched["gram_backward_kernel"][0]
    assert back["TWO_PASS_1"] and not back["TWO_PASS_2"] and back["CP1"] == 128 and back["BLOCK_N"] == 16


def test_a_broken_split_reduction_fails_the_check(monkeypatch, launched):
    """The test can fail: dropping the last split (a test-only break of gram.reduce_splits) is caught."""
    monkeypatch.setattr(gram_module, "reduce_splits", lambda part: part[:, :-1].sum(dim=1))
    f1, f2 = maps(5, 1, 3, 4, 27, 25, torch.float32)
    with pytest.raises(AssertionError):
        check_against_reference(f1, f2)
    assert splits_of(launched) == [3]


def test_tf32x3_bound_holds_for_an_emulated_tf32x3_gram():
    """Emulated tf32x3 moves φ, and by no more than the analytic bound; for ReLU maps the bound is 4·3u²."""
    for relu in (False, True):
        f1, f2 = maps(6, 2, 24, 64, 9, 7, torch.float32, relu=relu)
        dev, bound = tf32x3_phi_deviation(f1, f2), tf32x3_phi_bound(f1, f2)
        assert np.all(dev > 0) and np.all(dev <= bound), (relu, dev, bound)
        if relu:
            assert np.allclose(bound, 12 * U2)


# ------------------------------------------------------------------------------------ the slow set


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_c512_two_pass_in_half_precision_with_c64(dtype, launched):
    f1, f2 = maps(7, 1, 512, 64, 5, 3, dtype)
    check_against_reference(f1, f2)
    assert launched["gram_backward_kernel"][0]["TWO_PASS_1"]


@pytest.mark.slow
def test_mobile_unet_width_at_many_splits(launched):
    # The student's 24 channels at N = 96² with B = 2: SPLITS = 6, as the issue measured by hand.
    f1, f2 = maps(8, 2, 24, 24, 96, 96, torch.float32, relu=True)
    check_against_reference(f1, f2, reference="gram")  # N×N float64 matrices would take 4 GB here
    assert splits_of(launched)[0] >= 6


@pytest.mark.slow
def test_the_two_pass_class_from_its_first_width(launched):
    # 264 channels: two-pass with a ragged last 128-wide tile (the class starts at 257).
    f1, f2 = maps(9, 1, 264, 264, 3, 3, torch.float32, channels_last=(True, True))
    check_against_reference(f1, f2)
    assert launched["gram_backward_kernel"][0]["TWO_PASS_1"]


def test_the_tile_walks_at_gpu_tiles():
    """The tiled backend and CPKD's pixel relation at the GPU's 64-pixel tiles, 16-channel reductions and
    32-wide output tiles: N = 99 crosses a tile border, C = 40 two output tiles (fp32; the interpreter runs
    their dots in ieee, as for the Gram path)."""
    from cocofast.ops import pixel_relation as pr

    f1, f2 = maps(10, 2, 24, 40, 11, 9, torch.float32)
    phi = cocofast.cross_layer_correlation(f1, f2, backend="tiled")
    want = ref_phi(f1.detach().double().numpy(), f2.detach().double().numpy())
    assert np.allclose(phi.detach().numpy(), want, rtol=TOL[torch.float32][0])
    (g,) = torch.autograd.grad(phi.sum(), [f2])
    (g64,) = ref_grads(cocofast.cross_layer_correlation, f1, f2, weights=torch.ones(2, dtype=torch.float64))[1:]
    assert_grad_close(g, g64, TOL[torch.float32][1])
    teacher, student = f2.detach(), f1
    kl = pr.pixel_relation_kl(teacher, student, tau=0.5, channel_mix=True, backend="triton")
    s64 = student.detach().double().requires_grad_(True)
    kl64 = pr.pixel_relation_kl(teacher.double(), s64, tau=0.5, channel_mix=True, backend="naive")
    assert rel(kl, kl64) < TOL[torch.float32][0]
    (gs,), (gs64,) = torch.autograd.grad(kl, [student]), torch.autograd.grad(kl64, [s64])
    assert_grad_close(gs, gs64, TOL[torch.float32][1])
