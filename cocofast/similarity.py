"""CoCo DistillNet's similarity losses (SPEC §2), with interchangeable backends.

For a map F (C×h×w), N = h·w: channel weights w = softmax(max-pool(F)), rows G'_i = F[:, i]·w, Â_i =
G'_i / max(‖G'_i‖, eps), and the channel-mixed spatial similarity M = ÂÂᵀ (N×N). For two layers of one
network, φ = ⟨M₁, M₂⟩_F / (‖M₁‖_F ‖M₂‖_F); the CoCo loss is the mean of (φ_T − φ_S)².

Backends (every one differentiable, every one agreeing with the others):
    naive  materialises M; the reference. Refuses, before allocating, when M would not fit.
    gram   the identity ⟨Â₁Â₁ᵀ, Â₂Â₂ᵀ⟩ = ‖Â₁ᵀÂ₂‖² in plain torch, one image at a time.
    triton fused Triton kernels for the identity (cocofast.kernels.gram).
    tiled  flash-style Triton kernels that walk M in tiles and never store it (cocofast.kernels.tiled).
    auto   triton for CUDA tensors, gram otherwise.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from cocofast.gram_torch import TorchGramStats

BACKENDS = ("naive", "gram", "triton", "tiled", "auto")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class NaiveTooLargeError(MemoryError):
    """backend='naive' was asked for N×N matrices that would not fit in memory."""


# ------------------------------------------------------------------------------------------ validation


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_map(fn: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: `{name}` must be a torch.Tensor of shape (B, C, H, W), got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{fn}: `{name}` must have 4 dimensions (B, C, H, W), got shape {_shape(t)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{fn}: `{name}` has dtype {t.dtype}; expected float16, bfloat16, float32 or float64 "
                         f"(shape {_shape(t)})")
    if t.numel() == 0:
        raise ValueError(f"{fn}: `{name}` is empty, shape {_shape(t)}")
    # One fp32 reduction instead of an isfinite mask: no input-sized temporary, and NaN/±Inf propagate.
    if not torch.isfinite(t.detach().sum(dtype=torch.float32)):
        raise ValueError(f"{fn}: `{name}` (shape {_shape(t)}) contains NaN or Inf")


def _check_pair(fn: str, names: tuple[str, str], a: torch.Tensor, b: torch.Tensor) -> None:
    _check_map(fn, names[0], a)
    _check_map(fn, names[1], b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{fn}: `{names[0]}` and `{names[1]}` have different batch sizes: shapes {_shape(a)} "
                         f"and {_shape(b)}")
    if a.shape[2] * a.shape[3] != b.shape[2] * b.shape[3]:
        raise ValueError(f"{fn}: `{names[0]}` and `{names[1]}` must have the same number of pixels H·W: shapes "
                         f"{_shape(a)} and {_shape(b)} ({a.shape[2] * a.shape[3]} vs {b.shape[2] * b.shape[3]})")
    if a.device != b.device:
        raise ValueError(f"{fn}: `{names[0]}` is on {a.device} but `{names[1]}` is on {b.device}")


def _resolve(backend: str, t: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        return "triton" if t.is_cuda else "gram"
    return backend


# --------------------------------------------------------------------------------------------- public


def cmss(feat: torch.Tensor, *, channel_mix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Normalised rows Â of SPEC §2, shape (B, H·W, C), fp32 (fp64 for fp64 input); M = Â Âᵀ."""
    _check_map("cmss", "feat", feat)
    x = feat.to(torch.float64 if feat.dtype == torch.float64 else torch.float32)
    if channel_mix:
        w = torch.softmax(torch.amax(x, dim=(2, 3)), dim=1)
        x = x * w[:, :, None, None]
    g = x.flatten(2).transpose(1, 2)
    return g / torch.linalg.vector_norm(g, dim=2, keepdim=True).clamp_min(eps)


def _naive_guard(fn: str, batch: int, n_pix: int, matrices: int, device: torch.device) -> None:
    need = batch * n_pix * n_pix * 4 * matrices
    if device.type == "cuda":
        avail = torch.cuda.mem_get_info(device)[0]
    else:
        avail = _available_host_memory()
    if need > avail:
        raise NaiveTooLargeError(
            f"{fn}(backend='naive') would materialise {matrices} sets of B={batch} N×N matrices with N={n_pix} "
            f"(about {need / 2**30:.1f} GiB) but only {avail / 2**30:.1f} GiB is available on {device}; "
            "use backend='gram', 'triton' or 'tiled', which never store N×N")


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _stats(fn: str, f1, f2, channel_mix: bool, backend: str, eps: float = 1e-6):
    """(k, p, q, d) per image in float64: ⟨M₁,M₂⟩, ‖M₁‖², ‖M₂‖², ‖M₁−M₂‖²."""
    backend = _resolve(backend, f1)
    if backend == "naive":
        _naive_guard(fn, f1.shape[0], f1.shape[2] * f1.shape[3], 6, f1.device)
        a1, a2 = cmss(f1, channel_mix=channel_mix, eps=eps), cmss(f2, channel_mix=channel_mix, eps=eps)
        m1, m2 = a1 @ a1.transpose(1, 2), a2 @ a2.transpose(1, 2)
        red = lambda m: m.sum(dim=(1, 2)).double()  # noqa: E731
        return red(m1 * m2), red(m1 * m1), red(m2 * m2), red((m1 - m2).square())
    if backend == "tiled":
        from cocofast.kernels import tiled_stats

        return tiled_stats(f1, f2, channel_mix, eps)
    if backend == "triton":
        from cocofast.kernels import gram_stats

        k, p, q = gram_stats(f1, f2, channel_mix, eps)
    else:
        k, p, q = TorchGramStats.apply(f1, f2, channel_mix, eps)
    return k, p, q, p + q - 2 * k


def _out_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def cross_layer_correlation(shallow: torch.Tensor, deep: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """φ(shallow, deep) per image, shape (B,): the Frobenius correlation of the two CMSS matrices."""
    _check_pair("cross_layer_correlation", ("shallow", "deep"), shallow, deep)
    k, p, q, _ = _stats("cross_layer_correlation", shallow, deep, True, backend)
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
            raise ValueError(f"coco_loss: pair {i}: teacher batch {_shape(tp[0])} and student batch "
                             f"{_shape(sp[0])} differ")
        with torch.no_grad():
            phi_t = cross_layer_correlation(tp[0].detach(), tp[1].detach(), backend=backend)
        phi_s = cross_layer_correlation(sp[0], sp[1], backend=backend)
        terms.append((phi_t.to(phi_s.dtype) - phi_s).square().mean())
    return torch.stack(terms).mean()


def similarity_distance(f_teacher: torch.Tensor, f_student: torch.Tensor, *, channel_mix: bool = True,
                        backend: str = "auto") -> torch.Tensor:
    """mean_b ‖M_T − M_S‖²_F / N² (SPEC §2.7): SS with channel_mix=False, CMSS with channel_mix=True."""
    _check_pair("similarity_distance", ("f_teacher", "f_student"), f_teacher, f_student)
    n_pix = f_student.shape[2] * f_student.shape[3]
    _, _, _, d = _stats("similarity_distance", f_teacher, f_student, channel_mix, backend)
    # The identity p + q − 2k can round slightly below zero when the matrices nearly agree.
    return (d.clamp_min(0) / math.prod((n_pix, n_pix))).mean().to(_out_dtype(f_teacher, f_student))


__all__ = ["BACKENDS", "NaiveTooLargeError", "cmss", "coco_loss", "cross_layer_correlation",
           "similarity_distance"]
