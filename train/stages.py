"""The four stages of CoCo DistillNet training (SPEC §3), each feeding the next through its best.pt:

    teacher      the big network, trained with cross-entropy
    paraphraser  one auto-encoder per teacher tap, trained on the frozen teacher's features (L_rec = MSE)
    student      per iteration: one critic step (WGAN-GP), then one student step with
                 L = CE + sum_i w_i * L_i + beta * L_g   (train/student.py)
    eval         teacher and students scored on the held-out test split (ACC, mIoU, mDice, params, GMACs)

The frozen teacher and paraphrasers run under no_grad and are never wrapped in DDP. Networks run under
autocast; the losses between them (distillation, critic) are computed in fp32.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cocofast.data import FolderDataset, SyntheticPathology
from cocofast.io import atomic_write_text
from cocofast.metrics import ConfusionMatrix
from cocofast.models import create_model

from . import report
from .checkpoint import CheckpointError, check_model, load_checkpoint, load_weights, model_spec, unwrap
from .config import ConfigError, TrainConfig
from .loop import IterationBudget, Stage, run_stage
from .runtime import Runtime, eval_loader, seed_everything, train_loader
from .schedule import IterationLR
from .semi import HalfLabelledSampler, PartlyLabelled, check_fraction, labelled_indices
from .student import StudentStep, build_losses, reads_taps


# --- data ------------------------------------------------------------------------------------------------
def build_dataset(cfg: TrainConfig, split: str):
    """split: 'train', 'val' or 'test'. Synthetic splits use disjoint seeds; folder splits are sub-folders."""
    if cfg.dataset == "synthetic":
        length = cfg.train_samples if split == "train" else cfg.val_samples
        offset = {"train": 0, "val": 1_000_003, "test": 2_000_003}[split]
        return SyntheticPathology(length, size=cfg.image_size, seed=cfg.data_seed + offset,
                                  in_channels=cfg.in_channels, flips=False)
    root = Path(cfg.data_root)
    folder = root / split
    if split == "test" and not folder.is_dir():
        folder = root / "val"  # no separate test split: report on validation, as many public sets do
    if not folder.is_dir():
        raise ConfigError(f"config key 'data_root': expected a '{split}' sub-folder in {root}")
    try:
        return FolderDataset(folder, mask_values=cfg.mask_mapping(), num_classes=cfg.num_classes,
                             in_channels=cfg.in_channels, patch_size=cfg.patch_size or None,
                             stride=cfg.patch_stride or None, resize=cfg.image_size)
    except ValueError as err:  # the dataset lists every bad file; say which split and key it came from
        raise ConfigError(f"config key 'data_root': the {split} split in {folder} is not usable: {err}") from None


# --- networks --------------------------------------------------------------------------------------------
def seg_kwargs(cfg: TrainConfig, role: str) -> dict:
    width = cfg.teacher_width if role == "teacher" else cfg.student_width
    return {"in_channels": cfg.in_channels, "num_classes": cfg.num_classes, "width": width}


def check_image_size(cfg: TrainConfig, model: nn.Module, role: str) -> None:
    """Fail before training, naming the key, rather than at the first forward pass."""
    divisor = getattr(model, "input_divisor", 1)
    minimum = getattr(model, "min_size", 1)
    if cfg.image_size % divisor or cfg.image_size < minimum:
        raise ConfigError(f"config key 'image_size': the {role} ({type(model).__name__}) needs sides divisible by "
                          f"{divisor}" + (f" and at least {minimum}" if minimum > 1 else "")
                          + f", got {cfg.image_size}")


def frozen(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def teacher_path(cfg: TrainConfig) -> Path:
    return Path(cfg.teacher_checkpoint or Path(cfg.run_dir) / "teacher" / "best.pt")


def paraphraser_path(cfg: TrainConfig) -> Path:
    return Path(cfg.paraphraser_checkpoint or Path(cfg.run_dir) / "paraphraser" / "best.pt")


def load_teacher(cfg: TrainConfig, rt: Runtime) -> nn.Module:
    path = teacher_path(cfg)
    if not path.is_file():
        raise CheckpointError(f"teacher checkpoint not found: {path}; run --stage teacher first "
                              f"or set --teacher_checkpoint")
    ckpt = load_checkpoint(path)
    spec = check_model(ckpt, "teacher", path, cfg.teacher_model, seg_kwargs(cfg, "teacher"))
    teacher = create_model(spec["model_name"], **spec["model_kwargs"])
    load_weights(teacher, spec, "teacher", path)
    return frozen(teacher.to(rt.device))


def paraphraser_kwargs(cfg: TrainConfig, teacher: nn.Module) -> list[dict]:
    """One paraphraser per teacher tap, k = the student's channels at the matching tap."""
    student = create_model(cfg.student_model, **seg_kwargs(cfg, "student"))
    return [{"in_channels": c_t, "k": c_s} for c_t, c_s in zip(teacher.tap_channels, student.tap_channels)]


