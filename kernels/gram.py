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

from .launcher import (
    acc_dtype,
    check_runnable,
    dot_precision,
    feature_strides,
    gemm_config,
    launch,
    load_inv_norm,
    load_mixed_tile,
    tl_dtype,
)
from .cmss_rows import MixedRows, chain_backward


@triton.jit
def gram_partial_kernel(
    fa_ptr, wa_ptr, na_ptr, fb_ptr, wb_ptr, nb_ptr, pairs_ptr, out_ptr,
    a_stride_b, a_stride_c, a_stride_h, a_stride_w, a_width,
    b_stride_b, b_stride_c, b_stride_h, b_stride_w, b_width,
    n_pix, n_chan_a, n_chan_b, eps,
    SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    # The tile pair is the fastest grid axis: the programs of one row split run side by side and read the
    # same row blocks, so L2 serves all but the first read of each (see traffic.py's DRAM model).
    pair = tl.program_id(0)
    ti = tl.load(pairs_ptr + 2 * pair)
    tj = tl.load(pairs_ptr + 2 * pair + 1)
    b = (tl.program_id(1) // SPLITS).to(tl.int64)
    split = tl.program_id(1) % SPLITS
    ci = ti * BLOCK_C + tl.arange(0, BLOCK_C)
    cj = tj * BLOCK_C + tl.arange(0, BLOCK_C)
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


def _splits(batch: int, n_pix: int, block_n: int, n_pairs: int) -> int:
    # About 264 programs (two per SM of a 132-SM H100) over batch and tile pairs, few enough splits that the
    # (B, SPLITS, C_a, C_b) partial sums stay small next to the maps themselves.
    want = max(1, 264 // max(1, batch * n_pairs))
    return max(1, min(triton.cdiv(n_pix, block_n), want, 64))


def gram_matrix(fa, ra: MixedRows, fb, rb: MixedRows, symmetric: bool = False) -> torch.Tensor:
    """(B, C_a, C_b) = ÂₐᵀÂ_b per image, in the accumulation dtype. With `symmetric` (fa is fb), only the
    tile pairs on and above the diagonal are computed and the rest mirrored: 10 of 16 at C = 256."""
    B, Ca, H, W = fa.shape
    Cb = fb.shape[1]
    cfg = gemm_config(H * W, max(Ca, Cb))
    bc = cfg.block_out
    ta, tb = triton.cdiv(Ca, bc), triton.cdiv(Cb, bc)
    pairs = [(i, j) for i in range(ta) for j in range(tb) if not symmetric or i <= j]
    pair_table = torch.tensor(pairs, dtype=torch.int32, device=fa.device)
    splits = _splits(B, H * W, cfg.block_rows, len(pairs))
    part = torch.empty(B, splits, Ca, Cb, device=fa.device, dtype=ra.acc)
    launch(gram_partial_kernel, (len(pairs), B * splits),
           dict(fa_ptr=fa, wa_ptr=ra.w, na_ptr=ra.norm, fb_ptr=fb, wb_ptr=rb.w, nb_ptr=rb.norm, pairs_ptr=pair_table,
                out_ptr=part, **feature_strides(fa, "a_"), **feature_strides(fb, "b_"), n_pix=H * W, n_chan_a=Ca,
                n_chan_b=Cb, eps=ra.eps),
           dict(SPLITS=splits, BLOCK_N=cfg.block_rows, BLOCK_C=bc, ACC=tl_dtype(ra.acc),
                PRECISION=dot_precision(ra.acc)), **cfg.options)
    gram = part.sum(dim=1)
    if symmetric:
        tile = torch.arange(Ca, device=fa.device) // bc
        upper = tile[:, None] <= tile[None, :]
        gram = torch.where(upper, gram, gram.transpose(1, 2))
    return gram


class GramStats(torch.autograd.Function):
    """(f₁, f₂) -> (k, p, q), each (B,) in float64; see the module docstring."""

    @staticmethod
    def forward(ctx, f1, f2, channel_mix: bool, eps: float):
        check_runnable(f1, f2)
        acc = acc_dtype(f1, f2)
        r1, r2 = MixedRows(f1, channel_mix, eps, acc), MixedRows(f2, channel_mix, eps, acc)
        s1, s2, k = gram_matrix(f1, r1, f1, r1, True), gram_matrix(f2, r2, f2, r2, True), gram_matrix(f1, r1, f2, r2)
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
