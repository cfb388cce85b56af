"""Intra-class feature variation distillation (Wang et al. 2020) on the deep tap.

Per image and class k, the prototype is the mean feature of the pixels labelled k (labels nearest-downsampled
to the tap's grid). Each network's map is the cosine similarity of every pixel's feature to its own class's
prototype; the loss is the mean squared difference of the two maps. Maps are per network, so channel counts
may differ. Pixels whose label is not a class (e.g. an ignore index of 255) serve as their own prototype, a
cosine of 1 in both networks, as in IFVD's reference code: they add nothing but still count in the mean.
"""
from __future__ import annotations

import torch

from cocofast.losses.base import DistillLoss, Reads, shape_str
from cocofast.losses.labels import class_membership, downsample_labels
from cocofast.losses.registry import register_loss


def prototype_cosine_map(feat: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         eps: float = 1e-8) -> torch.Tensor:
    """(B, C, h, w) features, (B, h, w) labels -> (B, h, w) cosine of each pixel to its class prototype."""
    f = feat.flatten(2)                                                     # (B, C, N)
    member, valid, counts = class_membership(labels, num_classes, f.dtype)
    protos = torch.bmm(f, member) / (counts[:, None, :] + 1e-6)             # (B, C, K)
    centre = torch.bmm(protos, member.transpose(1, 2))                      # (B, C, N), zero where invalid
    centre = torch.where(valid[:, None, :], centre, f)
    dot = (f * centre).sum(dim=1)
    norms = f.norm(dim=1).clamp_min(eps) * centre.norm(dim=1).clamp_min(eps)
    return (dot / norms).view(labels.shape)


@register_loss("ifvd")
class IFVDLoss(DistillLoss):
    """Labels must be (B, H, W) at the logits' size; the student's and teacher's deep taps must share h×w."""

    reads = Reads("logits", "deep", teacher="raw", labels=True)
    default_weight = 200.0

    def distill(self, student, teacher, labels):
        (s_logits, s_deep), (_, t_deep) = student, teacher
        if s_deep.shape[-2:] != t_deep.shape[-2:]:
            raise ValueError(f"{type(self).__name__}: the student's and teacher's deep taps must share h×w, got "
                             f"{shape_str(s_deep)} and {shape_str(t_deep)}")
        small = downsample_labels(labels, tuple(s_deep.shape[-2:]))
        num_classes = s_logits.shape[1]
        map_s = prototype_cosine_map(s_deep, small, num_classes)
        map_t = prototype_cosine_map(t_deep, small, num_classes)
        return (map_s - map_t).square().mean()
