"""The one feature adapter: what the networks produce, turned into each loss's declared inputs.

    adapter = FeatureAdapter(losses, student, teacher, paraphrasers)
    t = adapter.teacher(images)                      # no grad: logits, taps, paraphrased taps, chain
    s = adapter.student(images)                      # with grad
    args = adapter.inputs(loss, s, t, masks)         # (student tensors, teacher tensors, labels) or None

A loss's `reads` (cocofast/losses/base.py) says which features it reads; the adapter picks them, the
paraphrased teacher taps for losses defined on them (when the run has paraphrasers), the chain of taps that
forward hooks caught for losses over a chain (each network's `graph_tap_paths`), and, in semi-supervised
batches, only the labelled rows for losses that read labels. Nothing else in training knows what a loss reads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from cocofast.losses import DistillLoss
from cocofast.models.taps import FeatureTaps, unwrap_model

from .config import ConfigError
from .semi import labelled_rows


@dataclass
class Features:
    """One network's outputs for one batch; `paraphrased` (teacher only) and `chain` when some loss reads them."""
    logits: torch.Tensor
    shallow: torch.Tensor
    deep: torch.Tensor
    paraphrased: tuple[torch.Tensor, torch.Tensor] | None = None
    chain: list[torch.Tensor] | None = None

    def rows(self, index: torch.Tensor) -> "Features":
        pick = lambda ts: None if ts is None else type(ts)(t[index] for t in ts)  # noqa: E731
        one = lambda t: None if t is None else t[index]  # noqa: E731
        return Features(self.logits[index], one(self.shallow), one(self.deep), pick(self.paraphrased),
                        pick(self.chain))


def chain_paths(model: nn.Module, role: str) -> tuple[str, ...]:
    paths = getattr(unwrap_model(model), "graph_tap_paths", None)
    if not paths:
        raise ConfigError(f"config key 'losses': a loss over a chain of taps needs the {role} "
                          f"({type(unwrap_model(model)).__name__}) to name its taps in `graph_tap_paths`")
    return tuple(paths)


def check_reads(losses: list[tuple[str, DistillLoss]], use_paraphraser: bool) -> None:
    """Refuse, before training, a loss whose maths cannot work on what this run will give it."""
    for name, loss in losses:
        if loss.reads.matched_channels and not use_paraphraser:
            raise ConfigError(f"config key 'losses': {name!r} needs the teacher's taps at the student's channel "
                              f"counts (the paraphraser encodings), i.e. --use_paraphraser=true")


def needs_paraphrasers(losses: list[tuple[str, DistillLoss]], use_paraphraser: bool) -> bool:
    return use_paraphraser and any(loss.reads.teacher == "paraphrased" for _, loss in losses)


class FeatureAdapter:
    def __init__(self, losses: list[tuple[str, DistillLoss]], student: nn.Module, teacher: nn.Module | None,
                 paraphrasers: nn.ModuleList | None = None, autocast=None):
        self.losses = losses
        self.student_net, self.teacher_net, self.paraphrasers = student, teacher, paraphrasers
        self.autocast = autocast or (lambda: torch.autocast("cpu", enabled=False))
        chain = any(loss.reads.features == ("chain",) for _, loss in losses)
        # Hooks stay registered for the run; each forward pops what they caught.
        self.student_chain = FeatureTaps(student, chain_paths(student, "student")) if chain else None
        self.teacher_chain = FeatureTaps(teacher, chain_paths(teacher, "teacher")) if chain else None

    @staticmethod
    def caught(taps: FeatureTaps | None) -> list[torch.Tensor] | None:
        if taps is None:
            return None
        outputs = taps.pop()
        return [outputs[p] for p in taps.paths]

    @torch.no_grad()
    def teacher(self, images: torch.Tensor) -> Features:
        """The frozen teacher's features, fp32 (computed once per batch, shared by every loss)."""
        with self.autocast():
            out = self.teacher_net(images)
            paraphrased = None
            if self.paraphrasers is not None:
                paraphrased = tuple(p.encode(t) for p, t in zip(self.paraphrasers, (out.shallow, out.deep)))
        chain = self.caught(self.teacher_chain)
        as32 = lambda ts: None if ts is None else type(ts)(t.float() for t in ts)  # noqa: E731
        # A network without taps (a user's, for logit losses alone) hands over None for them.
        shallow, deep = (None, None) if out.shallow is None else (out.shallow.float(), out.deep.float())
        return Features(out.logits.float(), shallow, deep, as32(paraphrased), as32(chain))

    def student(self, images: torch.Tensor) -> Features:
        with self.autocast():
            out = self.student_net(images)
        return Features(out.logits, out.shallow, out.deep, chain=self.caught(self.student_chain))

    @staticmethod
    def pick(loss: DistillLoss, feats: Features, teacher: bool) -> list[torch.Tensor]:
        reads = loss.reads
        if reads.features == ("chain",):
            return list(feats.chain)
        taps = {"shallow": feats.shallow, "deep": feats.deep}
        if teacher and reads.teacher == "paraphrased" and feats.paraphrased is not None:
            taps = dict(zip(("shallow", "deep"), feats.paraphrased))
        return [feats.logits if f == "logits" else taps[f] for f in reads.features]

    def inputs(self, loss: DistillLoss, student: Features, teacher: Features, masks: torch.Tensor):
        """The loss's (student tensors, teacher tensors, labels or None); None when it reads labels and the
        batch holds no labelled row."""
        labels = None
        if loss.reads.labels:
            rows = labelled_rows(masks)
            if not bool(rows.all()):
                if not bool(rows.any()):
                    return None
                student, teacher, masks = student.rows(rows), teacher.rows(rows), masks[rows]
            labels = masks
        return self.pick(loss, student, False), self.pick(loss, teacher, True), labels
