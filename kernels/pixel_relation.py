"""Flash-style kernels for the CPKD pixel-wise relation loss: a KL between two N×N row-softmaxes, never stored.

For one image, with rows Â_T (N×C_T) and Â_S (N×C_S) built as in cmss_rows.py (equal N, any channels):

    R_T = Â_T Â_Tᵀ / τ,  R_S = Â_S Â_Sᵀ / τ                      (N×N, symmetric)
    lse_X[i] = log Σ_j exp(R_X[i, j]),   P_X = exp(R_X − lse_X)   (row softmax)
    kl[i] = Σ_j P_T[i,j] (log P_T[i,j] − log P_S[i,j]) = Σ_j P_T[i,j] (R_T − R_S)[i,j] − lse_T[i] + lse_S[i]

Forward, one program per (image, block of rows i), one sweep over column blocks j. Two online softmaxes run
side by side (running max m and scaled sum l for each network), and the KL's data term rides on the
teacher's: acc = Σ_j exp(R_T − m_T)(R_T − R_S) is rescaled by exp(m_T,old − m_T,new) exactly like l_T, so
Σ_j P_T (R_T − R_S) = acc / l_T at the end. The row's KL is then assembled as

    kl = acc / l_T − (m_T − m_S) − log(l_T / l_S)

which keeps the two ~log N terms from cancelling in floating point (KL is small, lse is not). Stored per
row: kl, lse_T, lse_S (3 vectors of N); nothing N×N. Work: 2·N²·(C_T + C_S) flops.

Backward (the teacher is a constant). For upstream per-row grads g[i]:

    G[i, j] = ∂L/∂R_S[i, j] = g[i] · (P_S[i, j] − P_T[i, j])
    dÂ_S    = (G + Gᵀ) Â_S / τ

Design for the Gᵀ term: R_T and R_S are symmetric, so the recomputed tile R[J, I] is also R[I, J]ᵀ, and
Gᵀ[J, I] = g[I] · (exp(R_S[J, I] − lse_S[I]) − exp(R_T[J, I] − lse_T[I])) needs only the stored LSEs of the
*streamed* rows I. So one program per (image, block of output rows J, block of output channels) streams over
I, rebuilds the two relation tiles once and forms (G + Gᵀ)[J, I] from them with the two LSE/g vectors:
no second column pass, no atomics, bit-reproducible. Work: 2·N²·(C_T + C_S) + 2·N²·C_S flops per channel
block. dÂ_S goes to an fp32 (B, N, C_S) buffer, and `chain_backward` (cmss_rows.py) carries it through the
row normalisation and the optional channel mixing to dF_S.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launcher import (
    INTERPRETED,
    acc_dtype,
    dot_precision,
    feature_strides,
    gpu_config,
    launch,
    load_inv_norm,
    load_mixed_tile,
    next_pow2,
    tile_walk_config,
    tl_dtype,
)
from .cmss_rows import MixedRows, chain_backward
from .tiled import similarity_tile


@triton.jit
def _relation_tile(f_b, w_b, norm_b, stride_c, stride_h, stride_w, width, n_pix, n_chan, ri, rj, eps, inv_tau,
                   BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                   ACC: tl.constexpr, PRECISION: tl.constexpr):
    """R[ri, rj] = Â[ri] · Â[rj]ᵀ / τ (out-of-range rows give 0): the CoCo similarity tile, scaled."""
    m = similarity_tile(f_b, w_b, norm_b, stride_c, stride_h, stride_w, width, n_pix, n_chan, ri, rj, eps,
                        BLOCK_I, BLOCK_J, BLOCK_C, ACC, PRECISION)
    return m * inv_tau


@triton.jit
def pixel_relation_forward_kernel(
    ft_ptr, wt_ptr, nt_ptr, fs_ptr, ws_ptr, ns_ptr, kl_ptr, lse_t_ptr, lse_s_ptr,
    t_stride_b, t_stride_c, t_stride_h, t_stride_w, t_width,
    s_stride_b, s_stride_c, s_stride_h, s_stride_w, s_width,
    n_pix, n_chan_t, n_chan_s, eps, inv_tau,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ri = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    ft_b, wt_b, nt_b = ft_ptr + b * t_stride_b, wt_ptr + b * n_chan_t, nt_ptr + b * n_pix
    fs_b, ws_b, ns_b = fs_ptr + b * s_stride_b, ws_ptr + b * n_chan_s, ns_ptr + b * n_pix
    m_t = tl.full((BLOCK_I,), float("-inf"), dtype=ACC)
    m_s = tl.full((BLOCK_I,), float("-inf"), dtype=ACC)
    l_t = tl.zeros((BLOCK_I,), dtype=ACC)
    l_s = tl.zeros((BLOCK_I,), dtype=ACC)
    acc = tl.zeros((BLOCK_I,), dtype=ACC)
    for j0 in range(0, n_pix, BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)
        valid = (rj < n_pix)[None, :]
        r_t = _relation_tile(ft_b, wt_b, nt_b, t_stride_c, t_stride_h, t_stride_w, t_width, n_pix, n_chan_t,
                             ri, rj, eps, inv_tau, BLOCK_I, BLOCK_J, BLOCK_C, ACC, PRECISION)
        r_s = _relation_tile(fs_b, ws_b, ns_b, s_stride_c, s_stride_h, s_stride_w, s_width, n_pix, n_chan_s,
                             ri, rj, eps, inv_tau, BLOCK_I, BLOCK_J, BLOCK_C, ACC, PRECISION)
        diff = tl.where(valid, r_t - r_s, 0.0)
        # Every column block holds at least one real column, so the new maxima are finite.
        new_m_t = tl.maximum(m_t, tl.max(tl.where(valid, r_t, float("-inf")), axis=1))
        new_m_s = tl.maximum(m_s, tl.max(tl.where(valid, r_s, float("-inf")), axis=1))
        p_t = tl.where(valid, tl.exp(r_t - new_m_t[:, None]), 0.0)
        p_s = tl.where(valid, tl.exp(r_s - new_m_s[:, None]), 0.0)
        scale_t = tl.exp(m_t - new_m_t)
        l_t = l_t * scale_t + tl.sum(p_t, axis=1)
        acc = acc * scale_t + tl.sum(p_t * diff, axis=1)
        l_s = l_s * tl.exp(m_s - new_m_s) + tl.sum(p_s, axis=1)
        m_t, m_s = new_m_t, new_m_s
    kl = acc / l_t - (m_t - m_s) - tl.log(l_t / l_s)
    rows = b * n_pix + ri
    keep = ri < n_pix
    tl.store(kl_ptr + rows, kl, mask=keep)
    tl.store(lse_t_ptr + rows, m_t + tl.log(l_t), mask=keep)
    tl.store(lse_s_ptr + rows, m_s + tl.log(l_s), mask=keep)


@triton.jit
def pixel_relation_backward_kernel(
    ft_ptr, wt_ptr, nt_ptr, fs_ptr, ws_ptr, ns_ptr, lse_t_ptr, lse_s_ptr, g_ptr, da_ptr,
    t_stride_b, t_stride_c, t_stride_h, t_stride_w, t_width,
    s_stride_b, s_stride_c, s_stride_h, s_stride_w, s_width,
    n_pix, n_chan_t, n_chan_s, eps, inv_tau,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    ri = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # output rows (J in the header)
    cout = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    ft_b, wt_b, nt_b = ft_ptr + b * t_stride_b, wt_ptr + b * n_chan_t, nt_ptr + b * n_pix
    fs_b, ws_b, ns_b = fs_ptr + b * s_stride_b, ws_ptr + b * n_chan_s, ns_ptr + b * n_pix
    keep_i = ri < n_pix
    lse_t_i = tl.load(lse_t_ptr + b * n_pix + ri, mask=keep_i, other=0.0)
    lse_s_i = tl.load(lse_s_ptr + b * n_pix + ri, mask=keep_i, other=0.0)
    g_i = tl.load(g_ptr + b * n_pix + ri, mask=keep_i, other=0.0)
    acc = tl.zeros((BLOCK_I, BLOCK_D), dtype=ACC)
    for j0 in range(0, n_pix, BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)  # streamed rows (I in the header)
        keep_j = rj < n_pix
        lse_t_j = tl.load(lse_t_ptr + b * n_pix + rj, mask=keep_j, other=0.0)
        lse_s_j = tl.load(lse_s_ptr + b * n_pix + rj, mask=keep_j, other=0.0)
        g_j = tl.load(g_ptr + b * n_pix + rj, mask=keep_j, other=0.0)
        r_t = _relation_tile(ft_b, wt_b, nt_b, t_stride_c, t_stride_h, t_stride_w, t_width, n_pix, n_chan_t,
                             ri, rj, eps, inv_tau, BLOCK_I, BLOCK_J, BLOCK_C, ACC, PRECISION)
        r_s = _relation_tile(fs_b, ws_b, ns_b, s_stride_c, s_stride_h, s_stride_w, s_width, n_pix, n_chan_s,
                             ri, rj, eps, inv_tau, BLOCK_I, BLOCK_J, BLOCK_C, ACC, PRECISION)
        # G[ri, rj] from the output rows' LSEs, Gᵀ[ri, rj] = G[rj, ri] from the streamed rows' (R symmetric).
        g_row = g_i[:, None] * (tl.exp(r_s - lse_s_i[:, None]) - tl.exp(r_t - lse_t_i[:, None]))
        g_col = g_j[None, :] * (tl.exp(r_s - lse_s_j[None, :]) - tl.exp(r_t - lse_t_j[None, :]))
        h = tl.where(keep_i[:, None] & keep_j[None, :], g_row + g_col, 0.0)
        aj = load_mixed_tile(fs_b, ws_b, s_stride_c, s_stride_h, s_stride_w, s_width, n_pix, n_chan_s, rj, cout,
                             ACC)
        aj = aj * load_inv_norm(ns_b, rj, n_pix, eps)[:, None]
        acc += tl.dot(h, aj, input_precision=PRECISION, out_dtype=ACC)
    mask = keep_i[:, None] & (cout[None, :] < n_chan_s)
    tl.store(da_ptr + b * n_pix * n_chan_s + ri[:, None] * n_chan_s + cout[None, :], acc * inv_tau, mask=mask)


# ----------------------------------------------------------------------------------------------- host


def pixel_tiles(n_pix: int) -> int:
    """Square pixel tile: 64 on a GPU (two relation tiles and a dot operand stay in registers), up to 256 in
    the interpreter, where fewer, bigger tiles mean fewer Python-level loop trips."""
    cap = 64 if gpu_config() else 256
    return max(16, min(cap, next_pow2(n_pix)))


def _check_runnable(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    if dev.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"the pixel-relation Triton kernels need CUDA tensors; these are on {dev}. Use backend='naive' on CPU "
            "(small N), or set TRITON_INTERPRET=1 before importing cocofast to run the kernels in Triton's CPU "
            "interpreter.")


class PixelRelationKL(torch.autograd.Function):
    """(f_T, f_S) -> per-row KL(P_T[i] ‖ P_S[i]), shape (B, N); gradient to f_S only (f_T is a constant)."""

    @staticmethod
    def forward(ctx, ft, fs, tau: float, channel_mix: bool, eps: float, block: int | None):
        _check_runnable(ft, fs)
        acc = acc_dtype(ft, fs)
        rt, rs = MixedRows(ft, channel_mix, eps, acc), MixedRows(fs, channel_mix, eps, acc)
        B, Ct, H, W = ft.shape
        n_pix, Cs = H * W, fs.shape[1]
        cfg = tile_walk_config(n_pix, max(Ct, Cs))
        tile = block or pixel_tiles(n_pix)
        kl, lse_t, lse_s = (torch.empty(B, n_pix, device=fs.device, dtype=acc) for _ in range(3))
        launch(pixel_relation_forward_kernel, (B, triton.cdiv(n_pix, tile)),
               dict(ft_ptr=ft, wt_ptr=rt.w, nt_ptr=rt.norm, fs_ptr=fs, ws_ptr=rs.w, ns_ptr=rs.norm, kl_ptr=kl,
                    lse_t_ptr=lse_t, lse_s_ptr=lse_s, **feature_strides(ft, "t_"), **feature_strides(fs, "s_"),
                    n_pix=n_pix, n_chan_t=Ct, n_chan_s=Cs, eps=eps, inv_tau=1.0 / tau),
               dict(BLOCK_I=tile, BLOCK_J=tile, BLOCK_C=cfg.block_k, ACC=tl_dtype(acc),
                    PRECISION=dot_precision(acc)), **cfg.options)
        ctx.save_for_backward(ft, fs, lse_t, lse_s, *rt.tensors(), *rs.tensors())
        ctx.options, ctx.tau, ctx.tile = rt.options(), tau, tile
        return kl

    @staticmethod
    def backward(ctx, g):
        ft, fs, lse_t, lse_s, *saved = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None, None
        n = len(MixedRows.SAVED)
        rt, rs = (MixedRows.from_saved(ctx.options, saved[i:i + n]) for i in (0, n))
        acc = rs.acc
        B, Ct, H, W = ft.shape
        n_pix, Cs = H * W, fs.shape[1]
        cfg = tile_walk_config(n_pix, Cs)
        # 32 streamed rows a step on a GPU: with 64, the bf16 build spilled 164 B on sm_80 (255 registers).
        bj = min(ctx.tile, 32) if gpu_config() else ctx.tile
        da = torch.empty(B, n_pix, Cs, device=fs.device, dtype=acc)
        launch(pixel_relation_backward_kernel, (triton.cdiv(Cs, cfg.block_out), triton.cdiv(n_pix, ctx.tile), B),
               dict(ft_ptr=ft, wt_ptr=rt.w, nt_ptr=rt.norm, fs_ptr=fs, ws_ptr=rs.w, ns_ptr=rs.norm,
                    lse_t_ptr=lse_t, lse_s_ptr=lse_s, g_ptr=g.to(acc).contiguous(), da_ptr=da,
                    **feature_strides(ft, "t_"), **feature_strides(fs, "s_"), n_pix=n_pix, n_chan_t=Ct,
                    n_chan_s=Cs, eps=rs.eps, inv_tau=1.0 / ctx.tau),
               dict(BLOCK_I=ctx.tile, BLOCK_J=bj, BLOCK_C=cfg.block_k, BLOCK_D=cfg.block_out,
                    ACC=tl_dtype(acc), PRECISION=dot_precision(acc)), **cfg.options)
        return None, chain_backward(fs, rs, da_buffer=da), None, None, None, None


def pixel_relation_rows(f_teacher: torch.Tensor, f_student: torch.Tensor, tau: float = 1.0,
                        channel_mix: bool = False, eps: float = 1e-6, block: int | None = None) -> torch.Tensor:
    """Per-row KL, (B, N) in fp32 (fp64 for fp64 input). `block` overrides the pixel tile (a power of two
    ≥ 16), which lets tests cross many tile borders with small maps. The teacher is detached."""
    if block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"block must be a power of two ≥ 16, got {block}")
    return PixelRelationKL.apply(f_teacher.detach(), f_student, float(tau), bool(channel_mix), float(eps), block)


__all__ = ["PixelRelationKL", "pixel_relation_rows", "pixel_tiles"]
