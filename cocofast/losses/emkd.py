"""EMKD (Qin et al. 2021, "Efficient Medical Image Segmentation Based on Knowledge Distillation").

    EMKD = pmd_weight·PMD + imd_weight·IMD + rad_weight·RAD          (0.1 / 0.9 / 0.9, T = 4)

PMD, pixel-wise map distillation: Hinton KD per pixel on the logits (B, K, H, W),
    mean over (B, H, W) of KL(softmax(t/T) ‖ softmax(s/T)) · T².
IMD, importance map distillation, on the shallow and deep taps, summed: a tap's importance map is
    mean_c |F|⁴ (B, 1, h, w), flattened and L2-normalised per image; the loss is the MSE of the student's and
    teacher's maps (attention transfer with p = 4; the student's map is resized bilinearly to the teacher's
    grid when they differ). Channel counts may differ.
RAD, region affinity distillation, on the deep tap (B, C, h, w): labels nearest-downsampled to (h, w); per
    image and class k present there, the region vector r_k (C,) is the mean feature over pixels labelled k.
    The image's region contrast rc is the mean of cos(r_i, r_j) over present class pairs i < j (for two
    classes just cos(r_0, r_1), the paper's form); RAD = mean over images with at least one pair of
    (rc_S − rc_T)². Images with fewer than two present classes add nothing; with no such image at all RAD is
    a 0 that still carries a graph. Labels outside 0..K−1 (e.g. 255) belong to no class. Student and teacher
    deep taps may differ in channels but must share h×w, so both see the same downsampled labels.

The supervised term that goes with it (0.5·focal + 0.5·dice) is cocofast.losses.supervised.focal_dice_loss;
this loss is the distillation part only.
"""
from __future__ import annotations

from typing import Sequence

import torch

from cocofast.losses.at import attention_distance
from cocofast.losses.base import (DistillLoss, Reads, check_non_negative, check_positive, check_same_shape,
                                  shape_str)
from cocofast.losses.labels import class_means, class_membership, downsample_labels
from cocofast.losses.kd import pixel_kl
from cocofast.losses.registry import register_loss


def pixel_map_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           temperature: float = 4.0) -> torch.Tensor:
    check_same_shape("pixel_map_distillation", "student_logits", student_logits, "teacher_logits", teacher_logits)
    return pixel_kl(student_logits, teacher_logits, temperature) * temperature ** 2


def importance_map_distillation(student_taps: Sequence[torch.Tensor],
                                teacher_taps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over paired taps of the p = 4 attention distance."""
    if len(student_taps) != len(teacher_taps) or not student_taps:
        raise ValueError(f"importance_map_distillation: `student_taps` and `teacher_taps` must be equally long "
                         f"and non-empty, got {len(student_taps)} and {len(teacher_taps)}")
    return sum(attention_distance(f_s, f_t, p=4.0) for f_s, f_t in zip(student_taps, teacher_taps))


def region_contrast(feat: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, h, w) features, (B, h, w) labels -> rc (B,) and the number of present class pairs (B,).

    rc is 0 where an image has no pair, so callers can weight by (pairs > 0) without a host sync.
    """
    member, _, counts = class_membership(labels, num_classes, feat.dtype)
    regions = class_means(feat, member, counts)                                 # (B, C, K)
    unit = regions / regions.norm(dim=1, keepdim=True).clamp_min(eps)
    cosines = torch.bmm(unit.transpose(1, 2), unit)                             # (B, K, K)
    present = (counts > 0).to(feat.dtype)
    upper = torch.ones(num_classes, num_classes, dtype=torch.bool, device=feat.device).triu(diagonal=1)
    pairs = present[:, :, None] * present[:, None, :] * upper.to(feat.dtype)       # (B, K, K), i < j both present
    n_pairs = pairs.sum(dim=(1, 2))
    return (cosines * pairs).sum(dim=(1, 2)) / n_pairs.clamp_min(1), n_pairs


def region_affinity_distillation(student_deep: torch.Tensor, teacher_deep: torch.Tensor, labels: torch.Tensor,
                                 num_classes: int) -> torch.Tensor:
    name = "region_affinity_distillation"
    if not isinstance(labels, torch.Tensor) or labels.dim() != 3 or labels.is_floating_point() \
            or labels.dtype == torch.bool:
        got = f"{shape_str(labels)} {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{name}: `labels` must be an integer tensor (B, H, W) of class indices, got {got}")
    if labels.shape[0] != student_deep.shape[0]:
        raise ValueError(f"{name}: `labels` {shape_str(labels)} and the student's deep tap "
                         f"{shape_str(student_deep)} have different batch sizes")
    if student_deep.shape[-2:] != teacher_deep.shape[-2:]:
        raise ValueError(f"{name}: the student's and teacher's deep taps must share h×w, got "
                         f"{shape_str(student_deep)} and {shape_str(teacher_deep)}")
    small = downsample_labels(labels.to(student_deep.device), tuple(student_deep.shape[-2:]))
    rc_s, n_pairs = region_contrast(student_deep, small, num_classes)
    rc_t, _ = region_contrast(teacher_deep, small, num_classes)
    counted = (n_pairs > 0).to(rc_s.dtype)
    return (counted * (rc_s - rc_t).square()).sum() / counted.sum().clamp_min(1)


@register_loss("emkd")
class EMKDLoss(DistillLoss):
    reads = Reads("logits", "shallow", "deep", teacher="raw", labels=True)
    default_weight = 1.0
    aliases = {"T": "temperature"}

    def __init__(self, weight: float | None = None, pmd_weight: float = 0.1, imd_weight: float = 0.9,
                 rad_weight: float = 0.9, temperature: float = 4.0):
        super().__init__(weight)
        name = type(self).__name__
        self.pmd_weight = check_non_negative(name, "pmd_weight", pmd_weight)
        self.imd_weight = check_non_negative(name, "imd_weight", imd_weight)
        self.rad_weight = check_non_negative(name, "rad_weight", rad_weight)
        self.temperature = check_positive(name, "temperature", temperature)

    def distill(self, student, teacher, labels):
        name = type(self).__name__
        (s_logits, s_shallow, s_deep), (t_logits, t_shallow, t_deep) = student, teacher
        check_same_shape(name, "student[0] (logits)", s_logits, "teacher[0] (logits)", t_logits)
        pmd = pixel_map_distillation(s_logits, t_logits, self.temperature)
        imd = importance_map_distillation((s_shallow, s_deep), (t_shallow, t_deep))
        try:
            rad = region_affinity_distillation(s_deep, t_deep, labels, s_logits.shape[1])
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        return self.pmd_weight * pmd + self.imd_weight * imd + self.rad_weight * rad

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, pmd_weight={self.pmd_weight:g}, imd_weight={self.imd_weight:g}, "
                f"rad_weight={self.rad_weight:g}, temperature={self.temperature:g}")
