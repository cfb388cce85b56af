"""cocofast.losses against float64 numpy formulas written out here, plus what each loss reads, gradient flow,
input checks (finiteness, labels), autocast and the registry's errors."""
import math
import re
from collections import namedtuple

import numpy as np
import pytest
import torch

from cocofast.losses import IGNORE_INDEX, LOSSES, DistillLoss, LossSpec, Reads, get_loss, list_losses, parse_losses
from reference import close, np64, softmax

ALL = ["at", "cmss", "coco", "cpkd", "emkd", "fsp", "graph_flow", "ifvd", "kd", "skd_pairwise", "skd_pixel"]
# What each loss declares it reads: (features, teacher view, matched_channels, labels).
READS = {"kd": (("logits",), "raw", False, False),
         "skd_pixel": (("logits",), "raw", False, False),
         "at": (("shallow", "deep"), "raw", False, False),
         "fsp": (("shallow", "deep"), "paraphrased", True, False),
         "coco": (("shallow", "deep"), "paraphrased", False, False),
         "skd_pairwise": (("deep",), "paraphrased", False, False),
         "cmss": (("deep",), "paraphrased", False, False),
         "ifvd": (("logits", "deep"), "raw", False, True),
         "cpkd": (("deep",), "paraphrased", True, False),
         "emkd": (("logits", "shallow", "deep"), "raw", False, True),
         "graph_flow": (("chain",), "raw", False, False)}
# The student inputs gradient must reach: all that are read, except IFVD's logits (read for the class count).
GRADIENT = {name: features for name, (features, *_) in READS.items()}
GRADIENT["ifvd"] = ("deep",)
B, K, H = 2, 3, 24  # batch, classes, input size; taps at H/4 = 6

Net = namedtuple("Net", "logits shallow deep")


def seg(seed, c_shallow, c_deep, tap=H // 4, size=H, classes=K, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(B, classes, size, size, generator=g) * 2,
         torch.randn(B, c_shallow, tap, tap, generator=g),
         torch.randn(B, c_deep, tap, tap, generator=g).relu() + 0.1 * torch.randn(B, c_deep, tap, tap, generator=g)]
    return Net(*(x.requires_grad_(requires_grad) for x in t))


def labels_for(seed, size=H, classes=K):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, classes, (B, size, size), generator=g)
    lab[0, :4, :4] = IGNORE_INDEX  # an ignore region
    lab[1][lab[1] == 1] = 0  # class 1 absent from image 1
    return lab


