"""Supervised segmentation losses for EMKD's student: focal, soft dice, and their even mix.

logits (B, K, H, W), labels (B, H, W) integer class indices; pixels labelled `ignore_index` count nowhere.
With p = softmax(logits) over the class axis and p_t the probability of a pixel's true class:

    focal = mean over valid pixels (all images together) of −(1 − p_t)^γ · log p_t        (γ = 2)
    dice  = mean over images of [1 − mean over classes k of (2·Σ p_k·y_k + ε) / (Σ p_k + Σ y_k + ε)]
            sums over the image's valid pixels, y_k the one-hot label, ε = 1 (so an absent class that the
            network also predicts absent scores ≈ 1, and an image without valid pixels scores a loss of 0)
    focal_dice = 0.5·focal + 0.5·dice                       (Qin et al. 2021's supervised term)

Everything runs with autocast off and at least fp32: bf16/fp16 logits are widened, fp64 stays fp64 (so the
tests can gradcheck). A batch with no valid pixel at all gives a focal term of 0 that still carries a graph.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cocofast.losses.base import check_labels, shape_str


def _widen(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype == torch.float64 else logits.float()


def check_seg_inputs(loss: str, logits, labels, ignore_index: int) -> None:
    """Logits (B, K, H, W) and labels that are either a class index or `ignore_index` (base.check_labels)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or not logits.is_floating_point():
        got = f"{shape_str(logits)} {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{loss}: `logits` must be a floating-point tensor (B, K, H, W), got {got}")
    b, k, h, w = logits.shape
    check_labels(loss, labels, k, (h, w), b, ignore_index)


def _valid_one_hot(labels: torch.Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype):
    """(B, H, W) -> valid mask (B, H, W) bool and one-hot (B, K, H, W), zero at ignored pixels."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    one_hot = F.one_hot(safe, num_classes).permute(0, 3, 1, 2).to(dtype)
    return valid, one_hot * valid[:, None].to(dtype)


def _check_gamma(loss: str, gamma: float) -> None:
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"{loss}: gamma must be a finite number >= 0, got {gamma!r}")


def _check_eps(eps: float) -> None:
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"dice_loss: eps must be a finite number > 0, got {eps!r}")


def _focal(logits, labels, gamma, ignore_index):
    valid, one_hot = _valid_one_hot(labels, logits.shape[1], ignore_index, logits.dtype)
    log_p_true = (F.log_softmax(logits, dim=1) * one_hot).sum(dim=1)             # 0 at ignored pixels
    # The floor keeps the base positive (rounding can push p_t past 1, and ignored pixels sit at exactly 0):
    # at 0 a fractional γ < 1 would give pow an infinite slope and the product 0·∞ = NaN gradients.
    modulation = (1 - log_p_true.exp()).clamp_min(torch.finfo(logits.dtype).tiny).pow(gamma)
    count = valid.sum().clamp_min(1).to(logits.dtype)
    return -(modulation * log_p_true).sum() / count


def _dice(logits, labels, ignore_index, eps):
    valid, one_hot = _valid_one_hot(labels, logits.shape[1], ignore_index, logits.dtype)
    probs = F.softmax(logits, dim=1) * valid[:, None].to(logits.dtype)
    overlap = (probs * one_hot).sum(dim=(2, 3))                                  # (B, K)
    total = probs.sum(dim=(2, 3)) + one_hot.sum(dim=(2, 3))
    dice = (2 * overlap + eps) / (total + eps)
    return (1 - dice.mean(dim=1)).mean()


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0,
               ignore_index: int = 255) -> torch.Tensor:
    _check_gamma("focal_loss", gamma)
    check_seg_inputs("focal_loss", logits, labels, ignore_index)
    with torch.autocast(logits.device.type, enabled=False):
        return _focal(_widen(logits), labels.to(logits.device), gamma, ignore_index)


def dice_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
              eps: float = 1.0) -> torch.Tensor:
    _check_eps(eps)
    check_seg_inputs("dice_loss", logits, labels, ignore_index)
    with torch.autocast(logits.device.type, enabled=False):
        return _dice(_widen(logits), labels.to(logits.device), ignore_index, eps)


def focal_dice_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0,
                    ignore_index: int = 255) -> torch.Tensor:
    _check_gamma("focal_dice_loss", gamma)
    check_seg_inputs("focal_dice_loss", logits, labels, ignore_index)
    with torch.autocast(logits.device.type, enabled=False):
        logits, labels = _widen(logits), labels.to(logits.device)
        return 0.5 * _focal(logits, labels, gamma, ignore_index) + 0.5 * _dice(logits, labels, ignore_index, 1.0)
