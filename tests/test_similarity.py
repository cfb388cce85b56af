"""Every backend of the CoCo losses against an independent float64 reference (tests/reference.py)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cocofast
from reference import distance as ref_distance
from reference import phi as ref_phi
from reference import stats as ref_stats
from reference import DEVICE, features

BACKENDS = ["naive", "gram", "triton", "tiled"]
CHANNELS = [3, 24, 40, 96, 320]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp32 inputs: values 1e-5, gradients 1e-4 (norm-wise); half-precision inputs: 1e-2 (the backends' promise in
# the README's backend table).
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (1e-2, 1e-2)}


def rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64).cpu(), torch.as_tensor(b, dtype=torch.float64).cpu()
    # Floor the scale: with N = 1, φ ≡ 1 and the exact gradient is 0, so fp32 rounding (~1e-8 here)
    # would otherwise count as infinitely wrong. Inputs are O(1), where gradients are O(0.1) and above.
    return ((a - b).norm() / b.norm().clamp_min(1e-2)).item()


def assert_grad_close(got, want, tol):
    """Norm-wise relative match. Near-dead pixels have gradients ∝ 1/‖row‖ that can exceed fp16's range;
    there the exact value is not representable, so both sides are clipped to the dtype's largest value."""
    top = torch.finfo(got.dtype).max
    want = want.double().cpu()
    assert torch.isfinite(got[(want.abs() < top / 2).to(got.device)]).all()
    assert rel(got.double().clamp(-top, top), want.clamp(-top, top)) < tol


def ref_grads(fn, *inputs, weights):
    """Gradients of Σ weights·fn(inputs) by the naive backend in float64 (itself gradchecked below)."""
    xs = [x.detach().double().requires_grad_(True) for x in inputs]
    out = fn(*xs, backend="naive")
    return torch.autograd.grad((out * weights.double()).sum(), xs)


shapes = st.tuples(
    st.integers(1, 3),                 # batch
    st.sampled_from(CHANNELS),         # C1
    st.sampled_from(CHANNELS),         # C2
    st.integers(1, 11), st.integers(1, 11),  # H, W (odd and unequal)
)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), relu=st.booleans(), seed=st.integers(0, 2**16))
def test_correlation_matches_float64_reference(backend, shape, dtype, relu, seed):
    batch, c1, c2, h, w = shape
    f1 = features(seed, batch, c1, h, w, dtype, relu).requires_grad_(True)
    # Same N, transposed spatial shape: only H·W must agree between the two layers.
    f2 = features(seed + 1, batch, c2, w, h, dtype, relu, scale=3.0).requires_grad_(True)
    phi = cocofast.cross_layer_correlation(f1, f2, backend=backend)
    val_tol, grad_tol = TOL[dtype]
    expected = ref_phi(f1.detach().double().cpu().numpy(), f2.detach().double().cpu().numpy())
    assert phi.shape == (batch,) and phi.dtype == torch.float32
    assert np.allclose(phi.detach().cpu().numpy(), expected, rtol=val_tol, atol=val_tol * 1e-2)
    weights = torch.linspace(0.5, 1.5, batch, device=DEVICE)
    grads = torch.autograd.grad((phi * weights).sum(), [f1, f2])
    expected_grads = ref_grads(cocofast.cross_layer_correlation, f1, f2, weights=weights)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == dtype
        assert_grad_close(got, want, grad_tol)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), channel_mix=st.booleans(), seed=st.integers(0, 2**16))
