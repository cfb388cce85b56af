"""Label maps at a feature map's grid, and each pixel's class membership: what IFVD and EMKD's RAD share."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) integer labels -> (B, h, w) by nearest neighbour (never averaging class indices)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def class_membership(labels: torch.Tensor, num_classes: int, dtype: torch.dtype):
    """(B, h, w) labels -> member (B, N, K) one-hot, zero at pixels of no class; valid (B, N); counts (B, K)."""
    lab = labels.flatten(1)
    valid = (lab >= 0) & (lab < num_classes)
    member = F.one_hot(torch.where(valid, lab, 0), num_classes).to(dtype) * valid[..., None].to(dtype)
    return member, valid, member.sum(dim=1)


def class_means(feat: torch.Tensor, member: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) features, membership (B, N, K), counts (B, K) -> per-class mean feature (B, C, K)."""
    return torch.bmm(feat.flatten(2), member) / counts.clamp_min(1)[:, None, :]
