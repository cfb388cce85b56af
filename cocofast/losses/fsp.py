"""Flow of solution procedure (Yim et al. 2017) between the shallow and the deep tap.

Each network's FSP matrix is G = F₁F₂ᵀ/(h·w), C_shallow × C_deep; the loss is the mean squared difference of
the student's and teacher's G. The two G must have the same shape, so the teacher's taps are normally replaced
by paraphraser encodings with the student's channel counts. Spatial sizes may differ
between the networks; within one network the deep tap is resized (bilinear) to the shallow one's grid.

The loss is of fourth degree in the features: finite maps large enough to overflow it (or G's sum over
pixels) in the accumulation dtype are refused, naming the map, as the similarity losses refuse theirs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cocofast.losses.base import DistillLoss, Reads, shape_str
from cocofast.losses.registry import register_loss
from cocofast.ops.checks import accumulation_dtype, check_magnitude


def fsp_matrix(shallow: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
    """(B, C₁, h, w), (B, C₂, h', w') -> (B, C₁, C₂)."""
    if deep.shape[-2:] != shallow.shape[-2:]:
        deep = F.interpolate(deep, size=shallow.shape[-2:], mode="bilinear", align_corners=False)
    h, w = shallow.shape[-2:]
    return torch.bmm(shallow.flatten(2), deep.flatten(2).transpose(1, 2)) / (h * w)


@register_loss("fsp")
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
        self.check_magnitudes(student, teacher)
        return (fsp_matrix(*student) - fsp_matrix(*teacher)).square().mean()

    def check_magnitudes(self, student, teacher) -> None:
        """|G| <= M² and its pixel sum <= h·w·M², the loss sums B·C₁·C₂ squares of differences <= 2M²: both
        must stay below the accumulation dtype's largest value, M being the largest |value| of any map."""
        acc = accumulation_dtype(*student, *teacher)
        big = torch.finfo(acc).max
        pixels = max(t[0].shape[2] * t[0].shape[3] for t in (student, teacher))
        terms = student[0].shape[0] * student[0].shape[1] * student[1].shape[1]
        limit = min(math.sqrt(big / pixels), (big / (4 * terms)) ** 0.25)
        maps = [*zip(self.names("student", 2), student), *zip(self.names("teacher", 2), teacher)]
        peaks = torch.stack([t.detach().abs().amax() for _, t in maps]).tolist()  # one host sync
        for (name, t), peak in zip(maps, peaks):
            check_magnitude(type(self).__name__, name, t, peak, limit,
                            f"the {str(acc)[6:]} FSP loss (fourth powers of the features, summed over "
                            f"{pixels} pixels and B·C₁·C₂ = {terms} entries) can overflow above {{limit}}")
