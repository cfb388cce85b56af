"""Fused Gram-identity kernels: CoCo statistics of two maps without the N×N similarity matrices.

For one image, Â₁ (N×C₁) and Â₂ (N×C₂) are the channel-mixed, L2-normalised rows of two maps with equal
N = H·W (see cmss_rows.py). With S₁ = Â₁ᵀÂ₁, S₂ = Â₂ᵀÂ₂ and K = Â₁ᵀÂ₂ (the uncentred linear-CKA identity,
Kornblith et al. 2019),

    k = ‖K‖²_F = ⟨M₁, M₂⟩_F,   p = ‖S₁‖²_F = ‖M₁‖²_F,   q = ‖S₂‖²_F = ‖M₂‖²_F      (M = ÂÂᵀ, never built)

so φ = k / √(p q) and ‖M₁ − M₂‖²_F = p + q − 2k. All three are blocks of one Gram matrix of the
concatenated rows A = [Â₁ Â₂] (N × (C₁ + C₂)):

    G = AᵀA = [[S₁, K], [Kᵀ, S₂]]       ((C₁ + C₂)² per image, symmetric)

Forward, one launch (`gram_forward_kernel`) after the channel max (cmss_rows.channel_extrema): a program
owns one channel-tile pair (i ≤ j) of G — the upper tiles of S₁ and S₂ and all tiles of K — over one of
SPLITS interleaved row ranges. Per row block it rebuilds the row norms ρ_n = ‖G'_n‖ from all channels of
the rows (the programs of one row block run side by side, so these re-reads come from L2), scales its two
channel tiles by 1/max(ρ, eps) and accumulates their product; it stores the tile and its mirror, so G
comes out whole. Diagonal programs also write what the backward needs: the row norms (tile 0) and, per
channel, the count and first position of the max-pool ties (or, without channel mixing, the channel
extrema for the input check). The splits are summed in a fixed order on the host: bit-identical runs.

Backward, one launch (`gram_backward_kernel`), for upstream grads g_k, g_p, g_q per image:

    dÂ₁ = Â₁·(4 g_p S₁) + Â₂·(2 g_k Kᵀ) = A · diag(c₁) · G[:, block 1]   (one GEMM, inner dim C₁ + C₂)
    dÂ₂ = A · diag(c₂) · G[:, block 2]                                   (c = 4g_p / 4g_q on the own block, 2g_k)

A program owns (map, image, span of rows) and, per row block, keeps the whole dÂ row block in registers
(BLOCK_N × next_pow2(C); above 256 channels two sweeps over 128-wide tiles, see grad_map), then goes through the normalisation and the channel weights (cmss_rows.py's
formulas: t = Â·dÂ, dG' = (dÂ − [ρ > eps] t Â)/max(ρ, eps), dF = dG'·w, dw += Σ_n dG'·F) and writes dF once.
The max-pool share of dw is added at the tie positions afterwards (cmss_rows.add_maxpool_grad).

Traffic per map pair: forward reads each map twice (the channel max, then the Gram pass: the softmax
weights of every row depend on the max over all N, so no one-pass forward computes the same numbers;
without channel mixing the Gram pass is the only one); backward reads each map once and writes its
gradient once; the rest is C×C matrices and N-vectors. Against the minimum (one read forward, one read
and one gradient write backward) that is (2 + 2) / (1 + 2) = 4/3 with mixing, 1 without.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from .cmss_rows import add_maxpool_grad, channel_extrema, mix_weights
from .launcher import (
    acc_dtype,
    check_runnable,
    dot_precision,
    feature_strides,
    gram_backward_config,
    gram_forward_config,
    launch,
    load_mixed_tile,
    next_pow2,
    tl_dtype,
)


@triton.jit
def row_inv_norm(f_b, w_b, stride_c, stride_h, stride_w, width, n_pix, n_chan, rows, eps,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """(ρ, 1/max(ρ, eps)) of the given rows, ρ = ‖G'_n‖ over all channels (0 and 0 outside the map)."""
    s = tl.zeros((BLOCK_N,), dtype=ACC)
    for c0 in range(0, n_chan, BLOCK_K):
        g = load_mixed_tile(f_b, w_b, stride_c, stride_h, stride_w, width, n_pix, n_chan, rows,
                            c0 + tl.arange(0, BLOCK_K), ACC)
        s += tl.sum(g * g, axis=1)
    r = tl.sqrt(s)
    return r, tl.where(rows < n_pix, 1.0 / tl.maximum(r, eps), 0.0)


