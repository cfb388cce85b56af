"""Fused Gram-identity kernels: CoCo statistics of two maps without the N×N similarity matrices.

For one image, Â₁ (N×C₁) and Â₂ (N×C₂) are the channel-mixed, L2-normalised rows of two maps with equal
N = H·W (see cmss_rows.py). With S₁ = Â₁ᵀÂ₁, S₂ = Â₂ᵀÂ₂ and K = Â₁ᵀÂ₂,

    k = ‖K‖²_F = ⟨M₁, M₂⟩_F,   p = ‖S₁‖²_F = ‖M₁‖²_F,   q = ‖S₂‖²_F = ‖M₂‖²_F      (M = ÂÂᵀ, never built)

so φ = k / √(p q) and ‖M₁ − M₂‖²_F = p + q − 2k. Work is O(N·C₁·C₂), memory a few C×C matrices.

Forward: `gram_partial_kernel` accumulates one (C_a-tile × C_b-tile) block of ÂₐᵀÂ_b over one of SPLITS
interleaved row ranges; the splits are summed in a fixed order on the host, so results are bit-identical
from run to run. Backward (for upstream grads g_k, g_p, g_q per image):

    dÂ₁ = Â₁·(4 g_p S₁) + Â₂·(2 g_k Kᵀ),   dÂ₂ = Â₂·(4 g_q S₂) + Â₁·(2 g_k K)

which `chain_backward_kernel` evaluates row block by row block and carries through the normalisation and
the softmax-of-max-pool weights in the same pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (
    acc_dtype,
    channel_block,
    check_runnable,
    dot_precision,
    feature_strides,
    launch,
    load_inv_norm,
    load_mixed_tile,
    row_block,
    tl_dtype,
)
from .cmss_rows import MixedRows, chain_backward


@triton.jit
def gram_partial_kernel(
    fa_ptr, wa_ptr, na_ptr, fb_ptr, wb_ptr, nb_ptr, out_ptr,
    a_stride_b, a_stride_c, a_stride_h, a_stride_w, a_width,
    b_stride_b, b_stride_c, b_stride_h, b_stride_w, b_width,
    n_pix, n_chan_a, n_chan_b, eps,
    SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // SPLITS).to(tl.int64)
    split = pid % SPLITS
    ci = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cj = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    fa_b = fa_ptr + b * a_stride_b
    fb_b = fb_ptr + b * b_stride_b
    acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=ACC)
    for n0 in range(split * BLOCK_N, n_pix, SPLITS * BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        a = load_mixed_tile(fa_b, wa_ptr + b * n_chan_a, a_stride_c, a_stride_h, a_stride_w, a_width, n_pix,
                            n_chan_a, rows, ci, ACC)
        a = a * load_inv_norm(na_ptr + b * n_pix, rows, n_pix, eps)[:, None]
        o = load_mixed_tile(fb_b, wb_ptr + b * n_chan_b, b_stride_c, b_stride_h, b_stride_w, b_width, n_pix,
                            n_chan_b, rows, cj, ACC)
        o = o * load_inv_norm(nb_ptr + b * n_pix, rows, n_pix, eps)[:, None]
        acc += tl.dot(tl.trans(a), o, input_precision=PRECISION, out_dtype=ACC)
    out = out_ptr + (b * SPLITS + split) * n_chan_a * n_chan_b
    mask = (ci[:, None] < n_chan_a) & (cj[None, :] < n_chan_b)
    tl.store(out + ci[:, None] * n_chan_b + cj[None, :], acc, mask=mask)


# ----------------------------------------------------------------------------------------------- host


def _splits(batch: int, n_pix: int, block_n: int) -> int:
    # Enough programs to fill a GPU at batch 1, few enough that the partial sums stay small.
    return max(1, min(triton.cdiv(n_pix, block_n), 64 // min(batch, 8)))


def gram_matrix(fa, ra: MixedRows, fb, rb: MixedRows) -> torch.Tensor:
    """(B, C_a, C_b) = ÂₐᵀÂ_b per image, in the accumulation dtype."""
    B, Ca, H, W = fa.shape
    Cb = fb.shape[1]
    bn, bc = row_block(H * W), channel_block(max(Ca, Cb))
    splits = _splits(B, H * W, bn)
    part = torch.empty(B, splits, Ca, Cb, device=fa.device, dtype=ra.acc)
    launch(gram_partial_kernel, (B * splits, triton.cdiv(Ca, bc), triton.cdiv(Cb, bc)),
           dict(fa_ptr=fa, wa_ptr=ra.w, na_ptr=ra.norm, fb_ptr=fb, wb_ptr=rb.w, nb_ptr=rb.norm, out_ptr=part,
                **feature_strides(fa, "a_"), **feature_strides(fb, "b_"), n_pix=H * W, n_chan_a=Ca,
                n_chan_b=Cb, eps=ra.eps),
           dict(SPLITS=splits, BLOCK_N=bn, BLOCK_C=bc, ACC=tl_dtype(ra.acc), PRECISION=dot_precision(ra.acc)))
    return part.sum(dim=1)


class GramStats(torch.autograd.Function):
    """(f₁, f₂) -> (k, p, q), each (B,) in float64; see the module docstring."""

    @staticmethod
    def forward(ctx, f1, f2, channel_mix: bool, eps: float):
        check_runnable(f1, f2)
        acc = acc_dtype(f1, f2)
        r1, r2 = MixedRows(f1, channel_mix, eps, acc), MixedRows(f2, channel_mix, eps, acc)
        s1, s2, k = gram_matrix(f1, r1, f1, r1), gram_matrix(f2, r2, f2, r2), gram_matrix(f1, r1, f2, r2)
        ctx.save_for_backward(f1, f2, s1, s2, k)
        ctx.rows = (r1, r2)
        sq = lambda m: m.double().square().sum(dim=(1, 2))  # noqa: E731 - combine in fp64 (SPEC §2)
        return sq(k), sq(s1), sq(s2)

    @staticmethod
    def backward(ctx, gk, gp, gq):
        f1, f2, s1, s2, k = ctx.saved_tensors
        r1, r2 = ctx.rows
        acc = r1.acc
        col = lambda g: g.to(acc)[:, None, None]  # noqa: E731
        df1 = df2 = None
        if ctx.needs_input_grad[0]:
            df1 = chain_backward(f1, r1, f2, r2, x=4 * col(gp) * s1, y=2 * col(gk) * k.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            df2 = chain_backward(f2, r2, f1, r1, x=4 * col(gq) * s2, y=2 * col(gk) * k)
        return df1, df2, None, None


def gram_stats(f1: torch.Tensor, f2: torch.Tensor, channel_mix: bool = True, eps: float = 1e-6):
    return GramStats.apply(f1, f2, channel_mix, eps)
