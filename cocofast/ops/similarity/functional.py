"""CoCo DistillNet's similarity losses (the paper's CMSS and cross-layer correlation), with interchangeable backends.

For a map F (C×h×w), N = h·w: channel weights w = softmax(max-pool(F)), rows G'_i = F[:, i]·w, Â_i =
G'_i / max(‖G'_i‖, eps), and the channel-mixed spatial similarity M = ÂÂᵀ (N×N). For two layers of one
network, φ = ⟨M₁, M₂⟩_F / (‖M₁‖_F ‖M₂‖_F); the CoCo loss is the mean of (φ_T − φ_S)².

Backends (every one differentiable, every one agreeing with the others):
    naive  materialises M; the reference (naive.py). Refuses, before allocating, when M would not fit.
    gram   the identity ⟨Â₁Â₁ᵀ, Â₂Â₂ᵀ⟩ = ‖Â₁ᵀÂ₂‖² in plain torch with a hand-written backward
           (cocofast.ops.similarity.gram_torch).
    triton fused Triton kernels for the identity (cocofast.kernels.gram).
    tiled  flash-style Triton kernels that walk M in tiles and never store it (cocofast.kernels.tiled).
    auto   gram off CUDA; on CUDA triton where its modelled time is lower than gram's, else gram
           (cocofast.ops.similarity.auto).
On CUDA, the first triton launch of each kernel class is checked against the float64 gram path on its
batch (cocofast.ops.selfcheck): auto falls back to gram with a warning, triton raises.

The backend table is cocofast.ops.backends.SIMILARITY_BACKENDS; the input checks are cocofast.ops.checks.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from cocofast.ops import selfcheck
from cocofast.ops.backends import SIMILARITY_BACKENDS, check_backend
from cocofast.ops.checks import NaiveTooLargeError, check_map, check_pair, extrema_check, shape_str
from cocofast.ops.similarity import naive
from cocofast.ops.similarity.auto import similarity_auto_backend
from cocofast.ops.similarity.gram_torch import TorchGramStats

BACKENDS = SIMILARITY_BACKENDS  # the name cocofast.losses and cocofast.BACKENDS have always used


def _resolve(backend: str, f1: torch.Tensor, f2: torch.Tensor) -> str:
    check_backend("similarity", backend)
    return similarity_auto_backend(f1, f2) if backend == "auto" else backend


# --------------------------------------------------------------------------------------------- public


def cmss(feat: torch.Tensor, *, channel_mix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Normalised rows Â, shape (B, H·W, C): the paper's channel-mixed pixel vectors, L2-normalised; fp32
    (fp64 for fp64 input); M = Â Âᵀ."""
    check_map("cmss", "feat", feat)
    return naive.normalised_rows(feat, channel_mix=channel_mix, eps=eps)


def _stats(fn: str, names: tuple[str, str], f1, f2, channel_mix: bool, backend: str, eps: float = 1e-6):
    """(k, p, q, d) per image in float64: ⟨M₁,M₂⟩, ‖M₁‖², ‖M₂‖², ‖M₁−M₂‖², after the input checks."""
    check_pair(fn, names, f1, f2, values=False)
    requested, backend = backend, _resolve(backend, f1, f2)
    if backend == "triton" and selfcheck.active(f1.device):
        backend = _self_checked(fn, names, f1, f2, channel_mix, eps, explicit=requested == "triton")
    if backend != "triton":  # the triton kernels check the values in the pass that finds the channel max
        check_map(fn, names[0], f1)
        check_map(fn, names[1], f2)
    if backend == "naive":
        return naive.naive_stats(fn, f1, f2, channel_mix, eps)
    if backend == "tiled":
        from cocofast.kernels import tiled_stats

        return tiled_stats(f1, f2, channel_mix, eps)
    if backend == "triton":
        from cocofast.kernels import gram_stats

        k, p, q = gram_stats(f1, f2, channel_mix, eps, check=extrema_check(fn, names, f1, f2))
    else:
        k, p, q = TorchGramStats.apply(f1, f2, channel_mix, eps)
    return k, p, q, p + q - 2 * k


def _self_checked(fn: str, names, f1, f2, channel_mix: bool, eps: float, explicit: bool) -> str:
    """'triton', or 'gram' where the kernels failed their self-check for this class (cocofast.ops.selfcheck)."""
    from cocofast.kernels import gram_stats
    from cocofast.kernels.gram import launch_class

    check = extrema_check(fn, names, f1, f2)  # bad input is a ValueError, not a failed self-check
    return selfcheck.checked_backend(
        fn, f1, f2, channel_mix, eps, explicit=explicit, key=launch_class(f1, f2),
        kernel_stats=lambda a, b: gram_stats(a, b, channel_mix, eps, check=check))


def _out_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def cross_layer_correlation(shallow: torch.Tensor, deep: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """φ(shallow, deep) per image, shape (B,): the Frobenius correlation of the two CMSS matrices."""
    k, p, q, _ = _stats("cross_layer_correlation", ("shallow", "deep"), shallow, deep, True, backend)
    pq = p * q
    ok = pq > 0
    # sqrt only of safe values: sqrt'(0) = inf would turn the masked branch's zero gradient into NaN.
    phi = torch.where(ok, k / torch.sqrt(torch.where(ok, pq, torch.ones_like(pq))), torch.zeros_like(k))
    return phi.to(_out_dtype(shallow, deep))


def coco_loss(teacher_pairs: Sequence, student_pairs: Sequence, *, backend: str = "auto") -> torch.Tensor:
    """Mean over layer pairs and images of (φ_T − φ_S)²; teacher maps are treated as constants."""
    if len(teacher_pairs) != len(student_pairs) or len(teacher_pairs) == 0:
        raise ValueError(f"coco_loss: `teacher_pairs` and `student_pairs` must be non-empty and of equal length; "
                         f"got {len(teacher_pairs)} and {len(student_pairs)}")
    terms = []
    for i, (tp, sp) in enumerate(zip(teacher_pairs, student_pairs)):
        if len(tp) != 2 or len(sp) != 2:
            raise ValueError(f"coco_loss: pair {i} must be a (shallow, deep) tuple")
        if tp[0].dim() == 4 and sp[0].dim() == 4 and tp[0].shape[0] != sp[0].shape[0]:
            raise ValueError(f"coco_loss: pair {i}: teacher batch {shape_str(tp[0])} and student batch "
                             f"{shape_str(sp[0])} differ")
        with torch.no_grad():
            phi_t = cross_layer_correlation(tp[0].detach(), tp[1].detach(), backend=backend)
        phi_s = cross_layer_correlation(sp[0], sp[1], backend=backend)
        terms.append((phi_t.to(phi_s.dtype) - phi_s).square().mean())
    return torch.stack(terms).mean()


def similarity_distance(f_teacher: torch.Tensor, f_student: torch.Tensor, *, channel_mix: bool = True,
                        backend: str = "auto") -> torch.Tensor:
    """mean_b ‖M_T − M_S‖²_F / N²: the paper's SS ablation with channel_mix=False, CMSS with channel_mix=True."""
    _, _, _, d = _stats("similarity_distance", ("f_teacher", "f_student"), f_teacher, f_student, channel_mix,
                        backend)
    n_pix = f_student.shape[2] * f_student.shape[3]
    # The identity p + q − 2k can round slightly below zero when the matrices nearly agree.
    return (d.clamp_min(0) / math.prod((n_pix, n_pix))).mean().to(_out_dtype(f_teacher, f_student))


__all__ = ["BACKENDS", "NaiveTooLargeError", "cmss", "coco_loss", "cross_layer_correlation",
           "similarity_distance"]
