"""CPKDLoss and channel_relation against float64 formulas written out here (numpy values, torch float64 gradients)."""
import numpy as np
import pytest
import torch

from collections import namedtuple

from cocofast.losses.cpkd import CPKDLoss, channel_relation
from reference import np64

B, K, H = 2, 3, 12          # batch, classes, logits size
C_S, C_T = 5, 8             # student and raw-teacher deep channels; paraphrased teacher feats have C_S
TAP = (3, 7)                # odd tap grid: N = 21 keeps the Triton interpreter quick
BACKENDS = ["naive", "triton"]

Net = namedtuple("Net", "logits shallow deep")


def randn(g, *shape):
    return torch.randn(*shape, generator=g)


def seg(seed, c_deep, tap=TAP, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    t = [randn(g, B, K, H, H), randn(g, B, 4, *tap), randn(g, B, c_deep, *tap).relu() + 0.3 * randn(g, B, c_deep, *tap)]
    return Net(*(x.requires_grad_(requires_grad) for x in t))


def feats(seed, tap=TAP, requires_grad=False):
    """Stand-ins for paraphraser encodings: the student's channel counts (4 shallow, C_S deep)."""
    g = torch.Generator().manual_seed(seed)
    return tuple((randn(g, B, c, *tap) * 1.5).requires_grad_(requires_grad) for c in (4, C_S))


# --------------------------------------------------------------------------------- float64 references


def ref_channel_relation(f):
    """(C, h, w) -> (C, C): Pearson correlation of the channels over pixels; a constant channel gives zeros."""
    x = f.reshape(f.shape[0], -1)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.sqrt((x**2).sum(axis=1, keepdims=True))
    x = np.where(norm > 1e-9, x / np.maximum(norm, 1e-300), 0.0)
    return x @ x.T


def ref_channel_term(fs, ft):
    return float(np.mean([(ref_channel_relation(a) - ref_channel_relation(b)) ** 2 for a, b in zip(fs, ft)]))


def ref_log_softmax_rows(r):
    top = r.max(axis=1, keepdims=True)
    return r - top - np.log(np.exp(r - top).sum(axis=1, keepdims=True))


def ref_pixel_term(ft, fs, tau):
    """mean over images and pixels of KL(P_T[i] ‖ P_S[i]), P = row-softmax of the N×N pixel cosines / τ."""
    total = []
    for a, b in zip(ft, fs):
        logp = []
        for f in (a, b):
            g = f.reshape(f.shape[0], -1).T  # (N, C)
            g = g / np.maximum(np.sqrt((g**2).sum(axis=1, keepdims=True)), 1e-6)
            logp.append(ref_log_softmax_rows(g @ g.T / tau))
        total.append((np.exp(logp[0]) * (logp[0] - logp[1])).sum(axis=1))
    return float(np.mean(total))


def torch_cpkd64(fs, ft, channel_weight, pixel_weight, tau):
    """The same loss as an explicit float64 torch formula, for reference gradients (no constant channels)."""
    def corr(f):
        x = f.flatten(2)
        x = x - x.mean(dim=2, keepdim=True)
        x = x / x.norm(dim=2, keepdim=True)
        return x @ x.transpose(1, 2)

    def log_p(f):
        a = f.flatten(2).transpose(1, 2)
        a = a / a.norm(dim=2, keepdim=True).clamp_min(1e-6)
        return torch.log_softmax(a @ a.transpose(1, 2) / tau, dim=2)

    lt, ls = log_p(ft), log_p(fs)
    kl = (lt.exp() * (lt - ls)).sum(dim=2).mean()
    return channel_weight * (corr(fs) - corr(ft)).square().mean() + pixel_weight * kl


# ------------------------------------------------------------------------------------ channel_relation


def with_constant_channel(seed, value):
    g = torch.Generator().manual_seed(seed)
    f = randn(g, B, C_S, *TAP)
    f[1, 2] = value
    return f


def test_channel_relation_matches_float64_reference_with_a_constant_channel():
    f = with_constant_channel(30, 0.7)
    got = channel_relation(f)
    assert got.shape == (B, C_S, C_S) and got.dtype == torch.float32
    want = np.stack([ref_channel_relation(x) for x in np64(f)])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    diag = torch.diagonal(got, dim1=1, dim2=2)
    torch.testing.assert_close(diag[0], torch.ones(C_S))
    assert diag[1, 2] == 0 and (got.abs() <= 1 + 1e-6).all()


@pytest.mark.parametrize("value", [-2.9, 3.7, 5.3])
def test_constant_channel_row_is_exactly_zero_and_gradients_finite(value):
    # In fp32 the mean of 21 copies of these values is off by an ulp; plain centring would leave noise of
    # norm above eps and the channel would come out as a unit vector correlated at random with the others.
    f = with_constant_channel(31, value).requires_grad_(True)
    g = channel_relation(f)
    assert (g[1, 2] == 0).all() and (g[1, :, 2] == 0).all()
    g.square().sum().backward()
    assert torch.isfinite(f.grad).all()


def test_channel_relation_gradcheck_float64():
    g = torch.Generator().manual_seed(32)
    f = torch.randn(2, 3, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert channel_relation(f).dtype == torch.float64
    assert torch.autograd.gradcheck(channel_relation, (f,))


# ------------------------------------------------------------------------------------------- values


def ref_loss(s, t_deep, channel_weight=1.0, pixel_weight=1.0, tau=1.0, weight=1.0):
    fs, ft = np64(s.deep), np64(t_deep)
    return weight * (channel_weight * ref_channel_term(fs, ft) + pixel_weight * ref_pixel_term(ft, fs, tau))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [{}, {"weight": 0.5, "channel_weight": 3.0, "pixel_weight": 0.2, "tau": 0.25}])
def test_full_loss_with_paraphrased_teacher(backend, kwargs):
    s, t, f = seg(40, C_S), seg(41, C_T), feats(42)
    expected = ref_loss(s, f[1], **kwargs)
    assert ref_channel_term(np64(s.deep), np64(f[1])) > 1e-3 and ref_pixel_term(np64(f[1]), np64(s.deep), 1) > 1e-3
    got = CPKDLoss(backend=backend, **kwargs)([s.deep], [f[1]])
    assert got.dtype == torch.float32 and got.dim() == 0
    np.testing.assert_allclose(got.item(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_term_alone(backend):
    s, t = seg(43, C_S), seg(44, C_S)  # equal channels: no paraphraser needed
    fs, ft = np64(s.deep), np64(t.deep)
    channel = CPKDLoss(pixel_weight=0.0, backend=backend)([s.deep], [t.deep]).item()
    pixel = CPKDLoss(channel_weight=0.0, tau=0.5, backend=backend)([s.deep], [t.deep]).item()
    np.testing.assert_allclose(channel, ref_channel_term(fs, ft), rtol=1e-4)
    np.testing.assert_allclose(pixel, ref_pixel_term(ft, fs, 0.5), rtol=1e-4)


def test_teacher_grid_may_differ_when_pixel_count_matches():
    s, t = seg(45, C_S), seg(46, C_S, tap=TAP[::-1])  # 3×7 vs 7×3
    np.testing.assert_allclose(CPKDLoss()([s.deep], [t.deep]).item(), ref_loss(s, t.deep), rtol=1e-4)


def test_identical_networks_give_zero():
    s = seg(47, C_S)
    assert CPKDLoss()([s.deep], [s.deep]).abs().item() < 1e-6


# -------------------------------------------------------------------------- gradients and autocast


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_matches_float64_autograd(backend):
    s, t, f = seg(50, C_S, requires_grad=True), seg(51, C_T), feats(52)
    kw = {"channel_weight": 2.0, "pixel_weight": 0.7, "tau": 0.5}
    CPKDLoss(weight=1.5, backend=backend, **kw)([s.deep], [f[1]]).backward()
    x = s.deep.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(1.5 * torch_cpkd64(x, f[1].double(), **kw), [x])
    got = s.deep.grad.double()
    assert ((got - want).norm() / want.norm()).item() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_reaches_the_student_deep_tap_only(backend):
    s, t, f = seg(53, C_S, requires_grad=True), seg(54, C_T, requires_grad=True), feats(55, requires_grad=True)
    CPKDLoss(backend=backend)([s.deep], [f[1]]).backward()
    assert s.deep.grad is not None and torch.isfinite(s.deep.grad).all() and s.deep.grad.abs().sum() > 0
    assert s.logits.grad is None and s.shallow.grad is None  # not read, so never passed
    assert all(x.grad is None for x in list(t) + list(f))
    # A raw teacher of the student's channel count that requires grad stays untouched as well.
    s2, t2 = seg(53, C_S, requires_grad=True), seg(54, C_S, requires_grad=True)
    CPKDLoss(backend=backend)([s2.deep], [t2.deep]).backward()
    assert s2.deep.grad.abs().sum() > 0 and t2.deep.grad is None


def test_bf16_autocast_computes_in_fp32():
    s, t, f = seg(56, C_S), seg(57, C_T), feats(58)
    s16, f16 = s.deep.bfloat16(), f[1].bfloat16()
    loss = CPKDLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss([s16], [f16])
    assert value.dtype == torch.float32 and torch.isfinite(value)
    # The same bf16 values widened outside autocast: equal only if nothing inside ran in bf16.
    wide = loss([s16.float()], [f16.float()])
    torch.testing.assert_close(value, wide, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------ errors


def test_mismatched_channels_name_the_shapes():
    s, t = seg(60, C_S), seg(61, C_T)
    with pytest.raises(ValueError, match=r"CPKDLoss: .*5 channels, got teacher \(2, 8, 3, 7\) vs student "
                                         r"\(2, 5, 3, 7\).*paraphraser encoding"):
        CPKDLoss()([s.deep], [t.deep])


def test_mismatched_pixel_counts_are_refused():
    s, t = seg(62, C_S), seg(63, C_S, tap=(4, 4))
    with pytest.raises(ValueError, match=r"same number of pixels.*\(2, 5, 4, 4\) and \(2, 5, 3, 7\)"):
        CPKDLoss()([s.deep], [t.deep])


def test_inputs_are_checked_before_the_maths():
    s, f = seg(64, C_S), feats(65)
    bad = s.deep.clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"CPKDLoss: `student\[0\] \(deep\)` \(2, 5, 3, 7\) holds NaN"):
        CPKDLoss()([bad], [f[1]])
    with pytest.raises(ValueError, match=r"CPKDLoss: `teacher` must hold 1 tensor\(s\) \(deep\), got 2"):
        CPKDLoss()([s.deep], list(f))


@pytest.mark.parametrize("kwargs,match", [
    ({"channel_weight": -1.0}, "channel_weight must be a finite number >= 0"),
    ({"pixel_weight": float("nan")}, "pixel_weight must be a finite number >= 0"),
    ({"tau": 0.0}, "tau must be a finite number > 0"),
    ({"tau": True}, "tau must be a finite number > 0"),
    ({"backend": "gram"}, r"backend must be one of naive, chunked, triton, auto; got 'gram'"),
])
def test_bad_hyper_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=rf"CPKDLoss: {match}"):
        CPKDLoss(**kwargs)


def test_defaults_and_reads():
    loss = CPKDLoss()
    assert (loss.weight, loss.channel_weight, loss.pixel_weight, loss.tau, loss.backend) == (1.0, 1.0, 1.0, 1.0, "auto")
    reads = CPKDLoss.reads
    assert reads.features == ("deep",) and reads.teacher == "paraphrased" and reads.matched_channels
    assert not reads.labels and reads.taps
