"""The student's iteration: frozen teacher forward, one critic step, one student step.

    L = supervised(labelled rows) + sum_i w_i * L_i(student, teacher) + beta * L_g

`supervised` is CE (or EMKD's 0.5 focal + 0.5 dice); the L_i are any losses registered in cocofast.losses,
chosen and weighted by the `losses` config key; L_g = -E[D(student)] is the adversarial term against a
WGAN-GP critic. Losses that read taps see the paraphraser encodings of the teacher's taps when
`use_paraphraser` is on; losses over a chain of taps (Graph Flow) get each network's `graph_tap_paths`
outputs through forward hooks. In semi-supervised runs, only labelled rows reach the supervised term and the
losses that need labels; every other term sees the whole batch.

The frozen teacher and paraphrasers run under no_grad; networks run under autocast and every loss between
them is computed in fp32 (cocofast.losses does that itself).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from cocofast.losses import DistillLoss, get_loss
from cocofast.losses.supervised import focal_dice_loss
from cocofast.models.base import SegOutput
from cocofast.models.taps import FeatureTaps, unwrap_model

from .config import ConfigError, TrainConfig
from .runtime import Runtime
from .semi import labelled_rows


def build_losses(cfg: TrainConfig) -> list[tuple[str, DistillLoss]]:
    """The configured losses, each with its weight and, where it has one, the configured similarity backend."""
    import inspect

    built = []
    for name, weight in cfg.loss_weights():
        from cocofast.losses import LOSSES

        kwargs = {} if weight is None else {"weight": weight}
        if "backend" in inspect.signature(LOSSES[name]).parameters:
            kwargs["backend"] = cfg.similarity_backend
        try:
            loss = get_loss(name, **kwargs)
        except ValueError as err:
            raise ConfigError(f"config key 'losses': cannot build {name!r}: {err}") from None
        if loss.needs_teacher_feats and not cfg.use_paraphraser:
            raise ConfigError(f"config key 'losses': {name!r} needs the teacher's taps at the student's channel "
                              f"counts, i.e. --use_paraphraser=true")
        built.append((name, loss))
    return built


def reads_taps(losses) -> bool:
    return any(loss.reads_taps for _, loss in losses)


def graph_paths(model: nn.Module, role: str) -> tuple[str, ...]:
    paths = getattr(unwrap_model(model), "graph_tap_paths", None)
    if not paths:
        raise ConfigError(f"config key 'losses': a graph loss needs the {role} ({type(unwrap_model(model)).__name__}) "
                          f"to name its taps in `graph_tap_paths`")
    return tuple(paths)


def critic_input(logits: torch.Tensor, images: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "logits":
        return logits
    return torch.cat([logits.softmax(dim=1), images.float()], dim=1)


def critic_loss(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, gp_weight: float):
    """WGAN-GP: -E[D(real)] + E[D(fake)] + gp_weight * E[(||grad D(interp)|| - 1)^2].

    Real, fake and interpolated inputs go through the critic in one batch: one forward (one DDP call) per step.
    """
    eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    interp = (eps * real + (1 - eps) * fake).requires_grad_(True)
    scores = critic(torch.cat([real, fake, interp]))
    score_real, score_fake, score_interp = scores.chunk(3)
    (grad,) = torch.autograd.grad(score_interp.sum(), interp, create_graph=True)
    grad_norm = torch.sqrt(grad.flatten(1).pow(2).sum(dim=1) + 1e-12)
    gp = (grad_norm - 1).pow(2).mean()
    wasserstein = score_real.mean() - score_fake.mean()
    loss = -wasserstein + gp_weight * gp
    return loss, {"d_loss": loss.item(), "d_wasserstein": wasserstein.item(), "d_gp": gp.item()}


def supervised_loss(kind: str, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    if kind == "focal_dice":
        return focal_dice_loss(logits, masks)
    return F.cross_entropy(logits, masks)


class TeacherOut(NamedTuple):
    """Everything the losses read from the teacher, fp32: outputs, paraphrased taps, graph taps."""
    out: SegOutput
    feats: tuple[torch.Tensor, torch.Tensor] | None
    graph: list[torch.Tensor] | None


def _rows(x, rows: torch.Tensor):
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x[rows]
    return type(x)(*(_rows(t, rows) for t in x)) if isinstance(x, SegOutput) else [t[rows] for t in x]


class StudentStep:
    """One student iteration. A class rather than a closure so bench/bench_train.py times exactly this code;
    `teacher_out` lets it replay precomputed teacher outputs to measure the step without the teacher."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, student: nn.Module, optimizer, schedule, scaler, *,
                 losses=(), teacher=None, paraphrasers=None, critic=None, critic_ddp=None, critic_opt=None,
                 critic_schedule=None):
        self.cfg, self.rt, self.student, self.optimizer, self.schedule, self.scaler = (
            cfg, rt, student, optimizer, schedule, scaler)
        self.losses = list(losses)
        self.teacher, self.paraphrasers = teacher, paraphrasers
        self.critic, self.critic_ddp, self.critic_opt, self.critic_schedule = (
            critic, critic_ddp or critic, critic_opt, critic_schedule)
        self.graph = any(loss.needs_taps for _, loss in self.losses)
        self.student_taps = self.teacher_taps = None
        if self.graph:  # hooks stay registered for the run; each step pops what they caught
            self.student_taps = FeatureTaps(student, graph_paths(student, "student"))
            self.teacher_taps = FeatureTaps(teacher, graph_paths(teacher, "teacher"))

    @torch.no_grad()
    def teacher_outputs(self, images: torch.Tensor) -> TeacherOut:
        with self.rt.autocast():
            out = self.teacher(images)
            feats = None
            if self.paraphrasers is not None:
                feats = tuple(p.encode(t).float() for p, t in zip(self.paraphrasers, (out.shallow, out.deep)))
        graph = None
        if self.teacher_taps is not None:
            caught = self.teacher_taps.pop()
            graph = [caught[p].float() for p in self.teacher_taps.paths]
        return TeacherOut(SegOutput(*(t.float() for t in out)), feats, graph)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor, teacher_out: TeacherOut | None = None):
        cfg, rt = self.cfg, self.rt
        self.schedule.apply()
        terms: dict[str, float] = {}
        if teacher_out is None and self.teacher is not None:
            teacher_out = self.teacher_outputs(images)
        with rt.autocast():
            out_s = self.student(images)
        out_s = SegOutput(*(t.float() for t in out_s))
        graph_s = None
        if self.student_taps is not None:
            caught = self.student_taps.pop()
            graph_s = [caught[p].float() for p in self.student_taps.paths]

        if self.critic is not None:  # critic step on this iteration's (detached) student predictions
            self.critic_schedule.apply()
            self.critic.requires_grad_(True)
            real = critic_input(teacher_out.out.logits, images, cfg.disc_input)
            fake = critic_input(out_s.logits.detach(), images, cfg.disc_input)
            d_loss, d_terms = critic_loss(self.critic_ddp, real, fake, cfg.gp_weight)
            self.critic_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.critic_opt.step()
            self.critic_schedule.advance()
            terms.update(d_terms)

        labelled = labelled_rows(masks)
        all_labelled = bool(labelled.all())
        sup_logits, sup_masks = (out_s.logits, masks) if all_labelled else (out_s.logits[labelled], masks[labelled])
        loss = supervised_loss(cfg.supervised_loss, sup_logits, sup_masks)
        terms[f"loss_{cfg.supervised_loss}"] = loss.item()
        for name, criterion in self.losses:
            rows = None if all_labelled or not criterion.needs_labels else labelled
            if rows is not None and not bool(rows.any()):
                continue
            pick = (lambda x: x) if rows is None else (lambda x: _rows(x, rows))
            value = criterion(pick(out_s), pick(teacher_out.out), pick(masks) if criterion.needs_labels else None,
                              teacher_feats=pick(teacher_out.feats) if criterion.reads_taps else None,
                              student_taps=pick(graph_s), teacher_taps=pick(teacher_out.graph))
            loss = loss + value
            terms[f"loss_{name}"] = value.item()
        if self.critic is not None:
            # The critic is fixed for this term: no parameter gradients, and no DDP call on it.
            self.critic.requires_grad_(False)
            loss_g = -self.critic(critic_input(out_s.logits, images, cfg.disc_input)).mean()
            loss = loss + cfg.adv_weight * loss_g
            terms["loss_adv_g"] = loss_g.item()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.advance()
        terms["loss_total"] = loss.item()
        return terms
