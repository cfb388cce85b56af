"""The student's iteration: frozen teacher forward, one critic step, one student step.

    L = supervised(labelled rows) + sum_i w_i * L_i(student, teacher) + beta * L_g

`supervised` is CE (or EMKD's 0.5 focal + 0.5 dice); the L_i are any losses registered in cocofast.losses,
chosen and weighted by the `losses` config key, each fed what it declares it reads by the feature adapter
(train/features.py); L_g = -E[D(student)] is the adversarial term against a WGAN-GP critic
(cocofast/losses/adversarial.py). In semi-supervised runs only labelled rows reach the supervised term (and,
through the adapter, the losses that read labels); every other term sees the whole batch.

The frozen teacher and paraphrasers run under no_grad; networks run under autocast and every loss between
them is computed in fp32 (cocofast.losses does that itself). The terms a step returns are detached tensors,
not floats: reading each one waited for the device, several times per step; train/loop.py reads them together.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cocofast.losses import LOSSES, DistillLoss, LossOutputError
from cocofast.losses.adversarial import AdversarialLoss
from cocofast.losses.base import IGNORE_INDEX
from cocofast.losses.supervised import focal_dice_loss
from cocofast.ops import selfcheck

from .config import ConfigError, TrainConfig
from .features import FeatureAdapter, Features, check_reads
from .runtime import Runtime
from .semi import labelled_rows


def build_losses(cfg: TrainConfig) -> list[tuple[str, DistillLoss]]:
    """The configured losses, each given its op family's configured backend unless `--losses` sets one."""
    backends = {"similarity": cfg.similarity_backend, "pixel_relation": cfg.pixel_relation_backend}
    selfcheck.configure(None if cfg.kernel_self_check else False)  # None: on CUDA devices
    built = []
    for spec in cfg.loss_specs():
        family = LOSSES[spec.name].op_family
        try:
            loss = spec.build(**({"backend": backends[family]} if family else {}))
        except ValueError as err:
            raise ConfigError(f"config key 'losses': cannot build {spec.name!r}: {err}") from None
        built.append((spec.name, loss))
    check_reads(built, cfg.use_paraphraser)
    return built


def supervised_loss(kind: str, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    if kind == "focal_dice":
        return focal_dice_loss(logits, masks)
    return F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)  # as focal_dice: unlabelled pixels


class CriticUpdate:
    """One optimiser step of the critic on this iteration's (detached) teacher and student predictions."""

    def __init__(self, adversarial: AdversarialLoss, optimizer, schedule):
        self.adversarial, self.optimizer, self.schedule = adversarial, optimizer, schedule

    def __call__(self, teacher_logits, student_logits, images) -> dict[str, torch.Tensor]:
        self.schedule.apply()
        # The schedule's iteration is in the checkpoint, so a resumed run penalises the same steps.
        penalty = self.schedule.iteration % self.adversarial.gp_every == 0
        loss, terms = self.adversarial.critic_loss(teacher_logits, student_logits, images, penalty)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.advance()
        return terms


class StudentStep:
    """One student iteration. A class rather than a closure so bench/bench_train.py times exactly this code.
    `cache` (a train/teacher_cache.py TeacherCache, set by train_student) replays the teacher's features for
    the batch's `keys` instead of running the teacher; `teacher=` hands the step features directly."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, student: nn.Module, optimizer, schedule, scaler, *,
                 losses=(), teacher=None, paraphrasers=None, adversarial: AdversarialLoss | None = None,
                 critic_update: CriticUpdate | None = None):
        self.cfg, self.rt, self.student, self.optimizer, self.schedule, self.scaler = (
            cfg, rt, student, optimizer, schedule, scaler)
        self.losses = list(losses)
        self.adversarial, self.critic_update = adversarial, critic_update
        self.adapter = FeatureAdapter(self.losses, student, teacher, paraphrasers, autocast=rt.autocast)
        self.uses_teacher = teacher is not None
        self.cache = None

    def teacher_features(self, images: torch.Tensor) -> Features:
        return self.adapter.teacher(images)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor, teacher: Features | None = None,
                 keys: torch.Tensor | None = None):
        cfg = self.cfg
        # Read before any network is queued: the read waits only for the masks' copy, not for the critic step.
        labelled = labelled_rows(masks)
        all_labelled = bool(labelled.all())
        self.schedule.apply()
        terms: dict[str, torch.Tensor] = {}
        if teacher is None and self.uses_teacher and self.cache is not None and keys is not None:
            teacher = self.cache.features(keys, images.device)
        if teacher is None and self.uses_teacher:
            teacher = self.adapter.teacher(images)
        student = self.adapter.student(images)
        if self.critic_update is not None:
            terms.update(self.critic_update(teacher.logits, student.logits, images))

        if all_labelled:
            loss = supervised_loss(cfg.supervised_loss, student.logits, masks)
        else:
            loss = supervised_loss(cfg.supervised_loss, student.logits[labelled], masks[labelled])
        terms[f"loss_{cfg.supervised_loss}"] = loss.detach()
        for name, criterion in self.losses:
            args = self.adapter.inputs(criterion, student, teacher, masks)
            if args is None:  # a loss on labels, and no labelled row in this batch
                continue
            try:
                value = criterion(*args)
            except LossOutputError as err:  # a user's loss that returns a vector: name it, no traceback
                raise ConfigError(f"config key 'losses': {name!r}: {err}") from None
            loss = loss + value
            terms[f"loss_{name}"] = value.detach()
        if self.adversarial is not None:
            value = self.adversarial(student.logits, images)
            loss = loss + value
            weight = self.adversarial.weight
            terms["loss_adv_g"] = value.detach().double() / weight if weight else torch.zeros((), device=value.device)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.advance()
        terms["loss_total"] = loss.detach()
        return terms