def load_paraphrasers(cfg: TrainConfig, rt: Runtime, teacher: nn.Module) -> nn.ModuleList:
    path = paraphraser_path(cfg)
    if not path.is_file():
        raise CheckpointError(f"paraphraser checkpoint not found: {path}; run --stage paraphraser first, "
                              f"set --paraphraser_checkpoint, or pass --use_paraphraser=false")
    ckpt = load_checkpoint(path)
    paras = nn.ModuleList()
    for i, kwargs in enumerate(paraphraser_kwargs(cfg, teacher)):
        spec = check_model(ckpt, f"paraphraser{i}", path, "paraphraser", kwargs)
        para = create_model("paraphraser", **kwargs)
        load_weights(para, spec, f"paraphraser{i}", path)
        paras.append(para)
    return frozen(paras.to(rt.device))


class ParaphraserPair(nn.Module):
    """Both taps' paraphrasers as one module, so one DDP wrapper and one optimiser cover them."""

    def __init__(self, paraphrasers: list[nn.Module]):
        super().__init__()
        self.paraphrasers = nn.ModuleList(paraphrasers)

    def forward(self, taps: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        return [p(t) for p, t in zip(self.paraphrasers, taps)]


# --- evaluation ------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader, cfg: TrainConfig, rt: Runtime, prefix: str = "val_"):
    model = unwrap(model)
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(cfg.num_classes, device=rt.device)  # on the device: nccl reduces CUDA tensors
    for images, masks in loader:
        images, masks = images.to(rt.device), masks.to(rt.device)
        with rt.autocast():
            logits = model(images).logits
        matrix.update(logits.argmax(dim=1), masks)
    matrix.all_reduce()
    result = matrix.compute()
    model.train(was_training)
    return {f"{prefix}acc": float(result["acc"]), f"{prefix}miou": float(result["miou"]),
            f"{prefix}mdice": float(result["mdice"])}


def overlay_drawer(model: nn.Module, dataset, cfg: TrainConfig, rt: Runtime):
    """Rank 0 draws predictions on the first few validation patches (the same patches every epoch)."""
    count = min(cfg.num_overlays, len(dataset))

    @torch.no_grad()
    def draw(path: Path) -> None:
        net = unwrap(model)
        was_training = net.training
        net.eval()
        images, masks = zip(*(dataset[i] for i in range(count)))
        images, masks = torch.stack(images), torch.stack(masks)
        with rt.autocast():
            preds = net(images.to(rt.device)).logits.argmax(dim=1).cpu()
        net.train(was_training)
        report.save_overlays(images, masks, preds, path)

    return draw


def _schedule(cfg: TrainConfig, optimizer, lr: float, epochs: int, iters_per_epoch: int,
              kind: str | None = None) -> IterationLR:
    return IterationLR(optimizer, lr, total_iters=epochs * iters_per_epoch, iters_per_epoch=iters_per_epoch,
                       kind=kind or cfg.lr_schedule, power=cfg.lr_power, step_epochs=cfg.lr_step_epochs,
                       step_gamma=cfg.lr_step_gamma)


def _iters_per_epoch(sampler, cfg: TrainConfig, rt: Runtime) -> int:
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
    schedule = _schedule(cfg, optimizer, cfg.teacher_lr, cfg.teacher_epochs, _iters_per_epoch(sampler, cfg, rt))
    scaler = rt.grad_scaler()
    val_loader = eval_loader(val_set, cfg, rt)
    seed_everything(cfg.seed + 1 + rt.rank)  # dropout differs per rank, as it would on separate GPUs

    def step(images: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
        schedule.apply()
        with rt.autocast():
            logits = model(images).logits
        loss = F.cross_entropy(logits.float(), masks)
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
    optimizer = torch.optim.SGD(pair.parameters(), lr=cfg.paraphraser_lr, momentum=cfg.paraphraser_momentum,
                                weight_decay=cfg.weight_decay)
    loader, sampler = train_loader(train_set, cfg, rt)
    schedule = _schedule(cfg, optimizer, cfg.paraphraser_lr, cfg.paraphraser_epochs,
                         _iters_per_epoch(sampler, cfg, rt))
    scaler = rt.grad_scaler()
    val_loader = eval_loader(val_set, cfg, rt)
    seed_everything(cfg.seed + 1 + rt.rank)

    def teacher_taps(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), rt.autocast():
            out = teacher(images)
        return out.shallow.float(), out.deep.float()

    def step(images: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
        schedule.apply()
        taps = teacher_taps(images)
        with rt.autocast():
            recons = model(taps)
        losses = [F.mse_loss(r.float(), t) for r, t in zip(recons, taps)]
        loss = sum(losses)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
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
                sums[i] += F.mse_loss(r.float(), t, reduction="sum").item() / t[0].numel()
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
        extra={"teacher": {"model_name": cfg.teacher_model, "model_kwargs": seg_kwargs(cfg, "teacher")}},
    ), cfg, rt, loader, sampler, budget)


# --- stage 2: student (+ critic) -------------------------------------------------------------------------
def student_loader(train_set, cfg: TrainConfig, rt: Runtime):
    """The usual shuffled loader, or, with labelled_fraction < 1, half-labelled batches (train/semi.py)."""
    if cfg.labelled_fraction >= 1:
        return train_loader(train_set, cfg, rt)
    try:
        check_fraction(len(train_set), cfg.labelled_fraction)
        labelled = labelled_indices(len(train_set), cfg.labelled_fraction, cfg.data_seed)
        sampler = HalfLabelledSampler(labelled, len(train_set), rt.world_size, rt.rank, cfg.seed,
                                      cfg.batch_size // rt.world_size, cfg.batch_size)
    except ValueError as err:
        raise ConfigError(f"config key 'labelled_fraction': {err}") from None
    if rt.is_main:
        print(f"[student] semi-supervised: {len(labelled)} of {len(train_set)} training patches labelled "
              f"({cfg.labelled_fraction:g})", flush=True)
    loader, _ = train_loader(PartlyLabelled(train_set, labelled), cfg, rt, sampler=sampler)
    return loader, sampler


def train_student(cfg: TrainConfig, rt: Runtime, budget: IterationBudget) -> None:
    seed_everything(cfg.seed)
    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    losses = build_losses(cfg)
    teacher = load_teacher(cfg, rt) if losses or cfg.adversarial else None
    paraphrase = reads_taps(losses) and cfg.use_paraphraser
    paraphrasers = load_paraphrasers(cfg, rt, teacher) if paraphrase else None

    kwargs = seg_kwargs(cfg, "student")
    # Re-seeded here so the student starts from the same weights whatever the losses loaded before it
    # (teacher, paraphrasers): methods compared at one seed differ only in how the student is trained.
    seed_everything(cfg.seed)
    student = create_model(cfg.student_model, **kwargs).to(rt.device)
    check_image_size(cfg, student, "student")
    model = rt.wrap(student)
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.student_lr, weight_decay=cfg.weight_decay)
    loader, sampler = student_loader(train_set, cfg, rt)
    per_epoch = _iters_per_epoch(sampler, cfg, rt)
    schedule = _schedule(cfg, optimizer, cfg.student_lr, cfg.student_epochs, per_epoch)
    models = {"student": (cfg.student_model, kwargs, student)}
    optimizers, schedulers = {"student": optimizer}, {"student": schedule}

    critic = critic_ddp = critic_opt = critic_schedule = None
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
        critic_schedule = _schedule(cfg, critic_opt, cfg.disc_lr, cfg.student_epochs, per_epoch,
                                    kind="constant" if cfg.lr_schedule == "constant" else "poly")
        models["discriminator"] = ("discriminator", d_kwargs, critic)
        optimizers["discriminator"], schedulers["discriminator"] = critic_opt, critic_schedule
    scaler = rt.grad_scaler()
    val_loader = eval_loader(val_set, cfg, rt)
    seed_everything(cfg.seed + 1 + rt.rank)

    step = StudentStep(cfg, rt, model, optimizer, schedule, scaler, losses=losses, teacher=teacher,
                       paraphrasers=paraphrasers, critic=critic, critic_ddp=critic_ddp, critic_opt=critic_opt, critic_schedule=critic_schedule)
    trained = [student] + ([critic] if critic is not None else [])
    run_stage(Stage(
        name="student" if cfg.student_name == "student" else f"student ({cfg.student_name})", out_dir=Path(cfg.run_dir) / cfg.student_name,
        epochs=cfg.student_epochs, models=models, trained=trained, optimizers=optimizers, schedulers=schedulers,
        scaler=scaler, train_step=step, evaluate=lambda: evaluate_segmentation(student, val_loader, cfg, rt),
        score_key="val_miou", config_groups=("all", "paraphraser", "student"),
        draw_overlays=overlay_drawer(student, val_set, cfg, rt),
    ), cfg, rt, loader, sampler, budget)


# --- stage 3: evaluation ---------------------------------------------------------------------------------
def evaluate_all(cfg: TrainConfig, rt: Runtime) -> list[dict]:
    """Score the teacher and the listed students on the test split; print and save one table (eval.csv)."""
    test_set = build_dataset(cfg, "test")
    loader = eval_loader(test_set, cfg, rt)
    entries = [("teacher", teacher_path(cfg), "teacher")]
    entries += [(name, Path(cfg.run_dir) / name / "best.pt", "student") for name in cfg.students_to_eval()]
    rows = []
    for name, path, role in entries:
        if not path.is_file():
            if rt.is_main:
                print(f"[eval] {name}: no checkpoint at {path}; skipped", flush=True)
            continue
        spec = model_spec(load_checkpoint(path), role, path)
        net = create_model(spec["model_name"], **spec["model_kwargs"])
        load_weights(net, spec, role, path)
        metrics = evaluate_segmentation(net.to(rt.device), loader, cfg, rt, prefix="")
        with torch.device("meta"):  # shapes only: counting a full-size teacher costs no compute
            shadow = create_model(spec["model_name"], **spec["model_kwargs"])
        size = (1, cfg.in_channels, cfg.image_size, cfg.image_size)
        rows.append({"name": name, "model": spec["model_name"], "width": spec["model_kwargs"].get("width", 1.0),
                     "params": report.count_params(net), f"gmacs@{cfg.image_size}": report.count_gmacs(shadow, size),
                     **metrics, "checkpoint": str(path)})
    if not rows:
        raise CheckpointError(f"nothing to evaluate: no teacher or student best.pt under {cfg.run_dir} "
                              f"(students looked for: {', '.join(cfg.students_to_eval())})")
    if rt.is_main:
        out = Path(cfg.run_dir)
        report.write_summary(rows, out / "eval.csv")
        atomic_write_text(json.dumps(rows, indent=2), out / "eval.json")
        print(format_table(rows, cfg.image_size), flush=True)
    return rows


def format_table(rows: list[dict], image_size: int) -> str:
    head = f"| model | network | params | GMACs @{image_size}² | ACC | mIoU | mDice |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['model']} x{r['width']:g} | {r['params']:,} | "
                     f"{r[f'gmacs@{image_size}']:.3f} | {r['acc']:.4f} | {r['miou']:.4f} | {r['mdice']:.4f} |")
    return "\n".join(lines)
