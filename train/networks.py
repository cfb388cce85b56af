"""The networks each stage builds or loads: teacher, paraphrasers, and the checks made before training."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from cocofast.models import create_model

from .checkpoint import CheckpointError, check_model, load_checkpoint, load_weights
from .config import ConfigError, TrainConfig
from .runtime import Runtime


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
