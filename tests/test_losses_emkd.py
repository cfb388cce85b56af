"""EMKD (PMD, IMD, RAD) and the focal/dice supervised losses against float64 numpy formulas written out here."""
import math
from collections import namedtuple

import numpy as np
import pytest
import torch

from cocofast.losses.emkd import (EMKDLoss, importance_map_distillation, pixel_map_distillation,
                                  region_affinity_distillation)
from cocofast.losses import IGNORE_INDEX
from cocofast.losses.supervised import dice_loss, focal_dice_loss, focal_loss
from reference import close, np64, softmax

B, H, TAP = 2, 15, 5  # batch, input size, tap size: labels are nearest-downsampled with stride 3
STRIDE = H // TAP
IGNORE = 255
assert IGNORE == IGNORE_INDEX

Net = namedtuple("Net", "logits shallow deep")  # the order EMKDLoss.reads declares


def seg(seed, classes, c_shallow, c_deep, tap=TAP, requires_grad=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(B, classes, H, H, generator=g, dtype=torch.float64) * 2,
         torch.randn(B, c_shallow, tap, tap, generator=g, dtype=torch.float64),
         torch.randn(B, c_deep, tap, tap, generator=g, dtype=torch.float64).relu()
         + 0.3 * torch.randn(B, c_deep, tap, tap, generator=g, dtype=torch.float64)]
    return Net(*(x.to(dtype).requires_grad_(requires_grad) for x in t))


def labels_for(seed, classes):
    """Image 0 holds every class; image 1 holds class 0 only on the tap grid, plus ignore pixels in both.

    Image 1 has a second class off the tap grid (rows not on the stride), which the supervised losses see but
    RAD must not: after downsampling that image has a single class and adds nothing to RAD.
    """
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, classes, (B, H, H), generator=g)
    lab[0, :STRIDE, :STRIDE * 2] = IGNORE
    lab[1] = 0
    lab[1, 1::STRIDE] = classes - 1
    lab[1, ::STRIDE, -STRIDE:] = IGNORE
    return lab


# --------------------------------------------------------------------------------- float64 references


def ref_focal(logits, labels, gamma=2.0):
    p = softmax(logits, 1)
    terms = [-(1 - p[b, k, i, j]) ** gamma * np.log(p[b, k, i, j])
             for (b, i, j), k in np.ndenumerate(labels) if k != IGNORE]
    return float(np.mean(terms)) if terms else 0.0


def ref_dice(logits, labels, eps=1.0):
    p = softmax(logits, 1)
    per_image = []
    for b in range(len(labels)):
        valid = labels[b] != IGNORE
        scores = []
        for k in range(logits.shape[1]):
            y = (labels[b] == k) & valid
            pk = p[b, k] * valid
            scores.append((2 * (pk * y).sum() + eps) / (pk.sum() + y.sum() + eps))
        per_image.append(1 - np.mean(scores))
    return float(np.mean(per_image))


def ref_pmd(s, t, temperature=4.0):
    p_s, p_t = softmax(s / temperature, 1), softmax(t / temperature, 1)
    return float(np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1)) * temperature**2)


