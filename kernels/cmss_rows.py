"""Per-pixel pieces of the channel-mixed rows Â, forward and backward, for one (B, C, H, W) map.

Forward (SPEC §2, steps 1-3), with N = H·W:
    a[b, c]   = max_n F[b, c, n]                     (torch.amax: any layout, deterministic)
    w[b]      = softmax(a[b])                        (channel weights; all ones without channel mixing)
    G'[b,n,c] = F[b, c, n] · w[b, c]
    r[b, n]   = ‖G'[b, n, :]‖₂                       -> `row_norm_kernel` (also counts ties of the max)
    Â[b,n,c]  = G'[b, n, c] / max(r[b, n], eps)       (never stored: every kernel rebuilds tiles of it)

Backward, given dÂ (from C×C matrices in registers, or from an fp32 (B, N, C) buffer):
    t_n   = Â_n · dÂ_n
    dG'_n = (dÂ_n − [r_n > eps]·t_n·Â_n) / max(r_n, eps)
    dF    = dG' · w   (+ the max-pool term below),    dw_c = Σ_n dG'_nc · F_cn
    da    = w ⊙ (dw − ⟨w, dw⟩);   dF[c, n] += da_c · [F_cn = a_c] / #ties_c   (as torch.amax splits it)
`grad_rows_kernel` assembles dÂ from the C×C matrices as one GEMM into an fp32 (B, N, C) buffer;
`chain_backward_kernel` does the next three lines in one pass per row block; `maxpool_scatter_kernel` the last.
(One kernel for both, recomputing dÂ twice per row block, held 255 registers and spilled ~7 KB a thread.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launcher import (
    acc_dtype,
    channel_block,
    dot_precision,
    feature_strides,
    gemm_config,
    launch,
    load_inv_norm,
    load_mixed_tile,
    row_block,
    tl_dtype,
)


@triton.jit
def row_norm_kernel(
    f_ptr, w_ptr, amax_ptr, norm_ptr, ties_ptr,
    stride_b, stride_c, stride_h, stride_w, width, n_pix, n_chan,
    COUNT_TIES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    f_b = f_ptr + b * stride_b
    sumsq = tl.zeros((BLOCK_N,), dtype=ACC)
    for c0 in range(0, n_chan, BLOCK_C):
        chans = c0 + tl.arange(0, BLOCK_C)
        pix = (rows // width) * stride_h + (rows % width) * stride_w
        mask = (rows[:, None] < n_pix) & (chans[None, :] < n_chan)
        x = tl.load(f_b + pix[:, None] + chans[None, :] * stride_c, mask=mask, other=0.0).to(ACC)
        w = tl.load(w_ptr + b * n_chan + chans, mask=chans < n_chan, other=0.0).to(ACC)
        g = x * w[None, :]
        sumsq += tl.sum(g * g, axis=1)
        if COUNT_TIES:  # from the same tile: one read of F gives the norms and the max-pool ties
            a = tl.load(amax_ptr + b * n_chan + chans, mask=chans < n_chan, other=0.0).to(ACC)
            hit = (x == a[None, :]) & mask
            ties = tl.sum(hit.to(tl.int32), axis=0)
            tl.store(ties_ptr + (b * tl.num_programs(1) + blk) * n_chan + chans, ties, mask=chans < n_chan)
    tl.store(norm_ptr + b * n_pix + rows, tl.sqrt(sumsq), mask=rows < n_pix)


@triton.jit
def grad_rows_kernel(
    f_ptr, w_ptr, norm_ptr, o_ptr, w_o_ptr, norm_o_ptr, x_ptr, y_ptr, da_ptr,
    stride_b, stride_c, stride_h, stride_w, width,
    o_stride_b, o_stride_c, o_stride_h, o_stride_w, o_width,
    n_pix, n_chan, n_chan_o, eps,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    """dÂ[rows, cj] = Â[rows]·X[:, cj] + B̂[rows]·Y[:, cj]: one GEMM with K = C + C_other, into the buffer.

    The output channel tile is the fastest grid axis, so the programs that read one row block run together
    and share it through L2."""
    cj = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(2).to(tl.int64)
    f_b, w_b = f_ptr + b * stride_b, w_ptr + b * n_chan
    o_b, w_o = o_ptr + b * o_stride_b, w_o_ptr + b * n_chan_o
    inv = load_inv_norm(norm_ptr + b * n_pix, rows, n_pix, eps)
    inv_o = load_inv_norm(norm_o_ptr + b * n_pix, rows, n_pix, eps)
    x_b, y_b = x_ptr + b * n_chan * n_chan, y_ptr + b * n_chan_o * n_chan
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    for k0 in range(0, n_chan, BLOCK_C):
        ck = k0 + tl.arange(0, BLOCK_C)
        a = load_mixed_tile(f_b, w_b, stride_c, stride_h, stride_w, width, n_pix, n_chan, rows, ck, ACC)
        xm = (ck[:, None] < n_chan) & (cj[None, :] < n_chan)
        x = tl.load(x_b + ck[:, None] * n_chan + cj[None, :], mask=xm, other=0.0)
        acc += tl.dot(a * inv[:, None], x, input_precision=PRECISION, out_dtype=ACC)
    for k0 in range(0, n_chan_o, BLOCK_C):
        ck = k0 + tl.arange(0, BLOCK_C)
        o = load_mixed_tile(o_b, w_o, o_stride_c, o_stride_h, o_stride_w, o_width, n_pix, n_chan_o, rows, ck, ACC)
        ym = (ck[:, None] < n_chan_o) & (cj[None, :] < n_chan)
        y = tl.load(y_b + ck[:, None] * n_chan + cj[None, :], mask=ym, other=0.0)
        acc += tl.dot(o * inv_o[:, None], y, input_precision=PRECISION, out_dtype=ACC)
    mask = (rows[:, None] < n_pix) & (cj[None, :] < n_chan)
    tl.store(da_ptr + b * n_pix * n_chan + rows[:, None] * n_chan + cj[None, :], acc, mask=mask)


@triton.jit
def chain_backward_kernel(
    f_ptr, w_ptr, norm_ptr, da_ptr, df_ptr, dw_ptr,
    stride_b, stride_c, stride_h, stride_w,
    df_stride_b, df_stride_c, df_stride_h, df_stride_w,
    width, n_pix, n_chan, eps,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Per-row normalisation backward from the dÂ buffer: elementwise, row norms read (never recomputed)."""
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    f_b = f_ptr + b * stride_b
    w_b = w_ptr + b * n_chan
    r = tl.load(norm_ptr + b * n_pix + rows, mask=rows < n_pix, other=0.0)
    inv = load_inv_norm(norm_ptr + b * n_pix, rows, n_pix, eps)
    da_b = da_ptr + b * n_pix * n_chan

    # Pass 1: t_n = Â_n · dÂ_n needs whole rows, so it is finished before any dF is written.
    t = tl.zeros((BLOCK_N,), dtype=ACC)
    for j0 in range(0, n_chan, BLOCK_C):
        cj = j0 + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < n_pix) & (cj[None, :] < n_chan)
        d = tl.load(da_b + rows[:, None] * n_chan + cj[None, :], mask=mask, other=0.0)
        a = load_mixed_tile(f_b, w_b, stride_c, stride_h, stride_w, width, n_pix, n_chan, rows, cj, ACC)
        t += tl.sum(d * a, axis=1) * inv
    t = tl.where(r > eps, t, 0.0)

    # Pass 2: dF, and this block's share of dw.
    pix = (rows // width) * stride_h + (rows % width) * stride_w
    df_pix = (rows // width) * df_stride_h + (rows % width) * df_stride_w
    for j0 in range(0, n_chan, BLOCK_C):
        cj = j0 + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < n_pix) & (cj[None, :] < n_chan)
        d = tl.load(da_b + rows[:, None] * n_chan + cj[None, :], mask=mask, other=0.0)
        x = tl.load(f_b + pix[:, None] + cj[None, :] * stride_c, mask=mask, other=0.0).to(ACC)
        w = tl.load(w_b + cj, mask=cj < n_chan, other=0.0).to(ACC)
        a = x * w[None, :] * inv[:, None]
        dg = (d - t[:, None] * a) * inv[:, None]
        df = dg * w[None, :]
        tl.store(df_ptr + b * df_stride_b + df_pix[:, None] + cj[None, :] * df_stride_c,
                 df.to(df_ptr.dtype.element_ty), mask=mask)
        dw = tl.sum(dg * x, axis=0)
        tl.store(dw_ptr + (b * tl.num_programs(1) + blk) * n_chan + cj, dw, mask=cj < n_chan)


@triton.jit
def maxpool_scatter_kernel(
    f_ptr, amax_ptr, scale_ptr, df_ptr,
    stride_b, stride_c, stride_h, stride_w, df_stride_b, df_stride_c, df_stride_h, df_stride_w,
    width, n_pix, n_chan,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pix = (rows // width) * stride_h + (rows % width) * stride_w
    df_pix = (rows // width) * df_stride_h + (rows % width) * df_stride_w
    for c0 in range(0, n_chan, BLOCK_C):
        chans = c0 + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < n_pix) & (chans[None, :] < n_chan)
        x = tl.load(f_ptr + b * stride_b + pix[:, None] + chans[None, :] * stride_c, mask=mask, other=0.0)
        a = tl.load(amax_ptr + b * n_chan + chans, mask=chans < n_chan, other=0.0)
        s = tl.load(scale_ptr + b * n_chan + chans, mask=chans < n_chan, other=0.0)
        hit = (x.to(ACC) == a.to(ACC)[None, :]) & mask
        ptrs = df_ptr + b * df_stride_b + df_pix[:, None] + chans[None, :] * df_stride_c
        old = tl.load(ptrs, mask=hit, other=0.0).to(ACC)
        tl.store(ptrs, (old + s[None, :]).to(df_ptr.dtype.element_ty), mask=hit)


# ----------------------------------------------------------------------------------------------- host


class MixedRows:
    """What the kernels need to rebuild Â of one map: weights, row norms, and the max for the backward."""

    def __init__(self, f: torch.Tensor, channel_mix: bool, eps: float, acc: torch.dtype):
        self.channel_mix, self.eps, self.acc = channel_mix, eps, acc
        B, C, H, W = f.shape
        if channel_mix:
            self.amax = torch.amax(f, dim=(2, 3)).to(acc)
            self.w = torch.softmax(self.amax, dim=1).contiguous()
        else:
            self.amax = None
            self.w = torch.ones(B, C, device=f.device, dtype=acc)
        bn, bc = row_block(H * W), channel_block(C)
        n_blocks = triton.cdiv(H * W, bn)
        self.norm = torch.empty(B, H * W, device=f.device, dtype=acc)
        ties = torch.empty(B, n_blocks, C, device=f.device, dtype=torch.int32) if channel_mix else self.norm
        launch(row_norm_kernel, (B, n_blocks),
               dict(f_ptr=f, w_ptr=self.w, amax_ptr=self.amax if channel_mix else self.w, norm_ptr=self.norm,
                    ties_ptr=ties, **feature_strides(f), n_pix=H * W, n_chan=C),
               dict(COUNT_TIES=channel_mix, BLOCK_N=bn, BLOCK_C=bc, ACC=tl_dtype(acc)))
        self.ties = ties.sum(dim=1) if channel_mix else None


def grad_rows(f, rows: MixedRows, other, other_rows: MixedRows, x, y) -> torch.Tensor:
    """(B, N, C) buffer dÂ = Â·X + B̂·Y (x: (B, C, C), y: (B, C_other, C)), in the accumulation dtype."""
    B, C, H, W = f.shape
    acc = rows.acc
    cfg = gemm_config(H * W, max(C, other.shape[1]))
    da = torch.empty(B, H * W, C, device=f.device, dtype=acc)
    launch(grad_rows_kernel, (triton.cdiv(C, cfg.block_out), triton.cdiv(H * W, cfg.block_rows), B),
           dict(f_ptr=f, w_ptr=rows.w, norm_ptr=rows.norm, o_ptr=other, w_o_ptr=other_rows.w,
                norm_o_ptr=other_rows.norm, x_ptr=x.to(acc).contiguous(), y_ptr=y.to(acc).contiguous(), da_ptr=da,
                **feature_strides(f), **feature_strides(other, "o_"), n_pix=H * W, n_chan=C,
                n_chan_o=other.shape[1], eps=rows.eps),
           dict(BLOCK_N=cfg.block_rows, BLOCK_C=cfg.block_k, BLOCK_D=cfg.block_out, ACC=tl_dtype(acc),
                PRECISION=dot_precision(acc)), **cfg.options)
    return da


def chain_backward(f, rows: MixedRows, other=None, other_rows: MixedRows | None = None,
                   x=None, y=None, da_buffer=None) -> torch.Tensor:
    """dF for one map, from dÂ = Â·X + B̂·Y (x, y: (B, C, C) and (B, C_other, C)) or from `da_buffer`."""
    B, C, H, W = f.shape
    acc = rows.acc
    if da_buffer is None:
        da_buffer = grad_rows(f, rows, other, other_rows, x, y)
    bn, bc = row_block(H * W), channel_block(C)
    n_blocks = triton.cdiv(H * W, bn)
    df = torch.empty_like(f)
    dw_part = torch.empty(B, n_blocks, C, device=f.device, dtype=acc)
    launch(chain_backward_kernel, (B, n_blocks),
           dict(f_ptr=f, w_ptr=rows.w, norm_ptr=rows.norm, da_ptr=da_buffer, df_ptr=df, dw_ptr=dw_part,
                **feature_strides(f), **feature_strides(df, "df_", width=False), n_pix=H * W, n_chan=C, eps=rows.eps),
           dict(BLOCK_N=bn, BLOCK_C=bc, ACC=tl_dtype(acc)))
    if rows.channel_mix:
        dw = dw_part.sum(dim=1)
        da = rows.w * (dw - (rows.w * dw).sum(dim=1, keepdim=True))
        scale = (da / rows.ties.to(acc)).contiguous()
        launch(maxpool_scatter_kernel, (B, n_blocks),
               dict(f_ptr=f, amax_ptr=rows.amax, scale_ptr=scale, df_ptr=df, **feature_strides(f),
                    **feature_strides(df, "df_", width=False), n_pix=H * W, n_chan=C),
               dict(BLOCK_N=bn, BLOCK_C=channel_block(C), ACC=tl_dtype(acc)))
    return df


__all__ = ["MixedRows", "acc_dtype", "chain_backward", "grad_rows"]
