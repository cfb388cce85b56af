"""What every distillation loss shares: one call signature, fp32 maths, and a teacher that is a constant.

    loss = SomeLoss(weight=...)                    # hyper-parameters at construction
    value = loss(student, teacher, labels, teacher_feats=None)   # scalar fp32 tensor, weight applied

`student` and `teacher` are `SegOutput(logits, shallow, deep)` (or any 3-tuple in that order): logits
(B, K, H, W), taps (B, C, h, w). `teacher_feats`, when given, is a (shallow, deep) pair that replaces the
teacher's taps, e.g. the paraphraser encodings whose channel counts match the student's.

Losses over more than two taps per network (`needs_taps`, e.g. Graph Flow) also take `student_taps` and
`teacher_taps`: equally long sequences of (B, C, h, w) maps, ordered shallow to deep.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from cocofast.models.base import SegOutput


def shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_same_shape(loss: str, name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{loss}: `{name_a}` and `{name_b}` must have the same shape, got {shape_str(a)} and "
                         f"{shape_str(b)}")


def _check_map(loss: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{loss}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{loss}: `{name}` must have shape (B, C, H, W), got {shape_str(t)}")
    if not t.is_floating_point():
        raise ValueError(f"{loss}: `{name}` must be a floating-point tensor, got dtype {t.dtype}")


def _as_output(loss: str, role: str, out) -> SegOutput:
    if not isinstance(out, tuple) or len(out) != 3:
        raise ValueError(f"{loss}: `{role}` must be a SegOutput(logits, shallow, deep), got {type(out).__name__}")
    out = SegOutput(*out)
    for field, t in zip(SegOutput._fields, out):
        _check_map(loss, f"{role}.{field}", t)
    if len({t.shape[0] for t in out}) != 1:
        raise ValueError(f"{loss}: `{role}` fields have different batch sizes: "
                         + ", ".join(f"{f} {shape_str(t)}" for f, t in zip(SegOutput._fields, out)))
    return out


class DistillLoss(nn.Module):
    """Base class: subclasses set `default_weight` and implement `compute(student, teacher, labels)`.

    `compute` sees fp32 copies with autocast off, and teacher tensors already detached (teacher_feats, when
    given, already in place of the teacher's taps), so no subclass can leak gradient into the teacher or
    lose precision to bf16/fp16 autocast. It returns the unweighted scalar; `forward` applies the weight.
    """

    default_weight: ClassVar[float] = 1.0
    needs_labels: ClassVar[bool] = False
    # True where the teacher's taps must first be brought to the student's channel counts (teacher_feats).
    needs_teacher_feats: ClassVar[bool] = False
    # True where the loss reads a chain of taps per network (student_taps / teacher_taps), not just the pair.
    needs_taps: ClassVar[bool] = False
    # False for losses on logits alone: the trainer then skips paraphrasing the teacher's taps for them.
    reads_taps: ClassVar[bool] = True

    def __init__(self, weight: float | None = None):
        super().__init__()
        weight = self.default_weight if weight is None else float(weight)
        if not math.isfinite(weight):
            raise ValueError(f"{type(self).__name__}: weight must be a finite number, got {weight!r}")
        self.weight = weight

    def compute(self, student: SegOutput, teacher: SegOutput, labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def compute_taps(self, student: SegOutput, teacher: SegOutput, labels: torch.Tensor | None,
                     student_taps: list[torch.Tensor], teacher_taps: list[torch.Tensor]) -> torch.Tensor:
        """For `needs_taps` losses, in place of `compute`: taps already fp32, teacher ones detached."""
        raise NotImplementedError

    def _check_taps(self, student_taps, teacher_taps, batch: int) -> None:
        name = type(self).__name__
        for role, taps in (("student_taps", student_taps), ("teacher_taps", teacher_taps)):
            if not isinstance(taps, (tuple, list)) or len(taps) < 2:
                raise ValueError(f"{name} needs `{role}`: a sequence of at least two (B, C, h, w) maps, got "
                                 f"{type(taps).__name__}" + (f" of length {len(taps)}" if
                                                             isinstance(taps, (tuple, list)) else ""))
            for i, t in enumerate(taps):
                _check_map(name, f"{role}[{i}]", t)
                if t.shape[0] != batch:
                    raise ValueError(f"{name}: `{role}[{i}]` {shape_str(t)} has batch size {t.shape[0]}, "
                                     f"the logits have {batch}")
        if len(student_taps) != len(teacher_taps):
            raise ValueError(f"{name}: `student_taps` and `teacher_taps` must be equally long, got "
                             f"{len(student_taps)} and {len(teacher_taps)}")

    def forward(self, student, teacher, labels: torch.Tensor | None = None, *, teacher_feats=None,
                student_taps=None, teacher_taps=None) -> torch.Tensor:
        name = type(self).__name__
        student = _as_output(name, "student", student)
        teacher = _as_output(name, "teacher", teacher)
        if teacher_feats is not None:
            if not isinstance(teacher_feats, (tuple, list)) or len(teacher_feats) != 2:
                raise ValueError(f"{name}: `teacher_feats` must be a (shallow, deep) pair of tensors, got "
                                 f"{type(teacher_feats).__name__}")
            for field, t in zip(("shallow", "deep"), teacher_feats):
                _check_map(name, f"teacher_feats.{field}", t)
            teacher = SegOutput(teacher.logits, *teacher_feats)
        if student.logits.shape[0] != teacher.logits.shape[0] or any(
                t.shape[0] != student.logits.shape[0] for t in teacher):
            raise ValueError(f"{name}: student and teacher batch sizes differ: student logits "
                             f"{shape_str(student.logits)}, teacher " +
                             ", ".join(f"{f} {shape_str(t)}" for f, t in zip(SegOutput._fields, teacher)))
        if self.needs_labels and labels is None:
            raise ValueError(f"{name} needs `labels` (B, H, W) of class indices; got None")
        if self.needs_taps:
            self._check_taps(student_taps, teacher_taps, student.logits.shape[0])
        with torch.autocast(student.logits.device.type, enabled=False):
            s = SegOutput(*(t.float() for t in student))
            t = SegOutput(*(x.detach().float() for x in teacher))
            if self.needs_taps:
                s_taps = [x.float() for x in student_taps]
                t_taps = [x.detach().float() for x in teacher_taps]
                return self.weight * self.compute_taps(s, t, labels, s_taps, t_taps)
            return self.weight * self.compute(s, t, labels)

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}"
