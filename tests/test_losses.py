"""cocofast.losses against float64 numpy formulas written out here, plus gradient flow, autocast and errors."""
import math

import numpy as np
import pytest
import torch

from cocofast.losses import LOSSES, DistillLoss, get_loss, list_losses
from cocofast.models.base import SegOutput

ALL = ["at", "cmss", "coco", "cpkd", "emkd", "fsp", "graph_flow", "ifvd", "kd", "skd_pairwise", "skd_pixel"]
# Which student fields each loss reads (the others must receive no gradient).
READS = {"kd": ("logits",), "skd_pixel": ("logits",), "at": ("shallow", "deep"), "fsp": ("shallow", "deep"),
         "coco": ("shallow", "deep"), "skd_pairwise": ("deep",), "cmss": ("deep",), "ifvd": ("deep",), "cpkd": ("deep",),
         "emkd": ("logits", "shallow", "deep"), "graph_flow": ()}
B, K, H = 2, 3, 24  # batch, classes, input size; taps at H/4 = 6


def seg(seed, c_shallow, c_deep, tap=H // 4, size=H, classes=K, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(B, classes, size, size, generator=g) * 2,
         torch.randn(B, c_shallow, tap, tap, generator=g),
         torch.randn(B, c_deep, tap, tap, generator=g).relu() + 0.1 * torch.randn(B, c_deep, tap, tap, generator=g)]
    return SegOutput(*(x.requires_grad_(requires_grad) for x in t))


def labels_for(seed, size=H, classes=K):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, classes, (B, size, size), generator=g)
    lab[0, :4, :4] = 255  # an ignore region
    lab[1][lab[1] == 1] = 0  # class 1 absent from image 1
    return lab


def np64(t):
    return t.detach().double().numpy()


