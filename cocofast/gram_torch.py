"""The Gram identity in plain torch: CoCo statistics on any device with memory bounded by one image.

Same contract as `cocofast.kernels.GramStats`: (f₁, f₂) -> (k, p, q) per image in float64, with
k = ‖Â₁ᵀÂ₂‖², p = ‖Â₁ᵀÂ₁‖², q = ‖Â₂ᵀÂ₂‖². Autograd through the obvious torch expression would keep every
intermediate of every image alive (several times the input); this Function keeps only the inputs and the
C×C matrices, and in the backward rebuilds Â one image at a time, so peak extra memory is the gradient
itself plus a few single-image temporaries.
"""
from __future__ import annotations

import torch


def _rows(f: torch.Tensor, channel_mix: bool, eps: float, acc: torch.dtype):
    """One image (C, H, W) -> raw X (C, N), weights w (C,), amax, norms r (N,), A = Âᵀ (C, N).

    Everything stays channel-major (C, N) as the maps are stored: per-pixel reductions then run over
    contiguous rows, several times faster on CPU than over a transposed (N, C) view.
    """
    C = f.shape[0]
    x = f.reshape(C, -1).to(acc)
    if channel_mix:
        amax = x.amax(dim=1)
        w = torch.softmax(amax, dim=0)
    else:
        amax, w = None, torch.ones(C, dtype=acc, device=f.device)
    g = x * w[:, None]
    r = torch.linalg.vector_norm(g, dim=0)
    a = g.div_(r.clamp_min(eps))
    return x, w, amax, r, a


def _chain_backward(da, x, w, amax, r, a, eps):
    """dA (C, N) -> dF (C, N) through the row normalisation and the softmax-of-max weights."""
    t = (a * da).sum(dim=0) * (r > eps)
    dg = da.sub_(a * t).div_(r.clamp_min(eps))
    dx = dg * w[:, None]
    if amax is not None:
        dw = (dg * x).sum(dim=1)
        dlogit = w * (dw - (w * dw).sum())
        hit = x == amax[:, None]
        dx += hit * (dlogit / hit.sum(dim=1))[:, None]
    return dx


class TorchGramStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f1, f2, channel_mix: bool, eps: float):
        acc = torch.float64 if torch.float64 in (f1.dtype, f2.dtype) else torch.float32
        mats = []
        for b in range(f1.shape[0]):
            a1 = _rows(f1[b], channel_mix, eps, acc)[-1]
            a2 = _rows(f2[b], channel_mix, eps, acc)[-1]
            mats.append((a1 @ a1.t(), a2 @ a2.t(), a1 @ a2.t()))
        s1, s2, k = (torch.stack(m) for m in zip(*mats))
        ctx.save_for_backward(f1, f2, s1, s2, k)
        ctx.opts = (channel_mix, eps, acc)
        sq = lambda m: m.double().square().sum(dim=(1, 2))  # noqa: E731 - combine in fp64 (SPEC §2)
        return sq(k), sq(s1), sq(s2)

    @staticmethod
    def backward(ctx, gk, gp, gq):
        f1, f2, s1, s2, k = ctx.saved_tensors
        channel_mix, eps, acc = ctx.opts
        need1, need2 = ctx.needs_input_grad[:2]
        df1 = torch.empty_like(f1) if need1 else None
        df2 = torch.empty_like(f2) if need2 else None
        gk, gp, gq = gk.to(acc), gp.to(acc), gq.to(acc)
        for b in range(f1.shape[0]):
            x1, w1, m1, r1, a1 = _rows(f1[b], channel_mix, eps, acc)
            x2, w2, m2, r2, a2 = _rows(f2[b], channel_mix, eps, acc)
            # In (C, N) layout: dÂ₁ = Â₁X + Â₂Y becomes dA₁ = XᵀA₁ + YᵀA₂ (S symmetric, Yᵀ = 2g_k K).
            if need1:
                da1 = torch.addmm((2 * gk[b]) * k[b] @ a2, (4 * gp[b]) * s1[b], a1)
                df1[b] = _chain_backward(da1, x1, w1, m1, r1, a1, eps).reshape(f1.shape[1:])
                del da1
            if need2:
                da2 = torch.addmm((2 * gk[b]) * k[b].t() @ a1, (4 * gq[b]) * s2[b], a2)
                df2[b] = _chain_backward(da2, x2, w2, m2, r2, a2, eps).reshape(f2.shape[1:])
                del da2
        return df1, df2, None, None
