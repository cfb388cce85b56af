"""CoCo distillation (SPEC §2.6): (φ_T − φ_S)², φ the cross-layer correlation of one network's two taps.

With `teacher_feats` (the paraphraser encodings) φ_T is taken from those instead of the raw teacher taps.
The networks need not agree on channels or sizes; only the two taps of one network must share h·w.
"""
from __future__ import annotations

from cocofast.losses.base import DistillLoss
from cocofast.similarity import BACKENDS, coco_loss


class CoCoLoss(DistillLoss):
    default_weight = 1.0  # λ of the paper

    def __init__(self, weight: float | None = None, backend: str = "auto"):
        super().__init__(weight)
        if backend not in BACKENDS:
            raise ValueError(f"{type(self).__name__}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = backend

    def compute(self, student, teacher, labels):
        return coco_loss([(teacher.shallow, teacher.deep)], [(student.shallow, student.deep)], backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