def test_similarity_distance_matches_float64_reference(backend, shape, dtype, channel_mix, seed):
    batch, ct, cs, h, w = shape
    ft = features(seed, batch, ct, h, w, dtype)
    fs = features(seed + 7, batch, cs, h, w, dtype, relu=True).requires_grad_(True)
    d = cocofast.similarity_distance(ft, fs, channel_mix=channel_mix, backend=backend)
    val_tol, grad_tol = TOL[dtype]
    t64, s64 = ft.double().cpu().numpy(), fs.detach().double().cpu().numpy()
    expected = ref_distance(t64, s64, channel_mix)
    # gram/triton use ‖M_T−M_S‖² = p + q − 2k, which cancels: their error scales with (p + q), not with d.
    _, p, q, _ = ref_stats(t64, s64, channel_mix).T
    floor = 1e-6 * float(np.mean(p + q)) / (h * w) ** 2
    assert d.shape == () and abs(d.item() - expected) <= val_tol * abs(expected) + floor
    (grad,) = torch.autograd.grad(d, [fs])
    xs = [ft.double(), fs.detach().double().requires_grad_(True)]
    (want,) = torch.autograd.grad(
        cocofast.similarity_distance(*xs, channel_mix=channel_mix, backend="naive"), [xs[1]])
    assert_grad_close(grad, want, grad_tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_coco_loss_matches_reference_and_leaves_teacher_alone(backend):
    teacher = [(features(1, 2, 40, 6, 5, torch.float32).requires_grad_(True), features(2, 2, 96, 3, 10, torch.float32))]
    student = [(features(3, 2, 24, 5, 6, torch.float32).requires_grad_(True),
                features(4, 2, 3, 10, 3, torch.float32).requires_grad_(True))]
    teacher.append((features(5, 2, 3, 4, 4, torch.float32), features(6, 2, 24, 4, 4, torch.float32)))
    student.append((features(7, 2, 40, 2, 8, torch.float32).requires_grad_(True),
                    features(8, 2, 24, 16, 1, torch.float32).requires_grad_(True)))
    loss = cocofast.coco_loss(teacher, student, backend=backend)
    np_ = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
    expected = np.mean([np.mean((ref_phi(np_(t[0]), np_(t[1])) - ref_phi(np_(s[0]), np_(s[1]))) ** 2)
                        for t, s in zip(teacher, student)])
    assert loss.dim() == 0 and abs(loss.item() - expected) <= 1e-5 * expected + 1e-12
    loss.backward()
    assert teacher[0][0].grad is None
    assert all(s.grad is not None and torch.isfinite(s.grad).all() for pair in student for s in pair)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    f1 = features(11, 2, 3, 3, 2, torch.float64).requires_grad_(True)
    f2 = features(12, 2, 5, 2, 3, torch.float64).requires_grad_(True)
    # The interpreted kernels take ~0.1 s a call: fast mode checks random projections of the Jacobian.
    fast = backend in ("triton", "tiled")
    assert torch.autograd.gradcheck(lambda a, b: cocofast.cross_layer_correlation(a, b, backend=backend),
                                    (f1, f2), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)
    for mix in (True, False):
        assert torch.autograd.gradcheck(
            lambda a, b: cocofast.similarity_distance(a, b, channel_mix=mix, backend=backend),
            (f1, f2), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_pixels_and_dead_maps_stay_finite(backend):
    f1 = features(21, 2, 24, 5, 5, torch.float32)
    f1[:, :, 1:3, 2:4] = 0  # all-zero rows
    f1[1] = 0  # a whole dead map: φ is defined as 0
    f2 = features(22, 2, 40, 5, 5, torch.float32)
    f1.requires_grad_(True)
    f2.requires_grad_(True)
    phi = cocofast.cross_layer_correlation(f1, f2, backend=backend)
    assert torch.isfinite(phi).all() and phi[1].item() == 0.0
    expected = ref_phi(f1.detach().double().cpu().numpy(), f2.detach().double().cpu().numpy())
    assert np.allclose(phi.detach().cpu().numpy(), expected, rtol=1e-5)
    phi.sum().backward()
    assert torch.isfinite(f1.grad).all() and torch.isfinite(f2.grad).all()
    d = cocofast.similarity_distance(f1, f2, backend=backend)
    assert torch.isfinite(d)


@pytest.mark.parametrize("backend", ["triton", "tiled"])
def test_triton_runs_are_bit_identical(backend):
    def run():
        f1 = features(31, 2, 96, 9, 7, torch.float32).requires_grad_(True)
        f2 = features(32, 2, 40, 7, 9, torch.float32).requires_grad_(True)
        phi = cocofast.cross_layer_correlation(f1, f2, backend=backend)
        phi.sum().backward()
        return phi.detach(), f1.grad, f2.grad

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_channels_last_and_strided(backend):
    base = features(41, 2, 24, 6, 10, torch.float32)
    other = features(42, 2, 40, 6, 5, torch.float32)
    want = cocofast.cross_layer_correlation(base[..., ::2], other, backend="naive")
    strided = base[..., ::2]  # non-contiguous in W
    cl = base[..., ::2].contiguous(memory_format=torch.channels_last)
    for f in (strided, cl):
        x = f.detach().clone() if f is cl else f
        x.requires_grad_(True)
        got = cocofast.cross_layer_correlation(x, other, backend=backend)
        assert torch.allclose(got, want, rtol=1e-5)
        got.sum().backward()
        assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", ["gram", "triton"])
def test_wide_channels_up_to_1024(backend):
    f1 = features(51, 1, 1024, 3, 5, torch.float32).requires_grad_(True)
    f2 = features(52, 1, 320, 5, 3, torch.float32)
    phi = cocofast.cross_layer_correlation(f1, f2, backend=backend)
    assert np.allclose(phi.detach().cpu().numpy(), ref_phi(f1.detach().double().cpu().numpy(),
                                                           f2.double().cpu().numpy()), rtol=1e-5)
    (g,) = torch.autograd.grad(phi.sum(), [f1])
    (want,) = ref_grads(cocofast.cross_layer_correlation, f1, f2, weights=torch.ones(1, device=DEVICE))[:1]
    assert rel(g, want) < 1e-4


def test_auto_backend_picks_by_device():
    f1, f2 = features(61, 2, 24, 4, 4, torch.float32), features(62, 2, 40, 4, 4, torch.float32)
    auto = cocofast.cross_layer_correlation(f1, f2)
    assert torch.allclose(auto, cocofast.cross_layer_correlation(f1, f2, backend="gram"), rtol=1e-6)


def test_cmss_rows_are_unit_norm_and_match_reference():
    from reference import rows

    f = features(71, 2, 24, 3, 5, torch.float32)
    a = cocofast.cmss(f)
    assert a.shape == (2, 15, 24)
    assert np.allclose(a[1].cpu().numpy(), rows(f[1].double().cpu().numpy()), atol=1e-6)
    assert np.allclose(cocofast.cmss(f, channel_mix=False)[0].cpu().numpy(),
                       rows(f[0].double().cpu().numpy(), channel_mix=False), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_value_errors_naming_argument_and_shapes(backend):
    good = torch.randn(2, 4, 5, 6)
    cases = [
        (lambda: cocofast.cross_layer_correlation(good, torch.randn(2, 4, 5, 5), backend=backend),
         ["shallow", "deep", "(2, 4, 5, 6)", "(2, 4, 5, 5)"]),
        (lambda: cocofast.cross_layer_correlation(torch.randn(4, 5, 6), good, backend=backend),
         ["shallow", "(4, 5, 6)"]),
        (lambda: cocofast.cross_layer_correlation(good, good.to(torch.int32), backend=backend),
         ["deep", "torch.int32"]),
        (lambda: cocofast.cross_layer_correlation(good, good.clone().index_fill_(0, torch.tensor([1]), float("nan")),
                                                  backend=backend), ["deep", "NaN"]),
        (lambda: cocofast.cross_layer_correlation(good.clone().fill_(float("inf")), good, backend=backend),
         ["shallow", "Inf"]),
        (lambda: cocofast.cross_layer_correlation(good, torch.randn(3, 4, 5, 6), backend=backend),
         ["shallow", "deep", "(2, 4, 5, 6)", "(3, 4, 5, 6)"]),
        (lambda: cocofast.similarity_distance(good, torch.randn(2, 4, 6, 6), backend=backend),
         ["f_teacher", "f_student", "(2, 4, 5, 6)", "(2, 4, 6, 6)"]),
        (lambda: cocofast.coco_loss([(good, good)], [(torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6))],
                                    backend=backend), ["(2, 4, 5, 6)", "(3, 4, 5, 6)"]),
    ]
    for call, words in cases:
        with pytest.raises(ValueError) as err:
            call()
        for word in words:
            assert word in str(err.value), (word, str(err.value))
    with pytest.raises(ValueError, match="backend must be one of"):
        cocofast.cross_layer_correlation(good, good, backend="fast")


def test_naive_refuses_before_allocating():
    f = torch.randn(8, 1, 256, 256)  # N = 65,536: one fp32 N×N matrix per image is 16 GiB
    with pytest.raises(cocofast.NaiveTooLargeError, match="N=65536"):
        cocofast.cross_layer_correlation(f, f, backend="naive")
    assert cocofast.cross_layer_correlation(f[:1, :, :32, :32], f[:1, :, :32, :32], backend="naive").item() > 0


@pytest.mark.parametrize("path", ["triton", "tiled", "pixel_relation"])
def test_kernel_paths_save_every_backward_tensor_through_save_for_backward(path):
    """Autograd's saved-tensor hooks (offloading, checkpointing) and version checks see only what
    ctx.save_for_backward holds: the row norms and channel weights the backward reads must be there."""
    from cocofast.kernels.pixel_relation import pixel_relation_rows

    f1 = features(81, 2, 24, 5, 7, torch.float32).requires_grad_(True)
    f2 = features(82, 2, 40, 7, 5, torch.float32).requires_grad_(True)
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if path == "pixel_relation":
            out = pixel_relation_rows(f1, f2, 0.5, True).sum()
        else:
            out = cocofast.cross_layer_correlation(f1, f2, backend=path).sum()
    out.backward()
    assert packed.count((2, 35)) >= (4 if path == "pixel_relation" else 2), packed  # row norms (and lse)
    assert (2, 40) in packed and (path == "pixel_relation" or (2, 24) in packed), packed  # channel weights
    assert torch.isfinite(f2.grad).all()
