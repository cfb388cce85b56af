"""Flow of solution procedure (Yim et al. 2017) between the shallow and the deep tap.

Each network's FSP matrix is G = F₁F₂ᵀ/(h·w), C_shallow × C_deep; the loss is the mean squared difference of
the student's and teacher's G. The two G must have the same shape, so the teacher's taps are normally replaced
by paraphraser encodings with the student's channel counts. Spatial sizes may differ
between the networks; within one network the deep tap is resized (bilinear) to the shallow one's grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cocofast.losses.base import DistillLoss, Reads, shape_str


def fsp_matrix(shallow: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
    """(B, C₁, h, w), (B, C₂, h', w') -> (B, C₁, C₂)."""
    if deep.shape[-2:] != shallow.shape[-2:]:
        deep = F.interpolate(deep, size=shallow.shape[-2:], mode="bilinear", align_corners=False)
    h, w = shallow.shape[-2:]
    return torch.bmm(shallow.flatten(2), deep.flatten(2).transpose(1, 2)) / (h * w)


class FSPLoss(DistillLoss):
    reads = Reads("shallow", "deep", teacher="paraphrased", matched_channels=True)
    default_weight = 1.0

    def distill(self, student, teacher, labels):
        s_channels = tuple(t.shape[1] for t in student)
        t_channels = tuple(t.shape[1] for t in teacher)
        if s_channels != t_channels:
            raise ValueError(
                f"{type(self).__name__}: FSP needs the teacher's (shallow, deep) channel counts to equal the "
                f"student's {s_channels}, got teacher shapes {shape_str(teacher[0])} and {shape_str(teacher[1])} "
                f"vs student {shape_str(student[0])} and {shape_str(student[1])}; give it the paraphraser "
                "encodings of the teacher's taps (k = the student's channels)")
        return (fsp_matrix(*student) - fsp_matrix(*teacher)).square().mean()
