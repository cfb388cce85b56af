"""What every distillation loss shares: tensors in, one weighted fp32 scalar out, its inputs declared once.

    class KDLoss(DistillLoss):
        reads = Reads("logits")                     # what the loss reads, declared once
        def distill(self, student, teacher, labels):
            (s,), (t,) = student, teacher           # fp32, teacher detached, already checked
            return ...

    KDLoss(temperature=2.0)([student_logits], [teacher_logits])   # weight applied

`student` and `teacher` are sequences of (B, C, H, W) tensors in the order `reads.features` names them:
"logits" (B, K, H, W), "shallow" and "deep" (the two taps, (B, C, h, w)), or "chain" alone (a loss over a
chain of two or more taps per network, shallow to deep, e.g. Graph Flow). `reads.teacher` says which teacher
taps the loss is defined on: "raw" (the teacher's own) or "paraphrased" (the paraphraser encodings, the
CoCo DistillNet paper's choice; `matched_channels` where the maths needs the student's channel counts, as
FSP's and CPKD's C×C matrices do). Losses with `reads.labels` also take labels (B, H, W) of class indices,
`IGNORE_INDEX` marking pixels of no class; they read "logits" too, for the class count.

`forward` checks everything once (types, shapes, batch sizes, finiteness, label range), then hands
`distill` fp32 copies with autocast off and the teacher detached, so no subclass can leak gradient into the
teacher or lose precision to bf16/fp16. A loss knows nothing of the trainer, its config or the networks.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

FEATURES = ("logits", "shallow", "deep", "chain")
TEACHER_VIEWS = ("raw", "paraphrased")
IGNORE_INDEX = 255


def shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_same_shape(loss: str, name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{loss}: `{name_a}` and `{name_b}` must have the same shape, got {shape_str(a)} and "
                         f"{shape_str(b)}")


def check_map(loss: str, name: str, t) -> None:
    """A floating-point (B, C, H, W) tensor."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{loss}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{loss}: `{name}` must have shape (B, C, H, W), got {shape_str(t)}")
    if not t.is_floating_point():
        raise ValueError(f"{loss}: `{name}` must be a floating-point tensor, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{loss}: `{name}` {shape_str(t)} is empty; a mean over no element is NaN")


