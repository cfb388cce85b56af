"""Hinton's logit distillation, per pixel: KL(softmax(t/T) ‖ softmax(s/T))·T², mean over images and pixels."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cocofast.losses.base import DistillLoss, check_same_shape


def pixel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over (B, H, W) of KL(softmax(t/T) ‖ softmax(s/T)), the class axis being dim 1."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1).mean()


class KDLoss(DistillLoss):
    """T² keeps the gradient's scale independent of the temperature (Hinton et al. 2015)."""

    default_weight = 1.0
    reads_taps = False

    def __init__(self, weight: float | None = None, temperature: float = 4.0):
        super().__init__(weight)
        if not temperature > 0:
            raise ValueError(f"{type(self).__name__}: temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def compute(self, student, teacher, labels):
        check_same_shape(type(self).__name__, "student.logits", student.logits, "teacher.logits", teacher.logits)
        return pixel_kl(student.logits, teacher.logits, self.temperature) * self.temperature ** 2

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature:g}"
