"""Flash-style tiled kernels: walk the N×N similarity matrices in tiles and never store them.

For one image with rows Â₁ (N×C₁), Â₂ (N×C₂) (see cmss_rows.py) and M = ÂÂᵀ, the forward kernel
accumulates over (BLOCK_I × BLOCK_J) tiles, each rebuilt from the feature maps,

    k = Σ M₁⊙M₂,   p = Σ M₁²,   q = Σ M₂²,   d = Σ (M₁ − M₂)²

so d is summed directly instead of through the cancelling identity p + q − 2k. O(N²·C) work, O(tile)
memory. The backward recomputes the tiles as flash attention does: for upstream grads (g_k, g_p, g_q, g_d),

    ∂L/∂M₁ = α M₂ + β₁ M₁  with α = g_k − 2g_d, β₁ = 2g_p + 2g_d   (and β₂ = 2g_q + 2g_d for M₂)
    dÂ₁[i] = 2 Σ_j (α M₂ + β₁ M₁)[i, j] · Â₁[j]                      (∂L/∂M is symmetric)

written to an fp32 (B, N, C) buffer, which `chain_backward_kernel` carries back to dF.
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
    launch,
    load_inv_norm,
    load_mixed_tile,
    tile_walk_config,
    tl_dtype,
)
from .cmss_rows import MixedRows, chain_backward


@triton.jit
def similarity_tile(f_b, w_b, norm_b, stride_c, stride_h, stride_w, width, n_pix, n_chan, ri, rj, eps,
                     BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                     ACC: tl.constexpr, PRECISION: tl.constexpr):
    """M[ri, rj] = Â[ri] · Â[rj]ᵀ, reduced over channel tiles."""
    inv_i = load_inv_norm(norm_b, ri, n_pix, eps)
    inv_j = load_inv_norm(norm_b, rj, n_pix, eps)
    m = tl.zeros((BLOCK_I, BLOCK_J), dtype=ACC)
    for c0 in range(0, n_chan, BLOCK_C):
        chans = c0 + tl.arange(0, BLOCK_C)
        ai = load_mixed_tile(f_b, w_b, stride_c, stride_h, stride_w, width, n_pix, n_chan, ri, chans, ACC)
        aj = load_mixed_tile(f_b, w_b, stride_c, stride_h, stride_w, width, n_pix, n_chan, rj, chans, ACC)
        m += tl.dot(ai * inv_i[:, None], tl.trans(aj * inv_j[:, None]), input_precision=PRECISION,
                    out_dtype=ACC)
    return m


@triton.jit
def tiled_forward_kernel(
    f1_ptr, w1_ptr, n1_ptr, f2_ptr, w2_ptr, n2_ptr, out_ptr,
    a_stride_b, a_stride_c, a_stride_h, a_stride_w, a_width,
    b_stride_b, b_stride_c, b_stride_h, b_stride_w, b_width,
    n_pix, n_chan_1, n_chan_2, eps,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    ri = blk * BLOCK_I + tl.arange(0, BLOCK_I)
    f1_b, w1_b, n1_b = f1_ptr + b * a_stride_b, w1_ptr + b * n_chan_1, n1_ptr + b * n_pix
    f2_b, w2_b, n2_b = f2_ptr + b * b_stride_b, w2_ptr + b * n_chan_2, n2_ptr + b * n_pix
    # Row-vector accumulators: four full-tile ones cost 4·BLOCK_I·BLOCK_J registers and made ptxas spill.
    k = tl.zeros((BLOCK_I,), dtype=ACC)
    p = tl.zeros((BLOCK_I,), dtype=ACC)
    q = tl.zeros((BLOCK_I,), dtype=ACC)
    d = tl.zeros((BLOCK_I,), dtype=ACC)
    for j0 in range(0, n_pix, BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)
        m1 = similarity_tile(f1_b, w1_b, n1_b, a_stride_c, a_stride_h, a_stride_w, a_width, n_pix, n_chan_1,
                              ri, rj, eps, BLOCK_I, BLOCK_J, BLOCK_C, ACC, PRECISION)
        m2 = similarity_tile(f2_b, w2_b, n2_b, b_stride_c, b_stride_h, b_stride_w, b_width, n_pix, n_chan_2,
                              ri, rj, eps, BLOCK_I, BLOCK_J, BLOCK_C, ACC, PRECISION)
        k += tl.sum(m1 * m2, axis=1)
        p += tl.sum(m1 * m1, axis=1)
        q += tl.sum(m2 * m2, axis=1)
        d += tl.sum((m1 - m2) * (m1 - m2), axis=1)
    out = out_ptr + (b * tl.num_programs(1) + blk) * 4
    tl.store(out + 0, tl.sum(k, axis=0))
    tl.store(out + 1, tl.sum(p, axis=0))
    tl.store(out + 2, tl.sum(q, axis=0))
    tl.store(out + 3, tl.sum(d, axis=0))


@triton.jit
def tiled_backward_kernel(
    fs_ptr, ws_ptr, ns_ptr, fo_ptr, wo_ptr, no_ptr, alpha_ptr, beta_ptr, da_ptr,
    s_stride_b, s_stride_c, s_stride_h, s_stride_w, s_width,
    o_stride_b, o_stride_c, o_stride_h, o_stride_w, o_width,
    n_pix, n_chan_s, n_chan_o, eps,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    ri = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    cout = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    fs_b, ws_b, ns_b = fs_ptr + b * s_stride_b, ws_ptr + b * n_chan_s, ns_ptr + b * n_pix
    fo_b, wo_b, no_b = fo_ptr + b * o_stride_b, wo_ptr + b * n_chan_o, no_ptr + b * n_pix
    alpha = tl.load(alpha_ptr + b)
    beta = tl.load(beta_ptr + b)
    acc = tl.zeros((BLOCK_I, BLOCK_D), dtype=ACC)
    for j0 in range(0, n_pix, BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)
        m_self = similarity_tile(fs_b, ws_b, ns_b, s_stride_c, s_stride_h, s_stride_w, s_width, n_pix, n_chan_s,
                                  ri, rj, eps, BLOCK_I, BLOCK_J, BLOCK_C, ACC, PRECISION)
        m_other = similarity_tile(fo_b, wo_b, no_b, o_stride_c, o_stride_h, o_stride_w, o_width, n_pix,
                                   n_chan_o, ri, rj, eps, BLOCK_I, BLOCK_J, BLOCK_C, ACC, PRECISION)
        g = alpha * m_other + beta * m_self
        aj = load_mixed_tile(fs_b, ws_b, s_stride_c, s_stride_h, s_stride_w, s_width, n_pix, n_chan_s, rj, cout,
                             ACC)
        aj = aj * load_inv_norm(ns_b, rj, n_pix, eps)[:, None]
        acc += tl.dot(g, aj, input_precision=PRECISION, out_dtype=ACC)
    mask = (ri[:, None] < n_pix) & (cout[None, :] < n_chan_s)
    tl.store(da_ptr + b * n_pix * n_chan_s + ri[:, None] * n_chan_s + cout[None, :], 2.0 * acc, mask=mask)


# ----------------------------------------------------------------------------------------------- host


class TiledStats(torch.autograd.Function):
    """(f₁, f₂) -> (k, p, q, d), each (B,) in float64; see the module docstring."""

    @staticmethod
    def forward(ctx, f1, f2, channel_mix: bool, eps: float):
        check_runnable(f1, f2)
        acc = acc_dtype(f1, f2)
        r1, r2 = MixedRows(f1, channel_mix, eps, acc), MixedRows(f2, channel_mix, eps, acc)
        B, C1, H, W = f1.shape
        cfg = tile_walk_config(H * W, max(C1, f2.shape[1]))
        n_blocks = triton.cdiv(H * W, cfg.block_rows)
        part = torch.empty(B, n_blocks, 4, device=f1.device, dtype=acc)
        launch(tiled_forward_kernel, (B, n_blocks),
               dict(f1_ptr=f1, w1_ptr=r1.w, n1_ptr=r1.norm, f2_ptr=f2, w2_ptr=r2.w, n2_ptr=r2.norm, out_ptr=part,
                    **feature_strides(f1, "a_"), **feature_strides(f2, "b_"), n_pix=H * W, n_chan_1=C1,
                    n_chan_2=f2.shape[1], eps=eps),
               dict(BLOCK_I=cfg.block_rows, BLOCK_J=cfg.block_rows, BLOCK_C=cfg.block_k, ACC=tl_dtype(acc),
                    PRECISION=dot_precision(acc)), **cfg.options)
        ctx.save_for_backward(f1, f2, *r1.tensors(), *r2.tensors())
        ctx.options = r1.options()
        k, p, q, d = part.double().sum(dim=1).unbind(dim=1)
        return k, p, q, d

    @staticmethod
    def backward(ctx, gk, gp, gq, gd):
        f1, f2, *saved = ctx.saved_tensors
        n = len(MixedRows.SAVED)
        r1, r2 = (MixedRows.from_saved(ctx.options, saved[i:i + n]) for i in (0, n))
        alpha = gk - 2 * gd
        df1 = df2 = None
        if ctx.needs_input_grad[0]:
            df1 = _backward_one(f1, r1, f2, r2, alpha, 2 * gp + 2 * gd)
        if ctx.needs_input_grad[1]:
            df2 = _backward_one(f2, r2, f1, r1, alpha, 2 * gq + 2 * gd)
        return df1, df2, None, None


def _backward_one(fs, rs: MixedRows, fo, ro: MixedRows, alpha, beta) -> torch.Tensor:
    B, Cs, H, W = fs.shape
    acc = rs.acc
    cfg = tile_walk_config(H * W, Cs)
    da = torch.empty(B, H * W, Cs, device=fs.device, dtype=acc)
    launch(tiled_backward_kernel, (triton.cdiv(Cs, cfg.block_out), triton.cdiv(H * W, cfg.block_rows), B),
           dict(fs_ptr=fs, ws_ptr=rs.w, ns_ptr=rs.norm, fo_ptr=fo, wo_ptr=ro.w, no_ptr=ro.norm,
                alpha_ptr=alpha.to(acc).contiguous(), beta_ptr=beta.to(acc).contiguous(), da_ptr=da,
                **feature_strides(fs, "s_"), **feature_strides(fo, "o_"), n_pix=H * W, n_chan_s=Cs, n_chan_o=fo.shape[1],
                eps=rs.eps),
           dict(BLOCK_I=cfg.block_rows, BLOCK_J=cfg.block_rows, BLOCK_C=cfg.block_k, BLOCK_D=cfg.block_out,
                ACC=tl_dtype(acc), PRECISION=dot_precision(acc)), **cfg.options)
    return chain_backward(fs, rs, da_buffer=da)


def tiled_stats(f1: torch.Tensor, f2: torch.Tensor, channel_mix: bool = True, eps: float = 1e-6):
    return TiledStats.apply(f1, f2, channel_mix, eps)