def bilinear_matrix(n_in, n_out):
    """Weights reproducing 1-D bilinear resizing with half-pixel centres (align_corners=False)."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = int(math.floor(src))
        hi = min(lo + 1, n_in - 1)
        m[i, lo] += 1 - (src - lo)
        m[i, hi] += src - lo
    return m


def ref_importance(fs, ft):
    total = 0.0
    for b in range(len(fs)):
        a_s, a_t = (fs[b] ** 4).mean(axis=0), (ft[b] ** 4).mean(axis=0)
        if a_s.shape != a_t.shape:
            a_s = bilinear_matrix(a_s.shape[0], a_t.shape[0]) @ a_s @ bilinear_matrix(a_s.shape[1], a_t.shape[1]).T
        q_s, q_t = a_s.ravel() / np.linalg.norm(a_s), a_t.ravel() / np.linalg.norm(a_t)
        total += ((q_s - q_t) ** 2).sum()
    return total / (len(fs) * a_t.size)


def ref_imd(s, t):
    return ref_importance(np64(s.shallow), np64(t.shallow)) + ref_importance(np64(s.deep), np64(t.deep))


def ref_region_contrast(f, lab, classes):
    """None where fewer than two classes are present, else the mean pairwise cosine of region means."""
    present = [k for k in range(classes) if (lab == k).any()]
    regions = {k: f[:, lab == k].mean(axis=1) for k in present}
    cosines = [regions[i] @ regions[j] / (np.linalg.norm(regions[i]) * np.linalg.norm(regions[j]))
               for a, i in enumerate(present) for j in present[a + 1:]]
    return np.mean(cosines) if cosines else None


def ref_rad(fs, ft, labels, classes):
    small = labels[:, ::STRIDE, ::STRIDE]
    terms = []
    for b in range(len(fs)):
        rc_s, rc_t = ref_region_contrast(fs[b], small[b], classes), ref_region_contrast(ft[b], small[b], classes)
        if rc_s is not None:
            terms.append((rc_s - rc_t) ** 2)
    return float(np.mean(terms)) if terms else 0.0


def ref_emkd(s, t, labels, classes):
    rad = ref_rad(np64(s.deep), np64(t.deep), labels.numpy(), classes)
    return 0.1 * ref_pmd(np64(s.logits), np64(t.logits)) + 0.9 * ref_imd(s, t) + 0.9 * rad


# ------------------------------------------------------------------------------- supervised losses


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("gamma", [2.0, 0.5, 0.0])
def test_focal(classes, gamma):
    logits, lab = seg(1, classes, 3, 4).logits, labels_for(2, classes)
    close(focal_loss(logits, lab, gamma=gamma), ref_focal(np64(logits), lab.numpy(), gamma))


@pytest.mark.parametrize("classes", [2, 3])
def test_dice(classes):
    logits, lab = seg(3, classes, 3, 4).logits, labels_for(4, classes)
    close(dice_loss(logits, lab), ref_dice(np64(logits), lab.numpy()))
    close(dice_loss(logits, lab, eps=1e-3), ref_dice(np64(logits), lab.numpy(), eps=1e-3))


@pytest.mark.parametrize("classes", [2, 3])
def test_focal_dice_is_the_even_mix(classes):
    logits, lab = seg(5, classes, 3, 4).logits, labels_for(6, classes)
    expected = 0.5 * ref_focal(np64(logits), lab.numpy()) + 0.5 * ref_dice(np64(logits), lab.numpy())
    close(focal_dice_loss(logits, lab), expected)


def test_supervised_losses_on_fully_ignored_labels_are_zero_with_a_graph():
    logits = seg(7, 2, 3, 4, requires_grad=True).logits
    lab = torch.full((B, H, H), IGNORE)
    value = focal_dice_loss(logits, lab)
    assert value.item() == 0.0
    value.backward()
    assert logits.grad is not None and logits.grad.abs().sum() == 0


def test_supervised_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, 3, (2, 4, 5), generator=g)
    lab[0, 0] = IGNORE
    assert torch.autograd.gradcheck(lambda x: focal_loss(x, lab), (logits,))
    assert torch.autograd.gradcheck(lambda x: focal_loss(x, lab, gamma=0.5), (logits,))
    assert torch.autograd.gradcheck(lambda x: dice_loss(x, lab), (logits,))


# ------------------------------------------------------------------------------------- EMKD terms


def test_pmd():
    s, t = seg(10, 3, 3, 4), seg(11, 3, 5, 6)
    close(pixel_map_distillation(s.logits, t.logits), ref_pmd(np64(s.logits), np64(t.logits)))
    close(pixel_map_distillation(s.logits, t.logits, 2.0), ref_pmd(np64(s.logits), np64(t.logits), 2.0))


@pytest.mark.parametrize("student_tap", [TAP, 4, 7])  # the teacher's grid, coarser, finer
def test_imd(student_tap):
    s, t = seg(12, 2, 3, 4, tap=student_tap), seg(13, 2, 5, 6)
    value = importance_map_distillation((s.shallow, s.deep), (t.shallow, t.deep))
    close(value, ref_imd(s, t))


@pytest.mark.parametrize("classes", [2, 3])
def test_rad(classes):
    s, t, lab = seg(14, classes, 3, 4), seg(15, classes, 5, 6), labels_for(16, classes)
    expected = ref_rad(np64(s.deep), np64(t.deep), lab.numpy(), classes)
    assert expected > 1e-6  # image 0 alone counts; a mean over both images would halve this
    close(region_affinity_distillation(s.deep, t.deep, lab, classes), expected)


def test_rad_three_classes_averages_every_present_pair():
    s, t = seg(17, 3, 3, 4), seg(18, 3, 5, 6)
    lab = labels_for(19, 3)
    lab[1, ::STRIDE, ::STRIDE] = torch.tensor([0, 1, 2, 1, IGNORE]).repeat(TAP, 1)  # 3 pairs in image 1 too
    expected = ref_rad(np64(s.deep), np64(t.deep), lab.numpy(), 3)
    close(region_affinity_distillation(s.deep, t.deep, lab, 3), expected)


def test_rad_without_any_class_pair_is_a_zero_with_a_graph():
    s, t = seg(20, 2, 3, 4, requires_grad=True), seg(21, 2, 5, 6)
    lab = torch.zeros(B, H, H, dtype=torch.long)
    lab[1, :5] = IGNORE
    value = region_affinity_distillation(s.deep, t.deep, lab, 2)
    assert value.item() == 0.0
    value.backward()
    assert s.deep.grad is not None and s.deep.grad.abs().sum() == 0


def test_rad_gradient_matches_finite_differences():
    s, t, lab = seg(22, 3, 3, 4, dtype=torch.float64), seg(23, 3, 5, 6, dtype=torch.float64), labels_for(24, 3)
    f_s = s.deep.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: region_affinity_distillation(x, t.deep, lab, 3), (f_s,))


@pytest.mark.parametrize("classes", [2, 3])
def test_emkd_with_default_weights(classes):
    s, t, lab = seg(25, classes, 3, 4), seg(26, classes, 5, 6), labels_for(27, classes)
    loss = EMKDLoss()
    assert (loss.weight, loss.pmd_weight, loss.imd_weight, loss.rad_weight, loss.temperature) == \
        (1.0, 0.1, 0.9, 0.9, 4.0)
    reads = EMKDLoss.reads
    assert reads.features == ("logits", "shallow", "deep") and reads.teacher == "raw" and reads.labels
    assert not reads.matched_channels
    close(loss(list(s), list(t), lab), ref_emkd(s, t, lab, classes))


def test_emkd_hyper_parameters():
    s, t, lab = seg(28, 2, 3, 4), seg(29, 2, 5, 6), labels_for(30, 2)
    loss = EMKDLoss(weight=2.0, pmd_weight=1.0, imd_weight=0.0, rad_weight=3.0, temperature=2.0)
    expected = 2.0 * (ref_pmd(np64(s.logits), np64(t.logits), 2.0)
                      + 3.0 * ref_rad(np64(s.deep), np64(t.deep), lab.numpy(), 2))
    close(loss(list(s), list(t), lab), expected)


# -------------------------------------------------------------------------- gradients and autocast


def test_gradient_reaches_the_student_only():
    s, t, lab = seg(31, 3, 3, 4, requires_grad=True), seg(32, 3, 5, 6, requires_grad=True), labels_for(33, 3)
    EMKDLoss()(list(s), list(t), lab).backward()
    for field, x in zip(Net._fields, s):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, field
    assert all(x.grad is None for x in t)


def test_bf16_autocast_computes_in_fp32():
    s, t, lab = seg(34, 3, 3, 4), seg(35, 3, 5, 6), labels_for(36, 3)
    s16, t16 = Net(*(x.bfloat16() for x in s)), Net(*(x.bfloat16() for x in t))
    loss = EMKDLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(list(s16), list(t16), lab)
        supervised = focal_dice_loss(s16.logits, lab)
    assert value.dtype == torch.float32 and supervised.dtype == torch.float32
    # The same bf16 values, widened outside autocast: equal only if nothing inside ran in bf16.
    wide = lambda out: [x.float() for x in out]  # noqa: E731
    torch.testing.assert_close(value, loss(wide(s16), wide(t16), lab), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(supervised, focal_dice_loss(s16.logits.float(), lab), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------- bad inputs


def test_bad_supervised_inputs_are_named():
    logits, lab = seg(37, 2, 3, 4).logits, labels_for(38, 2)
    with pytest.raises(ValueError, match=r"focal_loss: `labels` \(2, 14, 15\) must be \(B, H, W\) of the logits, "
                                         r"i.e. \(2, 15, 15\)"):
        focal_loss(logits, lab[:, 1:])
    with pytest.raises(ValueError, match=r"dice_loss: `labels` must be an integer tensor.*torch.float32"):
        dice_loss(logits, lab.float())
    with pytest.raises(ValueError, match=r"focal_dice_loss: `logits` must be a floating-point tensor"):
        focal_dice_loss(logits[0], lab)
    with pytest.raises(ValueError, match=r"values outside 0..1 that are not the ignore index 255, e.g. 2"):
        focal_dice_loss(logits, torch.full_like(lab, 2))
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        focal_loss(logits, lab, gamma=-1)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        dice_loss(logits, lab, eps=0)


def test_bad_emkd_inputs_are_named():
    s, t, lab = seg(39, 2, 3, 4), seg(40, 2, 5, 6), labels_for(41, 2)
    t_coarse = [t.logits, t.shallow, t.deep[..., :4, :4]]
    with pytest.raises(ValueError, match=r"EMKDLoss: .*deep taps must share h×w, got \(2, 4, 5, 5\) and "
                                         r"\(2, 6, 4, 4\)"):
        EMKDLoss()(list(s), t_coarse, lab)
    with pytest.raises(ValueError, match=r"EMKDLoss needs `labels`"):
        EMKDLoss()(list(s), list(t))
    with pytest.raises(ValueError, match=r"EMKDLoss: .*`labels` must be an integer tensor"):
        EMKDLoss()(list(s), list(t), lab.float())
    with pytest.raises(ValueError, match=r"EMKDLoss: `labels` \(2, 5, 5\) must be \(B, H, W\) of the logits"):
        EMKDLoss()(list(s), list(t), lab[:, ::STRIDE, ::STRIDE])
    with pytest.raises(ValueError, match=r"`student\[0\] \(logits\)` and `teacher\[0\] \(logits\)` must have the "
                                         r"same shape"):
        EMKDLoss()(list(s), list(seg(42, 3, 5, 6)), lab)
    with pytest.raises(ValueError, match=r"EMKDLoss: `student` must hold 3 tensor\(s\) \(logits, shallow, deep\), "
                                         r"got 2"):
        EMKDLoss()([s.logits, s.deep], list(t), lab)
    with pytest.raises(ValueError, match=r"must be equally long and non-empty, got 2 and 1"):
        importance_map_distillation((s.shallow, s.deep), (t.shallow,))
    for kwargs, message in [({"pmd_weight": -0.1}, "pmd_weight must be a finite number >= 0"),
                            ({"rad_weight": float("nan")}, "rad_weight must be"),
                            ({"temperature": 0}, "temperature must be a finite number > 0")]:
        with pytest.raises(ValueError, match=message):
            EMKDLoss(**kwargs)


@pytest.mark.parametrize("kind,value", [("NaN", float("nan")), ("Inf", float("inf"))])
@pytest.mark.parametrize("index,feature", [(0, "logits"), (1, "shallow"), (2, "deep")])
def test_non_finite_emkd_inputs_are_named(index, feature, kind, value):
    s, t, lab = seg(43, 2, 3, 4), seg(44, 2, 5, 6), labels_for(45, 2)
    bad = list(s)
    bad[index] = bad[index].clone()
    bad[index][0, 1, 2, 3] = value
    with pytest.raises(ValueError, match=rf"EMKDLoss: `student\[{index}\] \({feature}\)` .* holds {kind} values"):
        EMKDLoss()(bad, list(t), lab)


@pytest.mark.parametrize("classes", [2, 3])
def test_emkd_labels_outside_the_classes_are_refused_and_255_kept_out_of_rad(classes):
    """Formerly a label >= num_classes was silently read as "no class"; now only 255 is."""
    s, t, lab = seg(46, classes, 3, 4), seg(47, classes, 5, 6), labels_for(48, classes)
    loss = EMKDLoss()
    assert (lab == IGNORE).any()
    close(loss(list(s), list(t), lab), ref_emkd(s, t, lab, classes))
    bad = lab.clone()
    bad[0, 3, 3] = classes  # on the tap grid, so RAD would have read it
    with pytest.raises(ValueError, match=rf"EMKDLoss: `labels` hold values outside 0..{classes - 1} that are not the "
                                         rf"ignore index 255, e.g. {classes}"):
        loss(list(s), list(t), bad)