@triton.jit
def gram_tile_pair(fa_b, wa_b, amax_b, sa_c, sa_h, sa_w, wid_a, n_chan_a, off_a,
                   fb_b, wb_b, sb_c, sb_h, sb_w, wid_b, n_chan_b, off_b,
                   ti, tj, split, n_pix, ct, eps, g_b, norm_b, tie_b, ext_b, stat_stride,
                   SAME: tl.constexpr, MIX: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """G[off_a + tile ti, off_b + tile tj] over this split's rows (and its mirror); SAME: both tiles of one map."""
    ci = ti * BLOCK_C + tl.arange(0, BLOCK_C)
    cj = tj * BLOCK_C + tl.arange(0, BLOCK_C)
    # Scalar conditions as vectors (the interpreter refuses a mask mixing a tensor with a loaded scalar).
    diag = (ci * 0 + ti) == tj  # only read where SAME: a K tile is never on G's diagonal
    wa = tl.load(wa_b + ci, mask=ci < n_chan_a, other=0.0).to(ACC)
    amax = tl.load(amax_b + ci, mask=ci < n_chan_a, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=ACC)
    # Per-channel statistics of diagonal programs: tie count / first tie (mixing) or max / min / NaNs (plain).
    ties = tl.zeros((BLOCK_C,), dtype=tl.int32)
    first = tl.full((BLOCK_C,), 2147483647, dtype=tl.int32)
    hi = tl.full((BLOCK_C,), float("-inf"), dtype=ACC)
    lo = tl.full((BLOCK_C,), float("inf"), dtype=ACC)
    nans = tl.zeros((BLOCK_C,), dtype=ACC)
    for n0 in range(split * BLOCK_N, n_pix, SPLITS * BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        r_a, inv_a = row_inv_norm(fa_b, wa_b, sa_c, sa_h, sa_w, wid_a, n_pix, n_chan_a, rows, eps,
                                  BLOCK_N, BLOCK_K, ACC)
        if SAME:
            inv_b = inv_a
            # Tile 0's diagonal program stores the norms; every row block belongs to exactly one split.
            tl.store(norm_b + rows, r_a, mask=(rows < n_pix) & ((rows * 0 + ti + tj) == 0))
        else:
            r_b, inv_b = row_inv_norm(fb_b, wb_b, sb_c, sb_h, sb_w, wid_b, n_pix, n_chan_b, rows, eps,
                                      BLOCK_N, BLOCK_K, ACC)
        pix = (rows // wid_a) * sa_h + (rows % wid_a) * sa_w
        mask = (rows[:, None] < n_pix) & (ci[None, :] < n_chan_a)
        x = tl.load(fa_b + pix[:, None] + ci[None, :] * sa_c, mask=mask, other=0.0).to(ACC)
        a = x * (wa[None, :] * inv_a[:, None])
        b = load_mixed_tile(fb_b, wb_b, sb_c, sb_h, sb_w, wid_b, n_pix, n_chan_b, rows, cj, ACC)
        acc += tl.dot(tl.trans(a), b * inv_b[:, None], input_precision=PRECISION, out_dtype=ACC)
        if SAME:
            seen = mask & diag[None, :]
            if MIX:  # ties of the channel max, so the backward splits its gradient as torch.amax does
                hit = seen & (x == amax[None, :])
                ties += tl.sum(hit.to(tl.int32), axis=0)
                first = tl.minimum(first, tl.min(tl.where(hit, rows[:, None], 2147483647), axis=0))
            else:  # the input check's extrema ride on the one pass
                hi = tl.maximum(hi, tl.max(tl.where(seen, x, float("-inf")), axis=0))
                lo = tl.minimum(lo, tl.min(tl.where(seen, x, float("inf")), axis=0))
                nans += tl.sum((seen & (x != x)).to(ACC), axis=0)
    ga = off_a + ci
    gb = off_b + cj
    out = (ci[:, None] < n_chan_a) & (cj[None, :] < n_chan_b)
    tl.store(g_b + ga[:, None] * ct + gb[None, :], acc, mask=out)
    not_diag = diag == 0
    if SAME:  # the mirror tile (a diagonal tile is its own)
        tl.store(g_b + gb[None, :] * ct + ga[:, None], acc, mask=out & (not_diag[:, None] | not_diag[None, :]))
    else:
        tl.store(g_b + gb[None, :] * ct + ga[:, None], acc, mask=out)
    if SAME:
        keep = (ci < n_chan_a) & diag
        if MIX:
            tl.store(tie_b + ci, ties, mask=keep)
            tl.store(tie_b + stat_stride + ci, first, mask=keep)
        else:
            tl.store(ext_b + ci, hi, mask=keep)
            tl.store(ext_b + stat_stride + ci, lo, mask=keep)
            tl.store(ext_b + 2 * stat_stride + ci, nans, mask=keep)


@triton.jit
def gram_forward_kernel(
    f1_ptr, w1_ptr, amax1_ptr, norm1_ptr, tie1_ptr, ext1_ptr,
    f2_ptr, w2_ptr, amax2_ptr, norm2_ptr, tie2_ptr, ext2_ptr, pairs_ptr, g_ptr,
    a_stride_b, a_stride_c, a_stride_h, a_stride_w, a_width,
    b_stride_b, b_stride_c, b_stride_h, b_stride_w, b_width,
    n_pix, n_chan_1, n_chan_2, n_tiles_1, eps,
    SPLITS: tl.constexpr, MIX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    # The tile pair is the fastest grid axis: the programs of one row split run side by side and read the
    # same row blocks, so L2 serves all but the first read of each (see traffic.py's DRAM model).
    pair = tl.program_id(0)
    ti = tl.load(pairs_ptr + 2 * pair)  # concatenated tile indices over [Â₁ Â₂], ti ≤ tj
    tj = tl.load(pairs_ptr + 2 * pair + 1)
    b = (tl.program_id(1) // SPLITS).to(tl.int64)
    split = tl.program_id(1) % SPLITS
    ct = n_chan_1 + n_chan_2
    g_b = g_ptr + (b * SPLITS + split) * ct * ct
    f1_b, w1_b, a1_b = f1_ptr + b * a_stride_b, w1_ptr + b * n_chan_1, amax1_ptr + b * n_chan_1
    f2_b, w2_b, a2_b = f2_ptr + b * b_stride_b, w2_ptr + b * n_chan_2, amax2_ptr + b * n_chan_2
    s1 = (b * SPLITS + split) * 3 * n_chan_1  # per-(image, split) statistics rows of each map
    s2 = (b * SPLITS + split) * 3 * n_chan_2
    if tj < n_tiles_1:  # a tile of S₁
        gram_tile_pair(f1_b, w1_b, a1_b, a_stride_c, a_stride_h, a_stride_w, a_width, n_chan_1, 0,
                       f1_b, w1_b, a_stride_c, a_stride_h, a_stride_w, a_width, n_chan_1, 0,
                       ti, tj, split, n_pix, ct, eps, g_b, norm1_ptr + b * n_pix, tie1_ptr + s1, ext1_ptr + s1,
                       n_chan_1, True, MIX, SPLITS, BLOCK_N, BLOCK_K, BLOCK_C, ACC, PRECISION)
    elif ti < n_tiles_1:  # a tile of K
        gram_tile_pair(f1_b, w1_b, a1_b, a_stride_c, a_stride_h, a_stride_w, a_width, n_chan_1, 0,
                       f2_b, w2_b, b_stride_c, b_stride_h, b_stride_w, b_width, n_chan_2, n_chan_1,
                       ti, tj - n_tiles_1, split, n_pix, ct, eps, g_b, norm1_ptr, tie1_ptr, ext1_ptr,
                       n_chan_1, False, MIX, SPLITS, BLOCK_N, BLOCK_K, BLOCK_C, ACC, PRECISION)
    else:  # a tile of S₂
        gram_tile_pair(f2_b, w2_b, a2_b, b_stride_c, b_stride_h, b_stride_w, b_width, n_chan_2, n_chan_1,
                       f2_b, w2_b, b_stride_c, b_stride_h, b_stride_w, b_width, n_chan_2, n_chan_1,
                       ti - n_tiles_1, tj - n_tiles_1, split, n_pix, ct, eps, g_b, norm2_ptr + b * n_pix,
                       tie2_ptr + s2, ext2_ptr + s2, n_chan_2, True, MIX, SPLITS, BLOCK_N, BLOCK_K, BLOCK_C,
                       ACC, PRECISION)


@triton.jit
def grad_rows_tile(fs_b, ws_b, ss_c, ss_h, ss_w, wid_s, n_chan_s, off_s, coef_s,
                   fo_b, wo_b, so_c, so_h, so_w, wid_o, n_chan_o, off_o, coef_o,
                   g_b, ct, rows, cs, inv_s, inv_o, n_pix,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CP: tl.constexpr,
                   ACC: tl.constexpr, PRECISION: tl.constexpr):
    """dÂ[rows, cs] = Â_s · c_s G[s, s] + Â_o · c_o G[o, s], the C×C operand streamed from L2 a K-tile at a time."""
    acc = tl.zeros((BLOCK_N, CP), dtype=ACC)
    for k0 in range(0, n_chan_s, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = load_mixed_tile(fs_b, ws_b, ss_c, ss_h, ss_w, wid_s, n_pix, n_chan_s, rows, kk, ACC)
        m = tl.load(g_b + (off_s + kk)[:, None] * ct + (off_s + cs)[None, :],
                    mask=(kk[:, None] < n_chan_s) & (cs[None, :] < n_chan_s), other=0.0)
        acc += tl.dot(a * (inv_s * coef_s)[:, None], m, input_precision=PRECISION, out_dtype=ACC)
    for k0 in range(0, n_chan_o, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = load_mixed_tile(fo_b, wo_b, so_c, so_h, so_w, wid_o, n_pix, n_chan_o, rows, kk, ACC)
        m = tl.load(g_b + (off_o + kk)[:, None] * ct + (off_s + cs)[None, :],
                    mask=(kk[:, None] < n_chan_o) & (cs[None, :] < n_chan_s), other=0.0)
        acc += tl.dot(a * (inv_o * coef_o)[:, None], m, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def grad_tile_with_map(fs_b, ws_b, ss_c, ss_h, ss_w, wid_s, n_chan_s, off_s, coef_s,
                       fo_b, wo_b, so_c, so_h, so_w, wid_o, n_chan_o, off_o, coef_o,
                       g_b, ct, rows, pix, keep, cs, inv_s, inv_o, n_pix,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CP: tl.constexpr,
                       ACC: tl.constexpr, PRECISION: tl.constexpr):
    """dÂ's tile at rows × cs, with the map's values and channel weights there: what both sweeps need."""
    acc = grad_rows_tile(fs_b, ws_b, ss_c, ss_h, ss_w, wid_s, n_chan_s, off_s, coef_s,
                         fo_b, wo_b, so_c, so_h, so_w, wid_o, n_chan_o, off_o, coef_o,
                         g_b, ct, rows, cs, inv_s, inv_o, n_pix, BLOCK_N, BLOCK_K, CP, ACC, PRECISION)
    mask = keep[:, None] & (cs[None, :] < n_chan_s)
    x = tl.load(fs_b + pix[:, None] + cs[None, :] * ss_c, mask=mask, other=0.0).to(ACC)
    w = tl.load(ws_b + cs, mask=cs < n_chan_s, other=0.0).to(ACC)
    return acc, x, w, mask


@triton.jit
def grad_map(fs_b, ws_b, ns_b, ss_c, ss_h, ss_w, wid_s, n_chan_s, off_s, coef_s,
             fo_b, wo_b, no_b, so_c, so_h, so_w, wid_o, n_chan_o, off_o, coef_o,
             df_b, d_c, d_h, d_w, dw_b, g_b, ct, start, stop, n_pix, eps,
             MIX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CP: tl.constexpr,
             TWO_PASS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """dF of map s over rows [start, stop), and (with mixing) this span's Σ_n dG'·F into dw_b.

    CP ≥ C_s: the whole dÂ row block stays in registers, one GEMM. TWO_PASS (C_s > CP, e.g. 512 channels,
    whose whole row block would spill): t = Σ_c Â·dÂ needs every channel before any dF, so a first sweep
    over CP-wide output tiles sums t and a second recomputes each dÂ tile for dF (twice the GEMM work,
    the same memory traffic); dw then accumulates in its (zeroed) partial row."""
    dw = tl.zeros((CP,), dtype=ACC)
    for n0 in range(start, stop, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        keep = rows < n_pix
        r_s = tl.load(ns_b + rows, mask=keep, other=0.0)
        inv_s = tl.where(keep, 1.0 / tl.maximum(r_s, eps), 0.0)
        inv_o = tl.where(keep, 1.0 / tl.maximum(tl.load(no_b + rows, mask=keep, other=1.0), eps), 0.0)
        pix = (rows // wid_s) * ss_h + (rows % wid_s) * ss_w
        d_pix = (rows // wid_s) * d_h + (rows % wid_s) * d_w
        t = tl.zeros((BLOCK_N,), dtype=ACC)
        if TWO_PASS:
            for c0 in range(0, n_chan_s, CP):
                acc, x, w, mask = grad_tile_with_map(
                    fs_b, ws_b, ss_c, ss_h, ss_w, wid_s, n_chan_s, off_s, coef_s,
                    fo_b, wo_b, so_c, so_h, so_w, wid_o, n_chan_o, off_o, coef_o,
                    g_b, ct, rows, pix, keep, c0 + tl.arange(0, CP), inv_s, inv_o, n_pix,
                    BLOCK_N, BLOCK_K, CP, ACC, PRECISION)
                t += tl.sum(acc * (x * w[None, :] * inv_s[:, None]), axis=1)
        for c0 in range(0, n_chan_s, CP):
            cs = c0 + tl.arange(0, CP)
            acc, x, w, mask = grad_tile_with_map(
                fs_b, ws_b, ss_c, ss_h, ss_w, wid_s, n_chan_s, off_s, coef_s,
                fo_b, wo_b, so_c, so_h, so_w, wid_o, n_chan_o, off_o, coef_o,
                g_b, ct, rows, pix, keep, cs, inv_s, inv_o, n_pix, BLOCK_N, BLOCK_K, CP, ACC, PRECISION)
            # Through the normalisation and the channel weights, the row block's tile in registers.
            ahat = x * w[None, :] * inv_s[:, None]
            if not TWO_PASS:
                t = tl.sum(acc * ahat, axis=1)
            dg = (acc - tl.where(r_s > eps, t, 0.0)[:, None] * ahat) * inv_s[:, None]
            tl.store(df_b + d_pix[:, None] + cs[None, :] * d_c, (dg * w[None, :]).to(df_b.dtype.element_ty),
                     mask=mask)
            if MIX:
                if TWO_PASS:
                    old = tl.load(dw_b + cs, mask=cs < n_chan_s, other=0.0)
                    tl.store(dw_b + cs, old + tl.sum(dg * x, axis=0), mask=cs < n_chan_s)
                else:
                    dw += tl.sum(dg * x, axis=0)
    if MIX:
        if not TWO_PASS:
            cs = tl.arange(0, CP)
            tl.store(dw_b + cs, dw, mask=cs < n_chan_s)


@triton.jit
def gram_backward_kernel(
    f1_ptr, w1_ptr, norm1_ptr, df1_ptr, dw1_ptr, f2_ptr, w2_ptr, norm2_ptr, df2_ptr, dw2_ptr, g_ptr, coef_ptr,
    a_stride_b, a_stride_c, a_stride_h, a_stride_w, a_width,
    b_stride_b, b_stride_c, b_stride_h, b_stride_w, b_width,
    da_stride_b, da_stride_c, da_stride_h, da_stride_w,
    db_stride_b, db_stride_c, db_stride_h, db_stride_w,
    g_stride_b, n_pix, n_chan_1, n_chan_2, span, first_map, eps,
    MIX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CP1: tl.constexpr, CP2: tl.constexpr,
    TWO_PASS_1: tl.constexpr, TWO_PASS_2: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    # The map is the fastest grid axis: the two programs of one row span read the same rows of both maps
    # (each is the other's GEMM operand), so L2 serves the second read.
    which = first_map + tl.program_id(0)
    s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    start = s * span
    stop = tl.minimum(start + span, n_pix)
    ct = n_chan_1 + n_chan_2
    g_b = g_ptr + b * g_stride_b
    c_self1 = tl.load(coef_ptr + b * 3)  # 4 g_p, 4 g_q, 2 g_k of this image
    c_self2 = tl.load(coef_ptr + b * 3 + 1)
    c_k = tl.load(coef_ptr + b * 3 + 2)
    f1_b, w1_b, n1_b = f1_ptr + b * a_stride_b, w1_ptr + b * n_chan_1, norm1_ptr + b * n_pix
    f2_b, w2_b, n2_b = f2_ptr + b * b_stride_b, w2_ptr + b * n_chan_2, norm2_ptr + b * n_pix
    n_spans = tl.num_programs(1)
    if which == 0:
        grad_map(f1_b, w1_b, n1_b, a_stride_c, a_stride_h, a_stride_w, a_width, n_chan_1, 0, c_self1,
                 f2_b, w2_b, n2_b, b_stride_c, b_stride_h, b_stride_w, b_width, n_chan_2, n_chan_1, c_k,
                 df1_ptr + b * da_stride_b, da_stride_c, da_stride_h, da_stride_w,
                 dw1_ptr + (b * n_spans + s) * n_chan_1, g_b, ct, start, stop, n_pix, eps,
                 MIX, BLOCK_N, BLOCK_K, CP1, TWO_PASS_1, ACC, PRECISION)
    else:
        grad_map(f2_b, w2_b, n2_b, b_stride_c, b_stride_h, b_stride_w, b_width, n_chan_2, n_chan_1, c_self2,
                 f1_b, w1_b, n1_b, a_stride_c, a_stride_h, a_stride_w, a_width, n_chan_1, 0, c_k,
                 df2_ptr + b * db_stride_b, db_stride_c, db_stride_h, db_stride_w,
                 dw2_ptr + (b * n_spans + s) * n_chan_2, g_b, ct, start, stop, n_pix, eps,
                 MIX, BLOCK_N, BLOCK_K, CP2, TWO_PASS_2, ACC, PRECISION)


# ----------------------------------------------------------------------------------------------- host


def gram_splits(batch: int, n_pix: int, block_n: int, n_pairs: int, map_bytes: int, ct: int) -> int:
    """Row splits of the forward: about 264 programs (two per SM of a 132-SM H100) over batch and tile pairs,
    but never so many that the (B, SPLITS, C₁+C₂, C₁+C₂) partial Grams pass 1/32 of the maps' bytes."""
    want = max(1, 264 // max(1, batch * n_pairs))
    cap = max(1, map_bytes // (32 * ct * ct * 4))
    return max(1, min(triton.cdiv(n_pix, block_n), want, cap, 64))


class MapStats:
    """What the backward needs of one map: weights, max-pool, row norms, and the max-pool ties."""

    def __init__(self, f: torch.Tensor, channel_mix: bool, acc: torch.dtype, check: Callable | None):
        B, C = f.shape[:2]
        self.channel_mix, self.channels = channel_mix, C
        if channel_mix:
            amax, amin, nans = channel_extrema(f, acc)
            if check is not None:
                check(f, amin, amax, nans)
            self.amax, self.w = amax, mix_weights(amax)
        else:
            self.amax = torch.zeros(B, C, device=f.device, dtype=acc)
            self.w = torch.ones(B, C, device=f.device, dtype=acc)
        self.norm = torch.empty(B, f.shape[2] * f.shape[3], device=f.device, dtype=acc)
        self.ties = self.first = None

    SAVED = ("amax", "w", "norm", "ties", "first")

    def tensors(self) -> tuple:
        """The tensors, for ctx.save_for_backward (so saved-tensor hooks and version checks see them)."""
        return tuple(getattr(self, name) for name in self.SAVED)

    @classmethod
    def from_saved(cls, channel_mix: bool, channels: int, tensors) -> "MapStats":
        stats = cls.__new__(cls)
        stats.channel_mix, stats.channels = channel_mix, channels
        for name, t in zip(cls.SAVED, tensors, strict=True):
            setattr(stats, name, t)
        return stats


def forward_plan(f1: torch.Tensor, f2: torch.Tensor):
    """(tile config, channel-tile pairs, row splits) of the forward launch for these maps."""
    B, C1, H, W = f1.shape
    C2, n_pix = f2.shape[1], H * W
    cfg = gram_forward_config(n_pix, max(C1, C2))
    t = triton.cdiv(C1, cfg.block_out) + triton.cdiv(C2, cfg.block_out)
    pairs = [(i, j) for i in range(t) for j in range(i, t)]
    ct = C1 + C2
    return cfg, pairs, gram_splits(B, n_pix, cfg.block_rows, len(pairs), n_pix * ct * f1.element_size(), ct)


def backward_plan(f1: torch.Tensor, f2: torch.Tensor):
    """(tile config, output tile width per map) of the backward launch; a map wider than its tile runs the
    two sweeps over half-width output tiles (gram_backward_config)."""
    C1, C2, n_pix = f1.shape[1], f2.shape[1], f1.shape[2] * f1.shape[3]
    cfg = gram_backward_config(n_pix, max(C1, C2))
    return cfg, [max(16, next_pow2(C)) if C <= cfg.block_out else cfg.block_out // 2 for C in (C1, C2)]


def launch_class(f1: torch.Tensor, f2: torch.Tensor) -> tuple:
    """What selects a different compiled kernel for these maps (besides dtypes and channel mixing): the
    forward's and the backward's tiles and launch options, the row splits, and which maps run two sweeps."""
    fwd, _, splits = forward_plan(f1, f2)
    bwd, cp = backward_plan(f1, f2)
    two_pass = tuple(C > c for C, c in zip((f1.shape[1], f2.shape[1]), cp))
    return ("forward", fwd, "splits", splits, "backward", bwd, "tiles", tuple(cp), "two_pass", two_pass)


def gram_forward(f1, f2, channel_mix: bool, eps: float, check: Callable | None = None):
    """(G, r1, r2): the concatenated Gram (B, C₁+C₂, C₁+C₂) in the accumulation dtype and each map's stats."""
    acc = acc_dtype(f1, f2)
    r1, r2 = MapStats(f1, channel_mix, acc, check), MapStats(f2, channel_mix, acc, check)
    B, C1, H, W = f1.shape
    C2, n_pix = f2.shape[1], H * W
    cfg, pairs, splits = forward_plan(f1, f2)
    bc = cfg.block_out
    t1 = triton.cdiv(C1, bc)
    ct = C1 + C2
    part = torch.empty(B, splits, ct, ct, device=f1.device, dtype=acc)
    stat1 = torch.empty(B, splits, 3, C1, device=f1.device, dtype=torch.int32 if channel_mix else acc)
    stat2 = torch.empty(B, splits, 3, C2, device=f1.device, dtype=torch.int32 if channel_mix else acc)
    # Ties (int) with mixing, extrema (float) without: the unused pointer gets the other buffer.
    tie1, ext1 = (stat1, r1.w) if channel_mix else (r1.norm, stat1)
    tie2, ext2 = (stat2, r2.w) if channel_mix else (r2.norm, stat2)
    launch(gram_forward_kernel, (len(pairs), B * splits),
           dict(f1_ptr=f1, w1_ptr=r1.w, amax1_ptr=r1.amax, norm1_ptr=r1.norm, tie1_ptr=tie1, ext1_ptr=ext1,
                f2_ptr=f2, w2_ptr=r2.w, amax2_ptr=r2.amax, norm2_ptr=r2.norm, tie2_ptr=tie2, ext2_ptr=ext2,
                pairs_ptr=torch.tensor(pairs, dtype=torch.int32, device=f1.device), g_ptr=part,
                **feature_strides(f1, "a_"), **feature_strides(f2, "b_"), n_pix=n_pix, n_chan_1=C1,
                n_chan_2=C2, n_tiles_1=t1, eps=eps),
           dict(SPLITS=splits, MIX=channel_mix, BLOCK_N=cfg.block_rows, BLOCK_K=cfg.block_k, BLOCK_C=bc,
                ACC=tl_dtype(acc), PRECISION=dot_precision(acc)), **cfg.options)
    for f, r, stat in ((f1, r1, stat1), (f2, r2, stat2)):
        if channel_mix:
            r.ties, r.first = stat[:, :, 0].sum(dim=1), stat[:, :, 1].amin(dim=1)
        elif check is not None:
            check(f, stat[:, :, 1].amin(dim=1), stat[:, :, 0].amax(dim=1), stat[:, :, 2].sum(dim=1))
    return reduce_splits(part), r1, r2


def reduce_splits(part: torch.Tensor) -> torch.Tensor:
    """(B, SPLITS, C, C) partial Grams -> (B, C, C), summed in a fixed order (bit-identical runs). Its own
    function so a test can break it and see the GPU-configuration test fail."""
    return part[:, 0] if part.shape[1] == 1 else part.sum(dim=1)


def gram_backward(f1, f2, gram, r1: MapStats, r2: MapStats, coef: torch.Tensor, eps: float, maps=(0, 1)):
    """(dF₁, dF₂) (None where not in `maps`) for coef = (B, 3) rows (4 g_p, 4 g_q, 2 g_k)."""
    B, C1, H, W = f1.shape
    C2, n_pix = f2.shape[1], H * W
    acc = r1.norm.dtype
    cfg, cp = backward_plan(f1, f2)
    span = cfg.span
    n_spans = triton.cdiv(n_pix, span)
    # A map without a gradient gets no program; its pointer is a stand-in of the same dtype.
    grads = [torch.empty_like(f) if i in maps else f.new_empty(1, 1, 1, 1) for i, f in enumerate((f1, f2))]
    # A two-pass map adds each row block's dw into its partial row, which starts at zero.
    dws = [(torch.zeros if C > c else torch.empty)(B, n_spans, C, device=f1.device, dtype=acc)
           for C, c in zip((C1, C2), cp)]
    df_args = {**feature_strides(grads[0], "da_", width=False), **feature_strides(grads[1], "db_", width=False)}
    launch(gram_backward_kernel, (len(maps), n_spans, B),
           dict(f1_ptr=f1, w1_ptr=r1.w, norm1_ptr=r1.norm, df1_ptr=grads[0], dw1_ptr=dws[0],
                f2_ptr=f2, w2_ptr=r2.w, norm2_ptr=r2.norm, df2_ptr=grads[1], dw2_ptr=dws[1],
                g_ptr=gram, coef_ptr=coef.to(acc).contiguous(), **feature_strides(f1, "a_"),
                **feature_strides(f2, "b_"), **df_args, g_stride_b=gram.stride(0), n_pix=n_pix, n_chan_1=C1,
                n_chan_2=C2, span=span, first_map=maps[0], eps=eps),
           dict(MIX=r1.channel_mix, BLOCK_N=cfg.block_rows, BLOCK_K=cfg.block_k, CP1=cp[0], CP2=cp[1],
                TWO_PASS_1=C1 > cp[0], TWO_PASS_2=C2 > cp[1], ACC=tl_dtype(acc), PRECISION=dot_precision(acc)),
           **cfg.options)
    out = []
    for i, (f, r) in enumerate(((f1, r1), (f2, r2))):
        if i not in maps:
            out.append(None)
            continue
        if r.channel_mix:
            add_maxpool_grad(f, grads[i], r.amax, r.w, dws[i].sum(dim=1), r.ties, r.first)
        out.append(grads[i])
    return out


class GramStats(torch.autograd.Function):
    """(f₁, f₂) -> (k, p, q), each (B,) in float64; see the module docstring."""

    @staticmethod
    def forward(ctx, f1, f2, channel_mix: bool, eps: float, check):
        check_runnable(f1, f2)
        gram, r1, r2 = gram_forward(f1, f2, channel_mix, eps, check)
        ctx.save_for_backward(f1, f2, gram, *r1.tensors(), *r2.tensors())
        ctx.channel_mix, ctx.eps = channel_mix, eps
        C1 = f1.shape[1]
        # Sums of squares of the fp32 Gram blocks, combined in fp64 (p + q − 2k cancels when small).
        sq = lambda m: torch.linalg.vector_norm(m, dim=(1, 2), dtype=torch.float64).square()  # noqa: E731
        return sq(gram[:, :C1, C1:]), sq(gram[:, :C1, :C1]), sq(gram[:, C1:, C1:])

    @staticmethod
    def backward(ctx, gk, gp, gq):
        f1, f2, gram, *saved = ctx.saved_tensors
        n = len(MapStats.SAVED)
        r1 = MapStats.from_saved(ctx.channel_mix, f1.shape[1], saved[:n])
        r2 = MapStats.from_saved(ctx.channel_mix, f2.shape[1], saved[n:])
        maps = tuple(i for i in (0, 1) if ctx.needs_input_grad[i])
        if not maps:
            return None, None, None, None, None
        coef = torch.stack([4 * gp, 4 * gq, 2 * gk], dim=1)
        df1, df2 = gram_backward(f1, f2, gram, r1, r2, coef, ctx.eps, maps)
        return df1, df2, None, None, None


def gram_stats(f1: torch.Tensor, f2: torch.Tensor, channel_mix: bool = True, eps: float = 1e-6,
               check: Callable | None = None):
    """(k, p, q) per image in float64. `check(f, amin, amax, nans)` (per-channel (B, C) tensors) is called
    with each map's extrema as the kernels find them, so a caller can refuse bad input without a pass of
    its own."""
    return GramStats.apply(f1, f2, channel_mix, eps, check)


__all__ = ["GramStats", "MapStats", "backward_plan", "forward_plan", "gram_backward", "gram_forward", "gram_splits",
           "gram_stats", "launch_class", "reduce_splits"]
