"""Segmentation metrics from one confusion matrix over the whole evaluation set (SPEC §5).

    cm = ConfusionMatrix(num_classes=2)
    for logits, mask in loader:
        cm.update(logits.argmax(1), mask)
    cm.all_reduce()            # sums the matrices of every DDP rank (no-op without torch.distributed)
    cm.compute()               # {"acc", "iou", "miou", "dice", "mdice"}

p[i, j] counts pixels of true class i predicted as j. ACC = Σ p_ii / Σ p_ij; IoU_k = p_kk / (Σ_j p_kj +
Σ_j p_jk − p_kk); Dice_k = 2 p_kk / (Σ_j p_kj + Σ_j p_jk). A class absent from both prediction and target
has no defined IoU/Dice and is left out of the means (reported as NaN).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int | None = None, device="cpu"):
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} and target shape {tuple(target.shape)} differ")
        pred, target = pred.reshape(-1).to(self.matrix.device), target.reshape(-1).to(self.matrix.device)
        keep = torch.ones_like(target, dtype=torch.bool)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        bad = keep & ((target < 0) | (target >= self.num_classes) | (pred < 0) | (pred >= self.num_classes))
        if bad.any():
            raise ValueError(f"labels outside [0, {self.num_classes}) found (and not ignore_index)")
        idx = target[keep].long() * self.num_classes + pred[keep].long()
        self.matrix += torch.bincount(idx, minlength=self.num_classes**2).reshape(self.num_classes, -1)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix)

    def compute(self) -> dict:
        p = self.matrix.double().cpu()
        diag, rows, cols = p.diag(), p.sum(1), p.sum(0)
        union = rows + cols - diag
        iou = torch.where(union > 0, diag / union.clamp_min(1), torch.full_like(diag, float("nan")))
        dice = torch.where(rows + cols > 0, 2 * diag / (rows + cols).clamp_min(1), torch.full_like(diag, float("nan")))
        total = p.sum()
        return {
            "acc": float(diag.sum() / total) if total > 0 else float("nan"),
            "iou": iou.tolist(),
            "miou": float(np.nanmean(iou.numpy())) if torch.isfinite(iou).any() else float("nan"),
            "dice": dice.tolist(),
            "mdice": float(np.nanmean(dice.numpy())) if torch.isfinite(dice).any() else float("nan"),
        }


def hd95(pred: np.ndarray, target: np.ndarray, label: int) -> float:
    """95th-percentile symmetric Hausdorff distance (pixels) between the `label` regions of two masks.

    Defined values: 0.0 when the class is absent from both; the image diagonal when it is present in only
    one (the largest distance the image allows), so an averaged HD95 stays finite and penalises misses.
    """
    from scipy.ndimage import binary_erosion, distance_transform_edt

    a, b = np.asarray(pred) == label, np.asarray(target) == label
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float(np.hypot(*a.shape))
    border_a = a & ~binary_erosion(a)
    border_b = b & ~binary_erosion(b)
    to_b = distance_transform_edt(~border_b)[border_a]
    to_a = distance_transform_edt(~border_a)[border_b]
    return float(np.percentile(np.concatenate([to_b, to_a]), 95))
