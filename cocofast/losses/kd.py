"""Hinton's logit distillation, per pixel: KL(softmax(t/T) ‖ softmax(s/T))·T², mean over images and pixels."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cocofast.losses.base import DistillLoss, Reads, check_positive, check_same_shape
from cocofast.losses.registry import register_loss


def pixel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over (B, H, W) of KL(softmax(t/T) ‖ softmax(s/T)), the class axis being dim 1."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1).mean()


@register_loss("kd")
class KDLoss(DistillLoss):
    """T² keeps the gradient's scale independent of the temperature (Hinton et al. 2015)."""

    reads = Reads("logits")
    default_weight = 1.0
    aliases = {"T": "temperature"}

    def __init__(self, weight: float | None = None, temperature: float = 4.0):
        super().__init__(weight)
        self.temperature = check_positive(type(self).__name__, "temperature", temperature)

    def distill(self, student, teacher, labels):
        (s,), (t,) = student, teacher
        check_same_shape(type(self).__name__, "student[0] (logits)", s, "teacher[0] (logits)", t)
        return pixel_kl(s, t, self.temperature) * self.temperature ** 2

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature:g}"
