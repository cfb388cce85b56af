"""Intra-class feature variation distillation (Wang et al. 2020) on the deep tap.

Per image and class k, the prototype is the mean feature of the pixels labelled k (labels nearest-downsampled
to the tap's grid). Each network's map is the cosine similarity of every pixel's feature to its own class's
prototype; the loss is the mean squared difference of the two maps. Maps are per network, so channel counts
may differ. Pixels whose label is not a class (e.g. an ignore index of 255) serve as their own prototype, a
cosine of 1 in both networks, as in IFVD's reference code: they add nothing but still count in the mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cocofast.losses.base import DistillLoss, shape_str


def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) integer labels -> (B, h, w) by nearest neighbour (never averaging class indices)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def prototype_cosine_map(feat: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         eps: float = 1e-8) -> torch.Tensor:
    """(B, C, h, w) features, (B, h, w) labels -> (B, h, w) cosine of each pixel to its class prototype."""
    f = feat.flatten(2)                                                     # (B, C, N)
    lab = labels.flatten(1)                                                 # (B, N)
    valid = (lab >= 0) & (lab < num_classes)
    member = F.one_hot(torch.where(valid, lab, 0), num_classes).to(f.dtype)  # (B, N, K)
    member = member * valid[..., None].to(f.dtype)
    counts = member.sum(dim=1)                                              # (B, K)
    protos = torch.bmm(f, member) / (counts[:, None, :] + 1e-6)             # (B, C, K)
    centre = torch.bmm(protos, member.transpose(1, 2))                      # (B, C, N), zero where invalid
    centre = torch.where(valid[:, None, :], centre, f)
    dot = (f * centre).sum(dim=1)
    norms = f.norm(dim=1).clamp_min(eps) * centre.norm(dim=1).clamp_min(eps)
    return (dot / norms).view(labels.shape)


class IFVDLoss(DistillLoss):
    default_weight = 200.0
    needs_labels = True

    def compute(self, student, teacher, labels):
        name = type(self).__name__
        if not isinstance(labels, torch.Tensor) or labels.dim() != 3 or labels.is_floating_point():
            got = shape_str(labels) + f" {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"{name}: `labels` must be an integer tensor (B, H, W) of class indices, got {got}")
        if labels.shape[0] != student.logits.shape[0]:
            raise ValueError(f"{name}: `labels` {shape_str(labels)} and student logits "
                             f"{shape_str(student.logits)} have different batch sizes")
        if student.deep.shape[-2:] != teacher.deep.shape[-2:]:
            raise ValueError(f"{name}: the student's and teacher's deep taps must share h×w, got "
                             f"{shape_str(student.deep)} and {shape_str(teacher.deep)}")
        small = downsample_labels(labels.to(student.deep.device), tuple(student.deep.shape[-2:]))
        num_classes = student.logits.shape[1]
        map_s = prototype_cosine_map(student.deep, small, num_classes)
        map_t = prototype_cosine_map(teacher.deep, small, num_classes)
        return (map_s - map_t).square().mean()