def close(actual, expected, rtol=1e-4, atol=1e-7):
    assert actual.dtype == torch.float32 and actual.dim() == 0
    np.testing.assert_allclose(actual.item(), expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------- float64 references


def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def ref_kd(s, t, temperature):
    p_s, p_t = softmax(s / temperature, 1), softmax(t / temperature, 1)
    return float(np.mean(np.sum(p_t * np.log(p_t / p_s), axis=1)) * temperature**2)


def bilinear_matrix(n_in, n_out):
    """Rows of weights reproducing bilinear resizing with half-pixel centres (align_corners=False)."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(math.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        m[i, i0] += 1 - frac
        m[i, i1] += frac
    return m


def resize(img, h, w):
    return bilinear_matrix(img.shape[0], h) @ img @ bilinear_matrix(img.shape[1], w).T


def ref_at(fs, ft, p=2.0):
    total = 0.0
    for b in range(fs.shape[0]):
        a_s = (np.abs(fs[b]) ** p).mean(axis=0)
        a_t = (np.abs(ft[b]) ** p).mean(axis=0)
        if a_s.shape != a_t.shape:
            a_s = resize(a_s, *a_t.shape)
        a_s = a_s.ravel() / max(np.sqrt((a_s**2).sum()), 1e-12)
        a_t = a_t.ravel() / max(np.sqrt((a_t**2).sum()), 1e-12)
        total += ((a_s - a_t) ** 2).sum()
    return total / (fs.shape[0] * a_t.size)


def ref_fsp_matrix(f1, f2):
    c1, h, w = f1.shape
    if f2.shape[1:] != f1.shape[1:]:
        f2 = np.stack([resize(ch, h, w) for ch in f2])
    return f1.reshape(c1, -1) @ f2.reshape(f2.shape[0], -1).T / (h * w)


def ref_fsp(s_sh, s_dp, t_sh, t_dp):
    diffs = [ref_fsp_matrix(s_sh[b], s_dp[b]) - ref_fsp_matrix(t_sh[b], t_dp[b]) for b in range(s_sh.shape[0])]
    return float(np.mean(np.stack(diffs) ** 2))


def max_pool(f, k):
    c, h, w = f.shape
    hp, wp = -(-h // k) * k, -(-w // k) * k
    padded = np.full((c, hp, wp), -np.inf)
    padded[:, :h, :w] = f
    return padded.reshape(c, hp // k, k, wp // k, k).max(axis=(2, 4))


def similarity_matrix(f, channel_mix):
    """N×N cosine similarity of pixel feature vectors, after softmax(global max) channel weights if mixing."""
    g = f.reshape(f.shape[0], -1).T  # (N, C)
    if channel_mix:
        g = g * softmax(g.max(axis=0), 0)
    a = g / np.maximum(np.sqrt((g**2).sum(axis=1, keepdims=True)), 1e-6)
    return a @ a.T


def ref_pairwise(ft, fs, channel_mix, pool):
    total = 0.0
    for b in range(ft.shape[0]):
        pt, ps = max_pool(ft[b], pool), max_pool(fs[b], pool)
        n = pt.shape[1] * pt.shape[2]
        total += ((similarity_matrix(pt, channel_mix) - similarity_matrix(ps, channel_mix)) ** 2).sum() / n**2
    return total / ft.shape[0]


def ref_phi(f1, f2):
    m1, m2 = similarity_matrix(f1, True), similarity_matrix(f2, True)
    return (m1 * m2).sum() / np.sqrt((m1**2).sum() * (m2**2).sum())


def ref_coco(t_sh, t_dp, s_sh, s_dp):
    return float(np.mean([(ref_phi(t_sh[b], t_dp[b]) - ref_phi(s_sh[b], s_dp[b])) ** 2 for b in range(len(t_sh))]))


def ref_ifvd(fs, ft, labels, classes, stride):
    small = labels[:, ::stride, ::stride]
    total, count = 0.0, 0
    for b in range(fs.shape[0]):
        lab = small[b].ravel()
        maps = []
        for f in (fs[b], ft[b]):
            g = f.reshape(f.shape[0], -1).T
            cos = np.ones(len(lab))
            for i, k in enumerate(lab):
                if 0 <= k < classes:
                    members = g[lab == k]
                    proto = members.sum(axis=0) / (len(members) + 1e-6)
                    cos[i] = g[i] @ proto / (max(np.linalg.norm(g[i]), 1e-8) * max(np.linalg.norm(proto), 1e-8))
            maps.append(cos)
        total += ((maps[0] - maps[1]) ** 2).sum()
        count += len(lab)
    return total / count


# ----------------------------------------------------------------------------------------- registry


def test_registry_lists_every_loss_with_spec_defaults():
    assert list_losses() == ALL
    for name in ALL:
        loss = get_loss(name)
        assert isinstance(loss, LOSSES[name]) and isinstance(loss, DistillLoss)
    defaults = {"kd": 1.0, "at": 1000.0, "skd_pairwise": 0.5, "skd_pixel": 10.0, "ifvd": 200.0, "coco": 1.0}
    assert {n: get_loss(n).weight for n in defaults} == defaults
    assert get_loss("kd").temperature == 4.0 and get_loss("skd_pixel").temperature == 1.0


def test_registry_rejects_unknown_names_and_hyper_parameters():
    with pytest.raises(ValueError, match=r"unknown distillation loss 'kdd'.*known losses: at, cmss"):
        get_loss("kdd")
    with pytest.raises(ValueError, match=r"'kd' got unknown hyper-parameter\(s\) temp; it accepts: weight, temperature"):
        get_loss("kd", temp=2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        get_loss("kd", temperature=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        get_loss("coco", backend="fast")


# ------------------------------------------------------------------------------- values vs float64


@pytest.mark.parametrize("kwargs,weight,temperature", [({}, 1.0, 4.0), ({"weight": 0.3, "temperature": 2.0}, 0.3, 2.0)])
def test_kd(kwargs, weight, temperature):
    s, t = seg(1, 4, 6), seg(2, 8, 5)
    close(get_loss("kd", **kwargs)(s, t), weight * ref_kd(np64(s.logits), np64(t.logits), temperature))


def test_kd_is_zero_for_identical_logits():
    s = seg(1, 4, 6)
    assert get_loss("kd")(s, s).abs().item() < 1e-6


def test_skd_pixel():
    s, t = seg(3, 4, 6), seg(4, 8, 5)
    close(get_loss("skd_pixel")(s, t), 10.0 * ref_kd(np64(s.logits), np64(t.logits), 1.0))


@pytest.mark.parametrize("student_tap", [6, 4, 9])  # same grid as the teacher, smaller, larger
def test_at(student_tap):
    s, t = seg(5, 4, 6, tap=student_tap), seg(6, 8, 5)
    expected = 1000.0 * (ref_at(np64(s.shallow), np64(t.shallow)) + ref_at(np64(s.deep), np64(t.deep)))
    close(get_loss("at")(s, t), expected)


def test_at_with_p_4():
    s, t = seg(5, 4, 6), seg(6, 8, 5)
    expected = 2.0 * (ref_at(np64(s.shallow), np64(t.shallow), 4) + ref_at(np64(s.deep), np64(t.deep), 4))
    close(get_loss("at", weight=2.0, p=4.0)(s, t), expected)


@pytest.mark.parametrize("deep_tap", [6, 3])  # deep on the shallow grid, and coarser (resized)
def test_fsp_uses_teacher_feats(deep_tap):
    g = torch.Generator().manual_seed(7)
    s = seg(7, 4, 6)
    s = SegOutput(s.logits, s.shallow, torch.randn(B, 6, deep_tap, deep_tap, generator=g))
    t = seg(8, 8, 5)  # channels differ from the student's: only the paraphrased features can be compared
    feats = (torch.randn(B, 4, 6, 6, generator=g), torch.randn(B, 6, deep_tap, deep_tap, generator=g))
    expected = ref_fsp(np64(s.shallow), np64(s.deep), np64(feats[0]), np64(feats[1]))
    close(get_loss("fsp")(s, t, teacher_feats=feats), expected)


def test_fsp_without_matching_channels_names_the_shapes():
    s, t = seg(7, 4, 6), seg(8, 8, 5)
    with pytest.raises(ValueError, match=r"teacher shapes \(2, 8, 6, 6\) and \(2, 5, 6, 6\).*student \(2, 4, 6, 6\) "
                                         r"and \(2, 6, 6, 6\).*teacher_feats"):
        get_loss("fsp")(s, t)


@pytest.mark.parametrize("name,mix", [("skd_pairwise", False), ("cmss", True)])
@pytest.mark.parametrize("tap", [6, 5])  # even, and odd (the last row/column pools alone)
def test_pairwise_similarity(name, mix, tap):
    s, t = seg(9, 4, 6, tap=tap), seg(10, 8, 5, tap=tap)
    close(get_loss(name)(s, t), 0.5 * ref_pairwise(np64(t.deep), np64(s.deep), mix, 2))


def test_cmss_without_pooling():
    s, t = seg(9, 4, 6), seg(10, 8, 5)
    close(get_loss("cmss", weight=1.0, pool_kernel=1)(s, t), ref_pairwise(np64(t.deep), np64(s.deep), True, 1))


def test_ifvd():
    s, t, lab = seg(11, 4, 6), seg(12, 8, 5), labels_for(13)
    expected = 200.0 * ref_ifvd(np64(s.deep), np64(t.deep), lab.numpy(), K, H // (H // 4))
    close(get_loss("ifvd")(s, t, lab), expected)


def test_ifvd_needs_labels():
    with pytest.raises(ValueError, match=r"IFVDLoss needs `labels` \(B, H, W\)"):
        get_loss("ifvd")(seg(11, 4, 6), seg(12, 8, 5))
    with pytest.raises(ValueError, match="integer tensor"):
        get_loss("ifvd")(seg(11, 4, 6), seg(12, 8, 5), torch.zeros(B, H, H))


@pytest.mark.parametrize("use_feats", [False, True])
def test_coco(use_feats):
    s, t = seg(14, 4, 6), seg(15, 8, 5)
    g = torch.Generator().manual_seed(16)
    feats = (torch.randn(B, 4, 6, 6, generator=g), torch.randn(B, 6, 6, 6, generator=g).relu()) if use_feats else None
    t_sh, t_dp = feats if use_feats else (t.shallow, t.deep)
    expected = ref_coco(np64(t_sh), np64(t_dp), np64(s.shallow), np64(s.deep))
    assert expected > 1e-6  # a meaningful, non-degenerate comparison
    close(get_loss("coco")(s, t, teacher_feats=feats), expected)


# -------------------------------------------------------------------------- gradients and autocast


def _inputs(name, requires_grad):
    student = seg(20, 4, 6, requires_grad=requires_grad)
    teacher = seg(21, 4, 6, requires_grad=requires_grad)
    g = torch.Generator().manual_seed(22)
    feats = tuple(torch.randn(B, c, 6, 6, generator=g).requires_grad_(requires_grad) for c in (4, 6))
    return student, teacher, labels_for(23), feats if name in ("fsp", "coco", "cpkd") else None


def _graph(name, requires_grad):
    """Three-tap chains for losses that read them (graph_flow), else no taps."""
    if not LOSSES[name].needs_taps:
        return {}
    g = torch.Generator().manual_seed(24)
    chain = lambda channels: [torch.randn(B, c, 6, 6, generator=g).requires_grad_(requires_grad)  # noqa: E731
                              for c in channels]
    return {"student_taps": chain((3, 4, 5)), "teacher_taps": chain((6, 7, 8))}


@pytest.mark.parametrize("name", ALL)
def test_gradient_reaches_the_student_only(name):
    student, teacher, labels, feats = _inputs(name, requires_grad=True)
    taps = _graph(name, requires_grad=True)
    loss = get_loss(name)(student, teacher, labels, teacher_feats=feats, **taps)
    loss.backward()
    for field, t in zip(SegOutput._fields, student):
        if field in READS[name]:
            assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, field
        else:
            assert t.grad is None, field
    for t in taps.get("student_taps", []):
        assert t.grad is not None and t.grad.abs().sum() > 0
    for t in list(teacher) + list(feats or ()) + taps.get("teacher_taps", []):
        assert t.grad is None


@pytest.mark.parametrize("name", ALL)
def test_bf16_autocast_computes_in_fp32(name):
    student, teacher, labels, feats = _inputs(name, requires_grad=False)
    half = lambda ts: tuple(t.bfloat16() for t in ts) if ts is not None else None  # noqa: E731
    s16, t16, f16 = SegOutput(*half(student)), SegOutput(*half(teacher)), half(feats)
    taps16 = {k: half(v) for k, v in _graph(name, requires_grad=False).items()}
    loss = get_loss(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(s16, t16, labels, teacher_feats=f16, **taps16)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    # The same bf16 values, widened outside autocast: equal only if nothing inside ran in bf16.
    wide = lambda ts: tuple(t.float() for t in ts) if ts is not None else None  # noqa: E731
    expected = loss(SegOutput(*wide(s16)), SegOutput(*wide(t16)), labels, teacher_feats=wide(f16),
                    **{k: wide(v) for k, v in taps16.items()})
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-9)


def test_bad_inputs_are_named():
    s, t = seg(1, 4, 6), seg(2, 8, 5, size=16)
    with pytest.raises(ValueError, match=r"`student.logits` and `teacher.logits` must have the same shape"):
        get_loss("kd")(s, t)
    with pytest.raises(ValueError, match=r"`teacher_feats` must be a \(shallow, deep\) pair"):
        get_loss("coco")(s, t, teacher_feats=s.deep)
    with pytest.raises(ValueError, match=r"`student.deep` must have shape \(B, C, H, W\)"):
        get_loss("kd")(SegOutput(s.logits, s.shallow, s.deep[0]), t)
