"""Distillation losses behind one flat registry, all with one call signature.

    loss = get_loss("kd", temperature=4.0)          # or get_loss("ifvd", weight=100)
    value = loss(student_out, teacher_out, labels, teacher_feats=None)   # scalar fp32, weight applied

`student_out` and `teacher_out` are `SegOutput(logits, shallow, deep)`; `labels` (B, H, W) class indices
(only losses with `needs_labels` read them); `teacher_feats` optionally replaces the teacher's (shallow, deep)
taps, e.g. with paraphraser encodings (`needs_teacher_feats`: FSP requires equal channel counts). Every loss
computes in fp32 with autocast off and treats the teacher as a constant. Default weights: SPEC §6.

    kd            Hinton logit KD per pixel, T = 4
    at            attention transfer on both taps, weight 1000
    fsp           FSP matrices of (shallow, deep), teacher paraphrased to the student's channels
    skd_pairwise  SKD pairwise similarity ("SS"), max-pooled deep tap, weight 0.5
    skd_pixel     SKD pixel-wise KD, T = 1, weight 10
    cmss          channel-mixed pairwise similarity (the paper's CMSS ablation), as skd_pairwise otherwise
    ifvd          IFVD class-prototype cosine maps on the deep tap, weight 200
    coco          CoCo cross-layer correlation loss, weight 1 (λ)
    emkd          EMKD: pixel-map KD (T = 4), importance maps (F⁴), region affinity; 0.1 / 0.9 / 0.9; labels
    graph_flow    Graph Flow: CMSS vertices and φ edges over each network's `graph_tap_paths` chain
    cpkd          CPKD: C×C channel correlations + pixel-relation KL (flash-style kernel), teacher paraphrased

Adding a loss: a module here with a DistillLoss subclass, then its import and one entry in LOSSES.
"""
from __future__ import annotations

import inspect

from cocofast.losses.at import ATLoss
from cocofast.losses.base import DistillLoss
from cocofast.losses.cmss import CMSSLoss
from cocofast.losses.coco import CoCoLoss
from cocofast.losses.cpkd import CPKDLoss
from cocofast.losses.emkd import EMKDLoss
from cocofast.losses.fsp import FSPLoss
from cocofast.losses.graph_flow import GraphFlowLoss
from cocofast.losses.ifvd import IFVDLoss
from cocofast.losses.kd import KDLoss
from cocofast.losses.skd_pairwise import SKDPairwiseLoss
from cocofast.losses.skd_pixel import SKDPixelLoss

LOSSES: dict[str, type[DistillLoss]] = {
    "kd": KDLoss,
    "at": ATLoss,
    "fsp": FSPLoss,
    "skd_pairwise": SKDPairwiseLoss,
    "skd_pixel": SKDPixelLoss,
    "cmss": CMSSLoss,
    "ifvd": IFVDLoss,
    "coco": CoCoLoss,
    "emkd": EMKDLoss,
    "graph_flow": GraphFlowLoss,
    "cpkd": CPKDLoss,
}


def list_losses() -> list[str]:
    return sorted(LOSSES)


def get_loss(name: str, **kwargs) -> DistillLoss:
    """Build the loss registered as `name` with its hyper-parameters (unknown names or keys are errors)."""
    if name not in LOSSES:
        raise ValueError(f"unknown distillation loss {name!r}; known losses: {', '.join(list_losses())}")
    cls = LOSSES[name]
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"loss {name!r} got unknown hyper-parameter(s) {', '.join(unknown)}; "
                         f"it accepts: {', '.join(accepted)}")
    return cls(**kwargs)


__all__ = ["ATLoss", "CMSSLoss", "CoCoLoss", "CPKDLoss", "DistillLoss", "EMKDLoss", "FSPLoss", "GraphFlowLoss",
           "IFVDLoss", "KDLoss", "LOSSES",
           "SKDPairwiseLoss", "SKDPixelLoss", "get_loss", "list_losses"]
