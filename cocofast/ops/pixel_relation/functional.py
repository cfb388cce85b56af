"""CPKD's pixel-wise relation distillation: KL between teacher and student row-softmaxes over pixels.

For each image, a feature map F (C×h×w, N = h·w) gives rows Â (N×C), each pixel's feature vector
L2-normalised exactly as `cocofast.cmss` does (optionally after CoCo's channel mixing). Then

    R = Â Âᵀ / τ   (N×N pixel relations),   P = row-softmax(R),
    L = mean over images b and rows i of KL(P_T[b, i] ‖ P_S[b, i]).

Teacher and student need the same N (H·W) and batch, not the same channels or (H, W). The teacher is a
constant: no gradient reaches it. Unlike CoCo's similarity losses, the softmax stops the Gram identity from
removing N×N, so the fast path is a flash-style kernel (cocofast.kernels.pixel_relation) that streams the
relation tiles with online softmaxes, and the CPU path (cocofast.ops.pixel_relation.chunked_torch) takes whole rows a
block at a time.

τ defaults to 1.0: R is then the plain cosine similarity in [−1, 1], and no temperature from the CPKD paper
is public. Smaller τ sharpens each pixel's distribution towards its most similar pixels; since every logit
lies in [−1/τ, 1/τ], any τ > 0 is numerically safe in the kernel (online max subtraction).

Backends:
    naive    materialises R, P for both networks (the reference, naive.py); refuses, before allocating, when
             they would not fit.
    chunked  plain torch, a block of rows at a time (about 64 MiB each), forward and backward; exact.
    triton   the flash-style kernels, forward and backward; O(N) memory beyond the inputs.
    auto     triton for CUDA tensors, chunked otherwise.

The backend table is cocofast.ops.backends.PIXEL_RELATION_BACKENDS; the input checks are cocofast.ops.checks.
"""
from __future__ import annotations

import math

import torch

from cocofast.ops.backends import PIXEL_RELATION_BACKENDS, check_backend
from cocofast.ops.checks import NaiveTooLargeError, accumulation_dtype, check_pair
from cocofast.ops.pixel_relation.chunked_torch import chunked_rows
from cocofast.ops.pixel_relation.naive import NAIVE_MATRICES, naive_rows
from cocofast.ops.similarity import cmss

BACKENDS = PIXEL_RELATION_BACKENDS  # the name cocofast.losses.cpkd has always used


def _resolve(backend: str, t: torch.Tensor) -> str:
    check_backend("pixel_relation", backend)
    if backend == "auto":
        return "triton" if t.is_cuda else "chunked"
    return backend


def pixel_relation_kl(f_teacher: torch.Tensor, f_student: torch.Tensor, *, tau: float = 1.0,
                      channel_mix: bool = False, backend: str = "auto", eps: float = 1e-6) -> torch.Tensor:
    """Scalar mean over images and pixels of KL(P_T[i] ‖ P_S[i]), P = row-softmax(Â Âᵀ / τ).

    f_teacher (B, C_T, H_T, W_T) and f_student (B, C_S, H_S, W_S) with H_T·W_T = H_S·W_S, float16/bfloat16/
    float32/float64, any layout; accumulation in fp32 (fp64 for fp64 input), result fp32 (fp64 likewise).
    Gradient to f_student only.
    """
    fn = "pixel_relation_kl"
    check_pair(fn, ("f_teacher", "f_student"), f_teacher, f_student)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"{fn}: `tau` must be a finite number > 0, got {tau!r}")
    if not isinstance(channel_mix, bool):
        raise ValueError(f"{fn}: `channel_mix` must be True or False, got {channel_mix!r}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{fn}: `eps` must be > 0, got {eps!r}")
    backend = _resolve(backend, f_student)
    if backend == "naive":
        rows = naive_rows(f_teacher, f_student, float(tau), channel_mix, float(eps))
    elif backend == "chunked":
        acc = accumulation_dtype(f_teacher, f_student)
        a_t = cmss(f_teacher.detach(), channel_mix=channel_mix, eps=eps).to(acc)
        rows = chunked_rows(a_t, cmss(f_student, channel_mix=channel_mix, eps=eps).to(acc), float(tau))
    else:
        from cocofast.kernels.pixel_relation import pixel_relation_rows

        rows = pixel_relation_rows(f_teacher, f_student, float(tau), channel_mix, float(eps))
    out = accumulation_dtype(f_teacher, f_student)
    # Sum in fp64: N·B terms of similar size, where fp32 would drift at N = 65,536.
    return rows.double().mean().to(out)


__all__ = ["BACKENDS", "NaiveTooLargeError", "pixel_relation_kl"]