# --------------------------------------------------------------------------------- float64 references


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
    with pytest.raises(ValueError, match=r"unknown distillation loss 'kdd' \(did you mean kd.*known losses: at, cmss"):
        get_loss("kdd")
    with pytest.raises(ValueError, match=r"unknown distillation loss 'zzz'; known losses: at, cmss"):
        get_loss("zzz")
    with pytest.raises(ValueError, match=r"'kd' got unknown hyper-parameter\(s\) temp; it accepts: weight, "
                                         r"temperature, T \(= temperature\)"):
        get_loss("kd", temp=2)
    with pytest.raises(ValueError, match=r"'coco' got unknown hyper-parameter\(s\) T, tau; it accepts: weight, backend"):
        get_loss("coco", tau=1, T=2)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        get_loss("kd", temperature=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        get_loss("coco", backend="fast")


def test_hyper_parameter_aliases():
    assert get_loss("kd", T=2).temperature == 2.0
    assert get_loss("emkd", T=3).temperature == 3.0
    assert get_loss("cmss", pool=1).pool_kernel == 1


def test_parse_losses_reads_weights_and_aliases():
    specs = parse_losses("kd:1:T=2, coco")
    assert specs == [LossSpec("kd", 1.0, {"T": 2}), LossSpec("coco", None, {})]
    kd, coco = (spec.build() for spec in specs)
    assert (type(kd), kd.weight, kd.temperature) == (LOSSES["kd"], 1.0, 2.0)
    assert (type(coco), coco.weight) == (LOSSES["coco"], 1.0)
    assert parse_losses("") == [] and parse_losses(" none ") == []
    assert parse_losses("cpkd:tau=0.5")[0].build().tau == 0.5
    assert parse_losses("coco")[0].build(backend="naive").backend == "naive"  # a default the spec does not set


@pytest.mark.parametrize("text,message", [
    ("kd,kdd", r"unknown distillation loss 'kdd' \(did you mean kd"),
    ("nonsense", r"unknown distillation loss 'nonsense'; known losses: at, cmss"),
    ("kd:temp=2", r"loss 'kd' got unknown hyper-parameter\(s\) temp; it accepts: weight, temperature"),
    ("coco:1:T=2", r"loss 'coco' got unknown hyper-parameter\(s\) T"),
    ("kd:big", r"weight of 'kd' must be a number, got 'big'"),
    ("kd:1:2", r"'kd' has two weights in 'kd:1:2'"),
    ("kd,kd:2", r"'kd' is listed twice"),
    ("kd:T=0", r"KDLoss: temperature must be a finite number > 0, got 0"),
])
def test_parse_losses_errors_name_the_culprit(text, message):
    with pytest.raises(ValueError, match=message):
        parse_losses(text)


# ------------------------------------------------------------------------------------------- reads


@pytest.mark.parametrize("name", ALL)
def test_each_loss_declares_what_it_reads(name):
    features, teacher, matched, labels = READS[name]
    reads = LOSSES[name].reads
    assert isinstance(reads, Reads)
    assert (reads.features, reads.teacher, reads.matched_channels, reads.labels) == (features, teacher, matched, labels)
    assert reads.taps == (features != ("logits",))


def test_reads_rejects_bad_declarations():
    for args, kwargs, message in [((), {}, "features must be distinct"), (("logit",), {}, "features must be distinct"),
                                  (("deep", "deep"), {}, "features must be distinct"),
                                  (("chain", "deep"), {}, r"'chain' alone"),
                                  (("deep",), {"teacher": "para"}, "teacher must be one of"),
                                  (("deep",), {"labels": True}, "must also read 'logits'")]:
        with pytest.raises(ValueError, match=message):
            Reads(*args, **kwargs)


# ------------------------------------------------------------------------------- values vs float64


@pytest.mark.parametrize("kwargs,weight,temperature", [({}, 1.0, 4.0), ({"weight": 0.3, "temperature": 2.0}, 0.3, 2.0)])
def test_kd(kwargs, weight, temperature):
    s, t = seg(1, 4, 6), seg(2, 8, 5)
    close(get_loss("kd", **kwargs)([s.logits], [t.logits]), weight * ref_kd(np64(s.logits), np64(t.logits), temperature))


def test_kd_is_zero_for_identical_logits():
    s = seg(1, 4, 6)
    assert get_loss("kd")([s.logits], [s.logits]).abs().item() < 1e-6


def test_skd_pixel():
    s, t = seg(3, 4, 6), seg(4, 8, 5)
    close(get_loss("skd_pixel")([s.logits], [t.logits]), 10.0 * ref_kd(np64(s.logits), np64(t.logits), 1.0))


@pytest.mark.parametrize("student_tap", [6, 4, 9])  # same grid as the teacher, smaller, larger
def test_at(student_tap):
    s, t = seg(5, 4, 6, tap=student_tap), seg(6, 8, 5)
    expected = 1000.0 * (ref_at(np64(s.shallow), np64(t.shallow)) + ref_at(np64(s.deep), np64(t.deep)))
    close(get_loss("at")([s.shallow, s.deep], [t.shallow, t.deep]), expected)


def test_at_with_p_4():
    s, t = seg(5, 4, 6), seg(6, 8, 5)
    expected = 2.0 * (ref_at(np64(s.shallow), np64(t.shallow), 4) + ref_at(np64(s.deep), np64(t.deep), 4))
    close(get_loss("at", weight=2.0, p=4.0)([s.shallow, s.deep], [t.shallow, t.deep]), expected)


@pytest.mark.parametrize("deep_tap", [6, 3])  # deep on the shallow grid, and coarser (resized)
def test_fsp_on_paraphrased_teacher(deep_tap):
    g = torch.Generator().manual_seed(7)
    s = seg(7, 4, 6)
    s = Net(s.logits, s.shallow, torch.randn(B, 6, deep_tap, deep_tap, generator=g))
    # The raw teacher's channels (8, 5) differ from the student's: only paraphrased encodings can be compared.
    feats = (torch.randn(B, 4, 6, 6, generator=g), torch.randn(B, 6, deep_tap, deep_tap, generator=g))
    expected = ref_fsp(np64(s.shallow), np64(s.deep), np64(feats[0]), np64(feats[1]))
    close(get_loss("fsp")([s.shallow, s.deep], list(feats)), expected)


def test_fsp_without_matching_channels_names_the_shapes():
    s, t = seg(7, 4, 6), seg(8, 8, 5)
    with pytest.raises(ValueError, match=r"teacher shapes \(2, 8, 6, 6\) and \(2, 5, 6, 6\).*student \(2, 4, 6, 6\) "
                                         r"and \(2, 6, 6, 6\).*paraphraser encodings"):
        get_loss("fsp")([s.shallow, s.deep], [t.shallow, t.deep])


@pytest.mark.parametrize("name,mix", [("skd_pairwise", False), ("cmss", True)])
@pytest.mark.parametrize("tap", [6, 5])  # even, and odd (the last row/column pools alone)
def test_pairwise_similarity(name, mix, tap):
    s, t = seg(9, 4, 6, tap=tap), seg(10, 8, 5, tap=tap)
    close(get_loss(name)([s.deep], [t.deep]), 0.5 * ref_pairwise(np64(t.deep), np64(s.deep), mix, 2))


def test_cmss_without_pooling():
    s, t = seg(9, 4, 6), seg(10, 8, 5)
    close(get_loss("cmss", weight=1.0, pool_kernel=1)([s.deep], [t.deep]),
          ref_pairwise(np64(t.deep), np64(s.deep), True, 1))


def test_ifvd():
    s, t, lab = seg(11, 4, 6), seg(12, 8, 5), labels_for(13)
    expected = 200.0 * ref_ifvd(np64(s.deep), np64(t.deep), lab.numpy(), K, H // (H // 4))
    close(get_loss("ifvd")([s.logits, s.deep], [t.logits, t.deep], lab), expected)


def test_ifvd_needs_labels():
    s, t = seg(11, 4, 6), seg(12, 8, 5)
    with pytest.raises(ValueError, match=r"IFVDLoss needs `labels` \(B, H, W\)"):
        get_loss("ifvd")([s.logits, s.deep], [t.logits, t.deep])
    with pytest.raises(ValueError, match="integer tensor"):
        get_loss("ifvd")([s.logits, s.deep], [t.logits, t.deep], torch.zeros(B, H, H))
    with pytest.raises(ValueError, match=r"`labels` \(2, 12, 12\) must be \(B, H, W\) of the logits, i.e. \(2, 24, 24\)"):
        get_loss("ifvd")([s.logits, s.deep], [t.logits, t.deep], labels_for(13, size=12))


@pytest.mark.parametrize("paraphrased", [False, True])
def test_coco(paraphrased):
    s, t = seg(14, 4, 6), seg(15, 8, 5)
    g = torch.Generator().manual_seed(16)
    feats = (torch.randn(B, 4, 6, 6, generator=g), torch.randn(B, 6, 6, 6, generator=g).relu())
    t_sh, t_dp = feats if paraphrased else (t.shallow, t.deep)
    expected = ref_coco(np64(t_sh), np64(t_dp), np64(s.shallow), np64(s.deep))
    assert expected > 1e-6  # a meaningful, non-degenerate comparison
    close(get_loss("coco")([s.shallow, s.deep], [t_sh, t_dp]), expected)


# ------------------------------------------------------------------ inputs built from what a loss reads


def _inputs(name, requires_grad, dtype=torch.float32):
    """(student, teacher, labels, student_by_feature) for `name`, in the order its `reads` declares.

    Equal channels throughout, so a raw teacher and a paraphrased one (the student's channels) look alike here;
    graph_flow gets three-tap chains of differing channels.
    """
    convert = lambda x: x.to(dtype).requires_grad_(requires_grad)  # noqa: E731
    student, teacher = seg(20, 4, 6), seg(21, 4, 6)
    features = READS[name][0]
    if features == ("chain",):
        g = torch.Generator().manual_seed(24)
        s = [convert(torch.randn(B, c, 6, 6, generator=g)) for c in (3, 4, 5)]
        t = [convert(torch.randn(B, c, 6, 6, generator=g)) for c in (6, 7, 8)]
        return s, t, None, {f"chain tap {i}": x for i, x in enumerate(s)}
    s = [convert(getattr(student, f)) for f in features]
    t = [convert(getattr(teacher, f)) for f in features]
    return s, t, labels_for(23) if READS[name][3] else None, dict(zip(features, s))


def _names(name, count):
    features = READS[name][0]
    return [f"chain tap {i}" for i in range(count)] if features == ("chain",) else list(features)


@pytest.mark.parametrize("name", ALL)
def test_gradient_reaches_exactly_the_student_inputs_it_reads(name):
    student, teacher, labels, by_feature = _inputs(name, requires_grad=True)
    loss = get_loss(name)(student, teacher, labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    wanted = set(by_feature) if name == "graph_flow" else set(GRADIENT[name])
    for feature, t in by_feature.items():
        if feature in wanted:
            assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, feature
        else:
            assert t.grad is None, feature
    assert all(t.grad is None for t in teacher)


@pytest.mark.parametrize("name", ALL)
def test_bf16_autocast_returns_fp32(name):
    student, teacher, labels, _ = _inputs(name, requires_grad=False)
    s16, t16 = [t.bfloat16() for t in student], [t.bfloat16() for t in teacher]
    loss = get_loss(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(s16, t16, labels)
    assert value.dtype == torch.float32 and value.dim() == 0 and torch.isfinite(value)
    # The same bf16 values, widened outside autocast: equal only if nothing inside ran in bf16.
    expected = loss([t.float() for t in s16], [t.float() for t in t16], labels)
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------- input checks


@pytest.mark.parametrize("kind,value", [("NaN", float("nan")), ("Inf", float("inf")), ("Inf", float("-inf"))])
@pytest.mark.parametrize("role", ["student", "teacher"])
@pytest.mark.parametrize("name", ALL)
def test_non_finite_input_is_refused_and_named(name, role, kind, value):
    """Formerly e.g. kd or at given a NaN returned NaN, and the step poisoned the student's weights."""
    student, teacher, labels, _ = _inputs(name, requires_grad=False)
    loss = get_loss(name)
    seq = student if role == "student" else teacher
    for i, feature in enumerate(_names(name, len(seq))):
        bad = seq[i].clone()
        bad[1, 0, 2, 3] = value
        s = [bad if (role == "student" and j == i) else x for j, x in enumerate(student)]
        t = [bad if (role == "teacher" and j == i) else x for j, x in enumerate(teacher)]
        shape = "(" + ", ".join(map(str, bad.shape)) + ")"
        with pytest.raises(ValueError, match=re.escape(f"`{role}[{i}] ({feature})` {shape} holds {kind} values")):
            loss(s, t, labels)


@pytest.mark.parametrize("name", ["ifvd", "emkd"])
def test_labels_outside_the_classes_are_refused_and_255_accepted(name):
    """Formerly a label >= num_classes (not 255) was silently treated as no class."""
    student, teacher, labels, _ = _inputs(name, requires_grad=False)
    loss = get_loss(name)
    assert torch.isfinite(loss(student, teacher, labels)) and (labels == 255).any()
    everything_ignored = torch.full_like(labels, IGNORE_INDEX)
    assert torch.isfinite(loss(student, teacher, everything_ignored))
    for value in (K, K + 7, 254, -1):
        bad = labels.clone()
        bad[1, 5, 6] = value
        with pytest.raises(ValueError, match=rf"`labels` hold values outside 0..{K - 1} that are not the ignore "
                                             rf"index 255, e.g. {value}"):
            loss(student, teacher, bad)
    uint8 = labels.to(torch.uint8)  # a common on-disk dtype: 255 is its ignore value too
    torch.testing.assert_close(loss(student, teacher, uint8), loss(student, teacher, labels))


def test_bad_inputs_are_named():
    s, t = seg(1, 4, 6), seg(2, 8, 5, size=16)
    kd, coco = get_loss("kd"), get_loss("coco")
    with pytest.raises(ValueError, match=re.escape("`student[0] (logits)` and `teacher[0] (logits)` must have the "
                                                   "same shape, got (2, 3, 24, 24) and (2, 3, 16, 16)")):
        kd([s.logits], [t.logits])
    with pytest.raises(ValueError, match=re.escape("CoCoLoss: `teacher` must hold 2 tensor(s) (shallow, deep), "
                                                   "got 1")):
        coco([s.shallow, s.deep], [t.deep])
    with pytest.raises(ValueError, match=r"KDLoss: `student` must be a sequence of tensors \(logits\), got Tensor"):
        kd(s.logits, [t.logits])
    with pytest.raises(ValueError, match=re.escape("`student[1] (deep)` must have shape (B, C, H, W), got (6, 6, 6)")):
        coco([s.shallow, s.deep[0]], [t.shallow, t.deep])
    with pytest.raises(ValueError, match=re.escape("`teacher[0] (logits)` must be a floating-point tensor, got dtype "
                                                   "torch.int64")):
        kd([s.logits], [t.logits.long()])
    with pytest.raises(ValueError, match=re.escape("`teacher[0] (shallow)` must be a torch.Tensor, got ndarray")):
        coco([s.shallow, s.deep], [np64(t.shallow), t.deep])
    with pytest.raises(ValueError, match=re.escape("batch sizes differ: student[0] (logits) (2, 3, 24, 24), "
                                                   "teacher[0] (logits) (1, 3, 24, 24)")):
        kd([s.logits], [s.logits[:1]])


# ------------------------------------------------------------------------- degenerate inputs and settings


@pytest.mark.parametrize("name", ["kd", "at", "fsp", "skd_pixel", "ifvd", "emkd"])
def test_an_empty_batch_is_refused(name):
    student, teacher, labels, _ = _inputs(name, requires_grad=False)
    with pytest.raises(ValueError, match="empty"):
        get_loss(name)([x[:0] for x in student], [x[:0] for x in teacher], None if labels is None else labels[:0])


def test_an_alias_and_its_full_name_together_are_refused():
    with pytest.raises(ValueError, match="'temperature' twice"):
        get_loss("kd", T=2, temperature=3)
    with pytest.raises(ValueError, match="'temperature' twice"):
        parse_losses("kd:T=2:temperature=3")


@pytest.mark.parametrize("weight", [-1.0, "big", True, float("nan")])
def test_a_negative_or_non_numeric_weight_is_refused_naming_the_loss(weight):
    with pytest.raises(ValueError, match="KDLoss: weight must be a finite number >= 0"):
        get_loss("kd", weight=weight)
