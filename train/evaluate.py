"""Scoring networks: validation during a stage, overlays of its predictions, and the final test table."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from cocofast.io import atomic_write_text
from cocofast.losses.base import IGNORE_INDEX
from cocofast.metrics import ConfusionMatrix
from cocofast.models import count_macs, count_parameters, create_model, unwrap_model

from . import report

from .checkpoint import CheckpointError, load_checkpoint, load_weights, model_spec
from .config import TrainConfig
from .config_checks import check_eval_students
from .data import build_dataset, has_test_slides
from .networks import TRUST_OPT_IN, load_teacher, rebuilt, teacher_path, trusted_code
from .runtime import Runtime, eval_loader


@torch.no_grad()
def confusion(model: nn.Module, loader, cfg: TrainConfig, rt: Runtime) -> ConfusionMatrix:
    """One pass over `loader`: the confusion matrix of the model's predictions, all-reduced over ranks."""
    was_training = model.training
    model.eval()
    # On the device: nccl reduces CUDA tensors. IGNORE_INDEX marks pixels scored nowhere (unlabelled slide
    # tissue, and the part of a held-out patch an earlier patch already scored).
    matrix = ConfusionMatrix(cfg.num_classes, ignore_index=IGNORE_INDEX, device=rt.device)
    for images, masks in loader:
        images, masks = images.to(rt.device), masks.to(rt.device)
        with rt.autocast():
            logits = model(images).logits
        matrix.update(logits.argmax(dim=1), masks)
    model.train(was_training)
    return matrix.all_reduce()


def evaluate_segmentation(model: nn.Module, loader, cfg: TrainConfig, rt: Runtime, prefix: str = "val_"):
    return scores_of(confusion(unwrap_model(model), loader, cfg, rt), unwrap_model(model), rt, prefix)


def scores_of(matrix: ConfusionMatrix, model: nn.Module, rt: Runtime, prefix: str) -> dict[str, float]:
    """ACC, mIoU, mDice and per-class IoU; warns when the model predicted one class everywhere."""
    result = matrix.compute()
    scores = {f"{prefix}acc": float(result["acc"]), f"{prefix}miou": float(result["miou"]),
              f"{prefix}mdice": float(result["mdice"])}
    scores.update({f"{prefix}iou{k}": float(v) for k, v in enumerate(result["iou"])})
    scores.update({f"{prefix}dice{k}": float(v) for k, v in enumerate(result["dice"])})  # the papers' per-class figure
    predicted = single_predicted_class(matrix.matrix)
    if predicted is not None and rt.is_main:
        name = getattr(model, "model_name", type(model).__name__)
        print(f"[warning] {name} predicted class {predicted} for every pixel it was scored on: it has "
              f"collapsed to one class (mIoU {scores[f'{prefix}miou']:.4f} is that of a constant map); check "
              f"the learning rate, the loss weights and the class balance", flush=True)
    return scores


def single_predicted_class(matrix: torch.Tensor) -> int | None:
    """The one class a network predicted everywhere (columns of the confusion matrix), or None."""
    used = (matrix.sum(dim=0) > 0).nonzero().flatten().tolist()
    return used[0] if len(used) == 1 else None


def overlay_drawer(model: nn.Module, dataset, cfg: TrainConfig, rt: Runtime):
    """Rank 0 draws predictions on the first few validation patches (the same patches every epoch)."""
    count = min(cfg.num_overlays, len(dataset))

    @torch.no_grad()
    def draw(path: Path) -> None:
        net = unwrap_model(model)
        was_training = net.training
        net.eval()
        images, masks = zip(*(dataset[i] for i in range(count)))
        images, masks = torch.stack(images), torch.stack(masks)
        with rt.autocast():
            preds = net(images.to(rt.device)).logits.argmax(dim=1).cpu()
        net.train(was_training)
        report.save_overlays(images, masks, preds, path)

    return draw


def evaluate_all(cfg: TrainConfig, rt: Runtime) -> list[dict]:
    """Score the teacher and the listed students on the test split; print and save one table (eval.csv)."""
    test_set = build_dataset(cfg, "test")
    split = scored_split(cfg)
    if rt.is_main and split != "test":
        print(f"[eval] {cfg.data_root} has no test/ split: scoring on {split}/, the split that chose each "
              f"stage's best.pt, so these figures are optimistic", flush=True)
    loader = eval_loader(test_set, cfg, rt)
    check_eval_students(cfg)  # a listed student without best.pt is an error, not a missing row
    entries = [("teacher", teacher_path(cfg), "teacher")]
    entries += [(name, Path(cfg.run_dir) / name / "best.pt", "student") for name in cfg.students_to_eval()]
    rows = []
    for name, path, role in entries:
        if not path.is_file():
            if rt.is_main:
                print(f"[eval] {name}: no checkpoint at {path}; skipped", flush=True)
            continue
        if role == "teacher":  # a cocofast checkpoint, a TorchScript file or a plain state-dict
            net = load_teacher(cfg, rt)
        else:
            spec = model_spec(load_checkpoint(path), role, path, trusted_code(cfg), TRUST_OPT_IN)
            net = rebuilt(spec, role, path)
            load_weights(net, spec, role, path)
        net = net.to(rt.device)
        matrix = confusion(net, loader, cfg, rt)
        metrics = scores_of(matrix, net, rt, prefix="")
        collapsed = single_predicted_class(matrix.matrix)
        rows.append({"name": name, "model": net.model_name, "width": net.model_kwargs.get("width"),
                     "params": count_parameters(net), f"gmacs@{cfg.image_size}": gmacs(net, cfg),
                     **metrics, "split": split,
                     "warning": "" if collapsed is None else f"predicts class {collapsed} only",
                     "checkpoint": str(path)})
    if not rows:
        raise CheckpointError(f"nothing to evaluate: no teacher or student best.pt under {cfg.run_dir} "
                              f"(students looked for: {', '.join(cfg.students_to_eval())})")
    if rt.is_main:
        out = Path(cfg.run_dir)
        report.write_summary(rows, out / "eval.csv")
        atomic_write_text(json.dumps(rows, indent=2), out / "eval.json")
        print(report.format_eval_table(rows, cfg.image_size), flush=True)
    return rows


def scored_split(cfg: TrainConfig) -> str:
    if cfg.dataset == "folder" and not (Path(cfg.data_root) / "test").is_dir():
        return "val"
    if cfg.dataset == "slides" and not has_test_slides(cfg):  # build_dataset then scores the val slides
        return "val"
    return "test"


def gmacs(net: nn.Module, cfg: TrainConfig) -> float:
    """Multiply-adds per image at the training size, counted on the meta device where the network can be
    rebuilt there (shapes only: a full-size teacher costs no compute), else on a real input."""
    size = (1, cfg.in_channels, cfg.image_size, cfg.image_size)
    if net.model_name != "torchscript":
        with torch.device("meta"):
            shadow = create_model(net.model_name, **net.model_kwargs)
        return count_macs(shadow, torch.empty(size, device="meta")) / 1e9
    device = next(net.parameters()).device
    return count_macs(net, torch.zeros(size, device=device)) / 1e9
