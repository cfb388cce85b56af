"""SKD's pixel-wise distillation (Liu et al. 2019): per-pixel KL of the class distributions at T = 1.

SKD's reference code writes it as a cross-entropy with the teacher's soft labels; KL differs from that by the
teacher's entropy, a constant for the student, so the gradient is the same and a perfect student scores 0.
"""
from __future__ import annotations

from cocofast.losses.kd import KDLoss
from cocofast.losses.registry import register_loss


@register_loss("skd_pixel")
class SKDPixelLoss(KDLoss):
    default_weight = 10.0

    def __init__(self, weight: float | None = None, temperature: float = 1.0):
        super().__init__(weight, temperature)
