"""The pixel relation's reference: R = ÂÂᵀ/τ and both row-softmaxes materialised as N×N matrices.

The chunked and triton backends are checked against this one; the dispatch refuses it, before allocating,
when its matrices would not fit.
"""
from __future__ import annotations

import torch

from cocofast.ops.checks import accumulation_dtype, check_naive_fits
from cocofast.ops.similarity import cmss

# N×N buffers the naive backend holds at its peak: R and log P per network, P_T and the KL summand.
NAIVE_MATRICES = 6


def naive_rows(f_teacher: torch.Tensor, f_student: torch.Tensor, tau: float, channel_mix: bool,
               eps: float = 1e-6) -> torch.Tensor:
    """Per-row KL (B, N) from the explicit N×N matrices, in fp32 (fp64 when either input is fp64)."""
    acc = accumulation_dtype(f_teacher, f_student)
    check_naive_fits("pixel_relation_kl", batch=f_student.shape[0], n_pix=f_student.shape[2] * f_student.shape[3],
                     matrices=NAIVE_MATRICES, element_bytes=acc.itemsize, device=f_student.device,
                     alternatives="backend='chunked' or 'triton'")
    a_t = cmss(f_teacher.detach(), channel_mix=channel_mix, eps=eps).to(acc)
    a_s = cmss(f_student, channel_mix=channel_mix, eps=eps).to(acc)
    log_p_t = torch.log_softmax(a_t @ a_t.transpose(1, 2) / tau, dim=2)
    log_p_s = torch.log_softmax(a_s @ a_s.transpose(1, 2) / tau, dim=2)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=2)


__all__ = ["NAIVE_MATRICES", "naive_rows"]
