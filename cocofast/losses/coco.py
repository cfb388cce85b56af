"""CoCo distillation (CoCo DistillNet §III-B, eq. 3, 4 and 7): (φ_T − φ_S)², φ the cross-layer correlation of one network's two taps.

The paper takes φ_T from the paraphraser encodings of the teacher's taps (Kim et al. 2018's paraphraser).
The networks need not agree on channels or sizes; only the two taps of one network must share h·w.
"""
from __future__ import annotations

from cocofast.losses.base import DistillLoss, Reads
from cocofast.losses.registry import register_loss
from cocofast.ops.backends import check_backend
from cocofast.ops.similarity import coco_loss


@register_loss("coco")
class CoCoLoss(DistillLoss):
    reads = Reads("shallow", "deep", teacher="paraphrased")
    default_weight = 1.0  # λ of the paper
    op_family = "similarity"

    def __init__(self, weight: float | None = None, backend: str = "auto"):
        super().__init__(weight)
        self.backend = check_backend(self.op_family, backend, where=type(self).__name__)

    def distill(self, student, teacher, labels):
        return coco_loss([tuple(teacher)], [tuple(student)], backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