def check_finite(loss: str, named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """One host sync for all tensors; on failure, name the first one holding NaN or Inf."""
    if not named:
        return
    if bool(torch.stack([t.detach().isfinite().all() for _, t in named]).all()):
        return
    for name, t in named:
        if not bool(t.detach().isfinite().all()):
            kind = "NaN" if bool(t.detach().isnan().any()) else "Inf"
            raise ValueError(f"{loss}: `{name}` {shape_str(t)} holds {kind} values; a loss of it would be "
                             f"{kind} and the step would poison the student's weights")


def check_labels(loss: str, labels, num_classes: int, size: tuple[int, int], batch: int,
                 ignore_index: int = IGNORE_INDEX) -> None:
    """Integer (B, H, W) labels whose values are class indices 0..K-1 or `ignore_index`."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 3 or labels.is_floating_point() \
            or labels.dtype == torch.bool:
        got = f"{shape_str(labels)} {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{loss}: `labels` must be an integer tensor (B, H, W) of class indices, got {got}")
    if tuple(labels.shape) != (batch, *size):
        raise ValueError(f"{loss}: `labels` {shape_str(labels)} must be (B, H, W) of the logits, i.e. "
                         f"({batch}, {size[0]}, {size[1]})")
    # One host sync, but an out-of-range label would otherwise silently index the wrong class (or none).
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bool(bad.any()):
        raise ValueError(f"{loss}: `labels` hold values outside 0..{num_classes - 1} that are not the ignore "
                         f"index {ignore_index}, e.g. {labels[bad][0].item()}")


def check_non_negative(owner: str, name: str, value) -> float:
    """A loss hyper-parameter that must be a finite number >= 0 (a term's weight)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_positive(owner: str, name: str, value) -> float:
    """A loss hyper-parameter that must be a finite number > 0 (a temperature, an exponent)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def widen(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: bf16/fp16 widened, fp64 kept (so tests can gradcheck)."""
    return t if t.dtype == torch.float64 else t.float()


class LossOutputError(ValueError):
    """A loss's `distill` returned something other than one scalar tensor (a per-image vector, a float)."""


class Reads:
    """Which inputs a loss reads: feature names (in FEATURES order of the call), the teacher view, labels."""

    def __init__(self, *features: str, teacher: str = "raw", matched_channels: bool = False,
                 labels: bool = False):
        unknown = [f for f in features if f not in FEATURES]
        if not features or unknown or len(set(features)) != len(features) or \
                ("chain" in features and len(features) > 1):
            raise ValueError(f"Reads: features must be distinct names from {FEATURES} ('chain' alone), "
                             f"got {features}")
        if teacher not in TEACHER_VIEWS:
            raise ValueError(f"Reads: teacher must be one of {TEACHER_VIEWS}, got {teacher!r}")
        if labels and "logits" not in features:
            raise ValueError("Reads: a loss that reads labels must also read 'logits' (for the class count)")
        self.features, self.teacher, self.labels = tuple(features), teacher, labels
        self.matched_channels = matched_channels

    @property
    def taps(self) -> bool:
        """True where the loss reads a teacher feature map (not the logits alone)."""
        return self.features != ("logits",)

    def __repr__(self) -> str:
        extra = ", matched_channels=True" if self.matched_channels else ""
        return f"Reads({', '.join(map(repr, self.features))}, teacher={self.teacher!r}{extra}, labels={self.labels})"


class DistillLoss(nn.Module):
    """Subclasses set `reads` and `default_weight`, and implement `distill(student, teacher, labels)`, which
    returns the unweighted scalar; `forward` checks, casts, detaches and applies the weight."""

    reads: ClassVar[Reads]
    default_weight: ClassVar[float] = 1.0
    # Short names accepted for hyper-parameters in `--losses` (e.g. {"T": "temperature"}).
    aliases: ClassVar[dict[str, str]] = {}
    # The op family whose `backend` the trainer passes to the loss's constructor, if any.
    op_family: ClassVar[str | None] = None

    def __init__(self, weight: float | None = None):
        super().__init__()
        self.weight = check_non_negative(type(self).__name__, "weight",
                                         self.default_weight if weight is None else weight)

    def distill(self, student: list[torch.Tensor], teacher: list[torch.Tensor],
                labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def names(self, role: str, count: int) -> list[str]:
        if self.reads.features == ("chain",):
            return [f"{role}[{i}] (chain tap {i})" for i in range(count)]
        return [f"{role}[{i}] ({name})" for i, name in enumerate(self.reads.features)]

    def check(self, student, teacher, labels) -> None:
        name = type(self).__name__
        chain = self.reads.features == ("chain",)
        for role, seq in (("student", student), ("teacher", teacher)):
            if not isinstance(seq, (tuple, list)):
                raise ValueError(f"{name}: `{role}` must be a sequence of tensors "
                                 f"({', '.join(self.reads.features)}), got {type(seq).__name__}")
            if chain and len(seq) < 2:
                raise ValueError(f"{name}: `{role}` must be a chain of at least two (B, C, h, w) taps, got "
                                 f"{len(seq)}")
            if not chain and len(seq) != len(self.reads.features):
                raise ValueError(f"{name}: `{role}` must hold {len(self.reads.features)} tensor(s) "
                                 f"({', '.join(self.reads.features)}), got {len(seq)}")
        if len(student) != len(teacher):
            raise ValueError(f"{name}: `student` and `teacher` must be equally long, got {len(student)} and "
                             f"{len(teacher)}")
        named = [*zip(self.names("student", len(student)), student),
                 *zip(self.names("teacher", len(teacher)), teacher)]
        for label, t in named:
            check_map(name, label, t)
        batches = {t.shape[0] for _, t in named}
        if len(batches) != 1:
            raise ValueError(f"{name}: batch sizes differ: " + ", ".join(f"{n} {shape_str(t)}" for n, t in named))
        check_finite(name, named)
        if self.reads.labels:
            if labels is None:
                raise ValueError(f"{name} needs `labels` (B, H, W) of class indices; got None")
            logits = student[self.reads.features.index("logits")]
            check_labels(name, labels, logits.shape[1], tuple(logits.shape[-2:]), logits.shape[0])

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                labels: torch.Tensor | None = None) -> torch.Tensor:
        self.check(student, teacher, labels)
        device = student[0].device
        with torch.autocast(device.type, enabled=False):
            s = [widen(t) for t in student]
            t = [widen(x.detach()) for x in teacher]
            lab = labels.to(device) if self.reads.labels else None
            value = self.distill(s, t, lab)
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            got = f"shape {shape_str(value)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise LossOutputError(f"{type(self).__name__}.distill returned {got}; a loss returns one scalar "
                                  f"(a 0-dim tensor, e.g. the .mean() of its per-image terms)")
        return self.weight * value

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}"
