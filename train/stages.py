"""The four stages of CoCo DistillNet training (CoCo DistillNet §III-D), each feeding the next through its best.pt:

    teacher      the big network, trained with cross-entropy
    paraphraser  one auto-encoder per teacher tap, trained on the frozen teacher's features (L_rec = MSE)
    student      per iteration: one critic step (WGAN-GP), then one student step with
                 L = CE + sum_i w_i * L_i + beta * L_g   (train/student.py)
    eval         teacher and students scored on the held-out test split (ACC, mIoU, mDice, params, GMACs)

The frozen teacher and paraphrasers run under no_grad and are never wrapped in DDP. Networks run under
autocast; the losses between them (distillation, critic) are computed in fp32.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from cocofast.losses.adversarial import AdversarialLoss
from cocofast.losses.base import IGNORE_INDEX
from cocofast.models import create_model

from .checkpoint import source_digests
from .config import TrainConfig
from .data import build_dataset, student_loader
from .evaluate import evaluate_all, evaluate_segmentation, overlay_drawer
from .features import needs_paraphrasers
from .loop import IterationBudget, Stage, run_stage
from .networks import (ParaphraserPair, check_image_size, load_paraphrasers, load_teacher, paraphraser_kwargs,
                       seg_kwargs)
from .runtime import Runtime, eval_loader, seed_everything, train_loader
from .schedule import IterationLR
from .student import CriticUpdate, StudentStep, build_losses
from .teacher_cache import open_teacher_cache

__all__ = ["evaluate_all", "train_paraphrasers", "train_student", "train_teacher"]


def seed_per_rank(cfg: TrainConfig, rt: Runtime) -> None:
    """After building (same weights on every rank), a stream per rank: dropout and critic noise differ per
    rank as they would on separate GPUs, and never replay the initialisation stream (seed + 0)."""
    seed_everything(cfg.seed + 1 + rt.rank)


def lr_schedule(cfg: TrainConfig, optimizer, lr: float, epochs: int, iters_per_epoch: int,
              kind: str | None = None) -> IterationLR:
    return IterationLR(optimizer, lr, total_iters=epochs * iters_per_epoch, iters_per_epoch=iters_per_epoch,
                       kind=kind or cfg.lr_schedule, power=cfg.lr_power, step_epochs=cfg.lr_step_epochs,
                       step_gamma=cfg.lr_step_gamma)


def iters_per_epoch(sampler, cfg: TrainConfig, rt: Runtime) -> int:
    return sampler.num_samples // (cfg.batch_size // rt.world_size)


# --- stage 0: teacher ------------------------------------------------------------------------------------
def train_teacher(cfg: TrainConfig, rt: Runtime, budget: IterationBudget) -> None:
    seed_everything(cfg.seed)
    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    kwargs = seg_kwargs(cfg, "teacher")
    teacher = create_model(cfg.teacher_model, **kwargs).to(rt.device)
    check_image_size(cfg, teacher, "teacher")
    model = rt.wrap(teacher)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=cfg.teacher_lr, weight_decay=cfg.weight_decay)
    loader, sampler = train_loader(train_set, cfg, rt)
    schedule = lr_schedule(cfg, optimizer, cfg.teacher_lr, cfg.teacher_epochs, iters_per_epoch(sampler, cfg, rt))
    scaler = rt.grad_scaler()
    val_loader = eval_loader(val_set, cfg, rt)
    seed_per_rank(cfg, rt)

    def step(images: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
        schedule.apply()
        with rt.autocast():
            logits = model(images).logits
        loss = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)  # slides: unlabelled, padding
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.advance()
        return {"loss_ce": loss.item()}

    run_stage(Stage(
        name="teacher", out_dir=Path(cfg.run_dir) / "teacher", epochs=cfg.teacher_epochs,
        models={"teacher": (cfg.teacher_model, kwargs, teacher)}, trained=[teacher],
        optimizers={"teacher": optimizer}, schedulers={"teacher": schedule}, scaler=scaler, train_step=step,
        evaluate=lambda: evaluate_segmentation(teacher, val_loader, cfg, rt), score_key="val_miou",
        config_groups=("all", "teacher"), draw_overlays=overlay_drawer(teacher, val_set, cfg, rt),
    ), cfg, rt, loader, sampler, budget)


# --- stage 1: paraphrasers -------------------------------------------------------------------------------
def train_paraphrasers(cfg: TrainConfig, rt: Runtime, budget: IterationBudget) -> None:
    seed_everything(cfg.seed)
    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    teacher = load_teacher(cfg, rt)
    all_kwargs = paraphraser_kwargs(cfg, teacher)
    pair = ParaphraserPair([create_model("paraphraser", **kw) for kw in all_kwargs]).to(rt.device)
    model = rt.wrap(pair)
    if cfg.paraphraser_optimizer == "adam":
        # SGD's stable step on six un-normalised convolutions shrinks with fan-in x the tap's mean square (the
        # curvature of the reconstruction), so an lr that trains one teacher diverges on the next; Adam's step
        # per weight is set by the lr alone.
        optimizer = torch.optim.Adam(pair.parameters(), lr=cfg.paraphraser_lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(pair.parameters(), lr=cfg.paraphraser_lr, momentum=cfg.paraphraser_momentum,
                                    weight_decay=cfg.weight_decay)
    loader, sampler = train_loader(train_set, cfg, rt)
    schedule = lr_schedule(cfg, optimizer, cfg.paraphraser_lr, cfg.paraphraser_epochs,
                         iters_per_epoch(sampler, cfg, rt))
    scaler = rt.grad_scaler()
    val_loader = eval_loader(val_set, cfg, rt)
    seed_per_rank(cfg, rt)

    def teacher_taps(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), rt.autocast():
            out = teacher(images)
        return out.shallow.float(), out.deep.float()

    # Scale-free training (paraphraser_scale_free). The paraphraser is bias + LeakyReLU layers, positively
    # homogeneous: P_{W,b}(s t) = s P_{W,b/s}(t). On raw MSE a tap s times larger multiplies the weights'
    # gradient by s^2, so a learning rate tuned on one teacher diverges on another (the experiments' 1e-2 went
    # to NaN in epoch 1). SGD on the tap in units of its RMS, t' = t / sqrt(ms), is independent of s: in the raw
    # weights that is the loss MSE / ms and, since b = sqrt(ms) b', the bias gradients times ms, weight decay
    # unchanged. ms is one constant per tap (the first training batch), so the objective is fixed and a resumed
    # run recomputes the same value. Loss normalisation alone leaves the biases' step off by 1 / ms (it diverges
    # on a teacher with small taps); gradient clipping alone leaves the lr wrong by s^2.
    tap_ms = [1.0, 1.0]
    if cfg.paraphraser_scale_free:
        probe = torch.stack([train_set[i][0] for i in range(min(len(train_set), cfg.batch_size // rt.world_size))])
        tap_ms = [max(t.double().pow(2).mean().item(), torch.finfo(torch.float32).tiny)
                  for t in teacher_taps(probe.to(rt.device))]
    biases = [[p for name, p in para.named_parameters() if name.endswith("bias")] for para in pair.paraphrasers]

    def step(images: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
        schedule.apply()
        taps = teacher_taps(images)
        with rt.autocast():
            recons = model(taps)
        losses = [F.mse_loss(r.float(), t) / ms for r, t, ms in zip(recons, taps, tap_ms)]
        loss = sum(losses)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.paraphraser_scale_free:
            for ms, params in zip(tap_ms, biases):
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(ms)
        if cfg.paraphraser_clip > 0:
            # SGD with momentum on six stacked convolutions meets a few steep early steps; capping the step's
            # gradient norm keeps those from throwing the auto-encoder far off (its loss then only falls).
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(pair.parameters(), cfg.paraphraser_clip)
        scaler.step(optimizer)
        scaler.update()
        schedule.advance()
        return {f"loss_rec{i}": l.item() for i, l in enumerate(losses)}

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        pair.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for images, _ in val_loader:
            taps = teacher_taps(images.to(rt.device))
            with rt.autocast():
                recons = pair(taps)
            for i, (r, t) in enumerate(zip(recons, taps)):
                sums[i] += F.mse_loss(r.float(), t, reduction="sum").item() / t[0].numel() / tap_ms[i]
            sums[2] += images.shape[0]
        pair.train()
        sums = rt.all_reduce_sum(sums)
        rec = [(sums[i] / sums[2]).item() for i in range(2)]
        return {"val_rec0": rec[0], "val_rec1": rec[1], "val_rec": sum(rec) / 2}

    run_stage(Stage(
        name="paraphraser", out_dir=Path(cfg.run_dir) / "paraphraser", epochs=cfg.paraphraser_epochs,
        models={f"paraphraser{i}": ("paraphraser", kw, p) for i, (kw, p) in
                enumerate(zip(all_kwargs, pair.paraphrasers))},
        trained=[pair], optimizers={"paraphrasers": optimizer}, schedulers={"paraphrasers": schedule},
        scaler=scaler, train_step=step, evaluate=evaluate, score_key="val_rec", higher_is_better=False,
        config_groups=("all", "paraphraser"),
        extra={"teacher": {"model_name": cfg.teacher_model, "model_kwargs": seg_kwargs(cfg, "teacher")},
               "tap_mean_square": tap_ms},
        sources=source_digests(teacher=teacher),
    ), cfg, rt, loader, sampler, budget)


# --- stage 2: student (+ critic) -------------------------------------------------------------------------
def build_student_step(cfg: TrainConfig, rt: Runtime, per_epoch: int, losses, teacher=None, paraphrasers=None):
    """The student (wrapped for DDP), its optimiser and schedule, the critic, and the StudentStep that trains
    them with `losses` (build_losses): what train_student runs and bench/bench_train.py times."""
    kwargs = seg_kwargs(cfg, "student")
    # Re-seeded here so the student starts from the same weights whatever the losses loaded before it
    # (teacher, paraphrasers): methods compared at one seed differ only in how the student is trained.
    seed_everything(cfg.seed)
    student = create_model(cfg.student_model, **kwargs).to(rt.device)
    check_image_size(cfg, student, "student")
    model = rt.wrap(student)
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.student_lr, weight_decay=cfg.weight_decay)
    schedule = lr_schedule(cfg, optimizer, cfg.student_lr, cfg.student_epochs, per_epoch)
    models = {"student": (cfg.student_model, kwargs, student)}
    optimizers, schedulers = {"student": optimizer}, {"student": schedule}

    adversarial = critic_update = None
    if cfg.adversarial:
        image_channels = 0 if cfg.disc_input == "logits" else cfg.in_channels
        d_kwargs = {"in_channels": cfg.num_classes + image_channels, "width": cfg.disc_width}
        critic = create_model("discriminator", **d_kwargs).to(rt.device)
        check_image_size(cfg, critic, "discriminator")
        # Spectral-norm power-iteration vectors are buffers; every rank computes the same ones from the same
        # weights, and broadcasting them mid-step would clash with the critic's several uses per iteration.
        critic_ddp = rt.wrap(critic, sync_buffers_each_forward=False)
        critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.disc_lr, betas=(cfg.disc_beta1, cfg.disc_beta2),
                                      weight_decay=cfg.weight_decay)
        # The critic follows plain poly decay (the authors' code), without the student's steps.
        critic_schedule = lr_schedule(cfg, critic_opt, cfg.disc_lr, cfg.student_epochs, per_epoch,
                                      kind="constant" if cfg.lr_schedule == "constant" else "poly")
        adversarial = AdversarialLoss(critic, weight=cfg.adv_weight, gp_weight=cfg.gp_weight,
                                      drift_weight=cfg.drift_weight, input_kind=cfg.disc_input,
                                      critic_for_update=critic_ddp, gp_every=cfg.gp_every)
        critic_update = CriticUpdate(adversarial, critic_opt, critic_schedule)
        models["discriminator"] = ("discriminator", d_kwargs, critic)
        optimizers["discriminator"], schedulers["discriminator"] = critic_opt, critic_schedule
    step = StudentStep(cfg, rt, model, optimizer, schedule, rt.grad_scaler(), losses=losses, teacher=teacher,
                       paraphrasers=paraphrasers, adversarial=adversarial, critic_update=critic_update)
    return step, models, optimizers, schedulers


def train_student(cfg: TrainConfig, rt: Runtime, budget: IterationBudget) -> None:
    seed_everything(cfg.seed)
    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    losses = build_losses(cfg)
    teacher = load_teacher(cfg, rt) if losses or cfg.adversarial else None
    paraphrasers = load_paraphrasers(cfg, rt, teacher) if needs_paraphrasers(losses, cfg.use_paraphraser) else None
    cached = cfg.teacher_cache and teacher is not None
    loader, sampler = student_loader(train_set, cfg, rt, keyed=cached)
    step, models, optimizers, schedulers = build_student_step(cfg, rt, iters_per_epoch(sampler, cfg, rt), losses,
                                                              teacher, paraphrasers)
    if cached:  # before seed_per_rank, so building it leaves the training's random streams as they were
        step.cache = open_teacher_cache(cfg, rt, step, teacher, paraphrasers,
                                        lambda: build_dataset(dataclasses.replace(cfg, flips=False), "train"))
    student = models["student"][2]
    val_loader = eval_loader(val_set, cfg, rt)
    seed_per_rank(cfg, rt)
    trained = [student] + ([step.adversarial.critic] if step.adversarial is not None else [])
    name = "student" if cfg.student_name == "student" else f"student ({cfg.student_name})"
    run_stage(Stage(
        name=name, out_dir=Path(cfg.run_dir) / cfg.student_name,
        epochs=cfg.student_epochs, models=models, trained=trained, optimizers=optimizers, schedulers=schedulers,
        scaler=step.scaler, train_step=step, evaluate=lambda: evaluate_segmentation(student, val_loader, cfg, rt),
        score_key="val_miou", config_groups=("all", "paraphraser", "student"),
        draw_overlays=overlay_drawer(student, val_set, cfg, rt),
        sources=source_digests(teacher=teacher, paraphraser=paraphrasers),
    ), cfg, rt, loader, sampler, budget)
