"""Per-pixel pieces of the channel-mixed rows Â, forward and backward, for one (B, C, H, W) map.

Forward (the channel-mixed rows of CoCo DistillNet's CMSS, with L2-normalised rows as the README says;
tests/reference.py `rows` is the float64 reference), with N = H·W:
    a[b, c]   = max_n F[b, c, n]                     -> `channel_extrema_kernel` (with min and NaN count,
                                                        the input check's figures, in the same read)
    w[b]      = softmax(a[b])                        (channel weights; all ones without channel mixing)
    G'[b,n,c] = F[b, c, n] · w[b, c]
    r[b, n]   = ‖G'[b, n, :]‖₂                       -> `row_norm_kernel` (also counts ties of the max)
    Â[b,n,c]  = G'[b, n, c] / max(r[b, n], eps)       (never stored: every kernel rebuilds tiles of it)

Backward, given dÂ (from C×C matrices in registers, or from an fp32 (B, N, C) buffer):
    t_n   = Â_n · dÂ_n
    dG'_n = (dÂ_n − [r_n > eps]·t_n·Â_n) / max(r_n, eps)
    dF    = dG' · w   (+ the max-pool term below),    dw_c = Σ_n dG'_nc · F_cn
    da    = w ⊙ (dw − ⟨w, dw⟩);   dF[c, n] += da_c · [F_cn = a_c] / #ties_c   (as torch.amax splits it)
The tiled and pixel-relation paths write dÂ to a buffer: `chain_backward_kernel` does the next three lines
in one pass per row block, `maxpool_scatter_kernel` the last. The fused Gram path (gram.py) does the three
lines in registers and adds the last with `maxpool_add_kernel`, which reads F only for channels whose max
is tied (the single position of an untied max is known from the forward).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launcher import (
    acc_dtype,
    channel_block,
    feature_strides,
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


@triton.jit
def channel_extrema_kernel(
    f_ptr, out_ptr, stride_b, stride_c, stride_h, stride_w, width, n_pix, n_chan, span,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Per (image, span of rows, channel): max, min and NaN count into out[b, span, 0:3, c]."""
    chans = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hi = tl.full((BLOCK_C,), float("-inf"), dtype=ACC)
    lo = tl.full((BLOCK_C,), float("inf"), dtype=ACC)
    nans = tl.zeros((BLOCK_C,), dtype=ACC)
    for n0 in range(s * span, tl.minimum(s * span + span, n_pix), BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        pix = (rows // width) * stride_h + (rows % width) * stride_w
        mask = (rows[:, None] < n_pix) & (chans[None, :] < n_chan)
        x = tl.load(f_ptr + b * stride_b + pix[:, None] + chans[None, :] * stride_c, mask=mask, other=0.0).to(ACC)
        hi = tl.maximum(hi, tl.max(tl.where(mask, x, float("-inf")), axis=0))
        lo = tl.minimum(lo, tl.min(tl.where(mask, x, float("inf")), axis=0))
        nans += tl.sum((mask & (x != x)).to(ACC), axis=0)
    out = out_ptr + (b * tl.num_programs(1) + s) * 3 * n_chan + chans
    keep = chans < n_chan
    tl.store(out, hi, mask=keep)
    tl.store(out + n_chan, lo, mask=keep)
    tl.store(out + 2 * n_chan, nans, mask=keep)


@triton.jit
def maxpool_add_kernel(
    f_ptr, amax_ptr, scale_ptr, ties_ptr, first_ptr, df_ptr,
    stride_b, stride_c, stride_h, stride_w, df_stride_b, df_stride_c, df_stride_h, df_stride_w,
    width, n_pix, n_chan,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """dF[c, n] += scale_c where F_cn is channel c's max: at the known first position when it is the only one,
    else wherever F_cn = a_c (F is read for those channels only)."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pix = (rows // width) * stride_h + (rows % width) * stride_w
    df_pix = (rows // width) * df_stride_h + (rows % width) * df_stride_w
    for c0 in range(0, n_chan, BLOCK_C):
        chans = c0 + tl.arange(0, BLOCK_C)
        keep = chans < n_chan
        ties = tl.load(ties_ptr + b * n_chan + chans, mask=keep, other=0)
        first = tl.load(first_ptr + b * n_chan + chans, mask=keep, other=-1)
        mask = (rows[:, None] < n_pix) & keep[None, :]
        multi = mask & (ties > 1)[None, :]
        x = tl.load(f_ptr + b * stride_b + pix[:, None] + chans[None, :] * stride_c, mask=multi, other=0.0)
        a = tl.load(amax_ptr + b * n_chan + chans, mask=keep, other=0.0)
        s = tl.load(scale_ptr + b * n_chan + chans, mask=keep, other=0.0)
        single = mask & (ties == 1)[None, :] & (rows[:, None] == first[None, :])
        hit = single | (multi & (x.to(ACC) == a.to(ACC)[None, :]))
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

    SAVED = ("amax", "w", "norm", "ties")

    def tensors(self) -> tuple:
        """The tensors, for ctx.save_for_backward (so saved-tensor hooks and version checks see them)."""
        return tuple(getattr(self, name) for name in self.SAVED)

    def options(self) -> tuple:
        return self.channel_mix, self.eps, self.acc

    @classmethod
    def from_saved(cls, options: tuple, tensors) -> "MixedRows":
        rows = cls.__new__(cls)
        rows.channel_mix, rows.eps, rows.acc = options
        for name, t in zip(cls.SAVED, tensors, strict=True):
            setattr(rows, name, t)
        return rows


def chain_backward(f, rows: MixedRows, da_buffer: torch.Tensor) -> torch.Tensor:
    """dF for one map from the (B, N, C) buffer `da_buffer` = dÂ."""
    B, C, H, W = f.shape
    acc = rows.acc
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


def channel_extrema(f: torch.Tensor, acc: torch.dtype):
    """(amax, amin, NaN count), each (B, C) in `acc`: one read of the map."""
    B, C, H, W = f.shape
    n_pix = H * W
    bn, bc = row_block(n_pix), channel_block(C)
    # Spans of 16 row blocks: enough programs to fill a GPU, and partials 3/(16·BLOCK_N) of the map.
    span = bn * 16
    n_spans = triton.cdiv(n_pix, span)
    part = torch.empty(B, n_spans, 3, C, device=f.device, dtype=acc)
    launch(channel_extrema_kernel, (triton.cdiv(C, bc), n_spans, B),
           dict(f_ptr=f, out_ptr=part, **feature_strides(f), n_pix=n_pix, n_chan=C, span=span),
           dict(BLOCK_N=bn, BLOCK_C=bc, ACC=tl_dtype(acc)))
    if n_spans == 1:
        return part[:, 0, 0].contiguous(), part[:, 0, 1], part[:, 0, 2]
    return part[:, :, 0].amax(dim=1), part[:, :, 1].amin(dim=1), part[:, :, 2].sum(dim=1)


def mix_weights(amax: torch.Tensor) -> torch.Tensor:
    """Channel weights w = softmax over channels of the max-pool (B, C)."""
    return torch.softmax(amax, dim=1).contiguous()


def add_maxpool_grad(f, df, amax, w, dw, ties, first) -> None:
    """dF += the max-pool share of the channel-weight gradient dw (B, C), split equally among the ties."""
    B, C, H, W = f.shape
    da = w * (dw - (w * dw).sum(dim=1, keepdim=True))
    scale = (da / ties.to(da.dtype)).contiguous()
    bn = row_block(H * W)
    launch(maxpool_add_kernel, (B, triton.cdiv(H * W, bn)),
           dict(f_ptr=f, amax_ptr=amax.contiguous(), scale_ptr=scale, ties_ptr=ties.to(torch.int32).contiguous(),
                first_ptr=first.to(torch.int32).contiguous(), df_ptr=df, **feature_strides(f),
                **feature_strides(df, "df_", width=False), n_pix=H * W, n_chan=C),
           dict(BLOCK_N=bn, BLOCK_C=channel_block(C), ACC=tl_dtype(amax.dtype)))


__all__ = ["MixedRows", "acc_dtype", "add_maxpool_grad", "chain_backward", "channel_extrema", "mix_weights"]
