"""Attention transfer (Zagoruyko & Komodakis 2017) on both taps.

A map's attention is mean_c |F|^p over channels, flattened and L2-normalised over pixels; the loss is the
mean squared difference of the student's and teacher's attention, summed over the shallow and deep taps.
Channel counts may differ; when the spatial sizes differ, the student's raw map is resized (bilinear) to the
teacher's before normalising, so both are unit vectors on the same grid.

The normalisation makes the loss independent of each image's feature scale, so every map is first divided
by a power of two that brings its largest |value| into [0.5, 1) (exact in floating point): |F|^p and the
squares of the norm cannot overflow, and finite features of any size (1e38 included) give the loss of the
same features at unit scale instead of NaN, Inf or a silent 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cocofast.losses.base import DistillLoss, Reads, check_positive
from cocofast.losses.registry import register_loss


def attention_map(feat: torch.Tensor, p: float) -> torch.Tensor:
    """(B, C, h, w) -> (B, 1, h, w): mean over channels of |F|^p, not yet normalised."""
    return feat.abs().pow(p).mean(dim=1, keepdim=True)


def unit_peak(feat: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) scaled per image by 2^-k, k the exponent of its largest |value| (a constant: no gradient)."""
    peak = feat.detach().abs().amax(dim=(1, 2, 3), keepdim=True)
    _, exponent = torch.frexp(peak)
    return feat * torch.ldexp(torch.ones_like(peak), -exponent)  # (torch.ldexp passes no gradient to feat)


def attention_distance(f_student: torch.Tensor, f_teacher: torch.Tensor, p: float) -> torch.Tensor:
    a_s, a_t = attention_map(unit_peak(f_student), p), attention_map(unit_peak(f_teacher), p)
    if a_s.shape[-2:] != a_t.shape[-2:]:
        a_s = F.interpolate(a_s, size=a_t.shape[-2:], mode="bilinear", align_corners=False)
    q_s = F.normalize(a_s.flatten(1), dim=1)
    q_t = F.normalize(a_t.flatten(1), dim=1)
    return (q_s - q_t).square().mean()


@register_loss("at")
class ATLoss(DistillLoss):
    reads = Reads("shallow", "deep", teacher="raw")
    default_weight = 1000.0

    def __init__(self, weight: float | None = None, p: float = 2.0):
        super().__init__(weight)
        self.p = check_positive(type(self).__name__, "p", p)

    def distill(self, student, teacher, labels):
        return sum(attention_distance(s, t, self.p) for s, t in zip(student, teacher))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p:g}"
