"""The similarity op's reference: Â row by row and the N×N matrices M = ÂÂᵀ materialised.

Every other backend (gram, triton, tiled) is checked against this one. It needs memory for six N×N
matrices per image, so the dispatch refuses it, before allocating, when they would not fit.
"""
from __future__ import annotations

import torch

from cocofast.ops.checks import check_naive_fits

NAIVE_MATRICES = 6  # M₁, M₂ and the three products the statistics reduce, plus M₁ − M₂


def normalised_rows(feat: torch.Tensor, *, channel_mix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Normalised rows Â, shape (B, H·W, C): the paper's channel-mixed pixel vectors, L2-normalised; fp32
    (fp64 for fp64 input); M = Â Âᵀ. No input check: the public `cocofast.cmss` checks first."""
    x = feat.to(torch.float64 if feat.dtype == torch.float64 else torch.float32)
    if channel_mix:
        w = torch.softmax(torch.amax(x, dim=(2, 3)), dim=1)
        x = x * w[:, :, None, None]
    g = x.flatten(2).transpose(1, 2)
    return g / torch.linalg.vector_norm(g, dim=2, keepdim=True).clamp_min(eps)


def naive_stats(fn: str, f1: torch.Tensor, f2: torch.Tensor, channel_mix: bool, eps: float):
    """(k, p, q, d) per image in float64 from the explicit matrices: ⟨M₁,M₂⟩, ‖M₁‖², ‖M₂‖², ‖M₁−M₂‖²."""
    check_naive_fits(fn, batch=f1.shape[0], n_pix=f1.shape[2] * f1.shape[3], matrices=NAIVE_MATRICES,
                     element_bytes=4, device=f1.device, alternatives="backend='gram', 'triton' or 'tiled'")
    a1 = normalised_rows(f1, channel_mix=channel_mix, eps=eps)
    a2 = normalised_rows(f2, channel_mix=channel_mix, eps=eps)
    m1, m2 = a1 @ a1.transpose(1, 2), a2 @ a2.transpose(1, 2)
    red = lambda m: m.sum(dim=(1, 2)).double()  # noqa: E731
    return red(m1 * m2), red(m1 * m1), red(m2 * m2), red((m1 - m2).square())


__all__ = ["NAIVE_MATRICES", "naive_stats", "normalised_rows"]
