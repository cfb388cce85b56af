"""CPKD's pixel-relation KL in plain torch, a block of rows at a time: exact, on any device, never N×N.

Same per-row result as `cocofast.kernels.pixel_relation` (see there for the math): for rows Â_T (N×C_T) and
Â_S (N×C_S) of one image, R = ÂÂᵀ/τ, P = row-softmax(R), kl[i] = KL(P_T[i] ‖ P_S[i]). A row's softmax needs
the whole row, but rows are independent, so a block of r rows costs r×N, never N×N: the block size is chosen
so one r×N buffer is about 64 MiB, and about four are alive at once.

This is the CPU path. The Triton kernel streams tiles of a row block instead of whole rows and runs fused on a
GPU; in the CPU interpreter it would take hours at N = 65,536, where this takes minutes on two cores.

Backward (the teacher is a constant): with G[i, j] = g[i] (P_S[i, j] − P_T[i, j]) and R_S symmetric,
dÂ_S = (G + Gᵀ) Â_S / τ. Each row block rebuilds its r×N slices of P_T and P_S from the stored row
log-sum-exps and adds both G[block] Â_S (to its own rows) and G[block]ᵀ Â_S[block] (to every row).
"""
from __future__ import annotations

import torch

# One r×N buffer holds about this many elements (64 MiB in fp32); r is at least 1 and at most N.
_BLOCK_ELEMENTS = 1 << 24


def rows_per_block(n_pix: int, element_bytes: int = 4) -> int:
    return max(1, min(n_pix, _BLOCK_ELEMENTS * 4 // (element_bytes * n_pix)))


def _relations(a: torch.Tensor, start: int, stop: int, inv_tau: float) -> torch.Tensor:
    """R[start:stop, :] of one image's rows a (N, C): (r, N)."""
    return (a[start:stop] @ a.T).mul_(inv_tau)


class ChunkedRelationKL(torch.autograd.Function):
    """(Â_T, Â_S) of shape (B, N, C_·), same dtype -> per-row KL (B, N); gradient to Â_S only."""

    @staticmethod
    def forward(ctx, a_t, a_s, inv_tau: float, block: int):
        B, N, _ = a_s.shape
        kl, lse_t, lse_s = (torch.empty(B, N, device=a_s.device, dtype=a_s.dtype) for _ in range(3))
        for b in range(B):
            for i in range(0, N, block):
                j = min(i + block, N)
                log_p_t = _relations(a_t[b], i, j, inv_tau)
                lse_t[b, i:j] = torch.logsumexp(log_p_t, dim=1)
                log_p_t.sub_(lse_t[b, i:j, None])
                log_p_s = _relations(a_s[b], i, j, inv_tau)
                lse_s[b, i:j] = torch.logsumexp(log_p_s, dim=1)
                log_p_s.sub_(lse_s[b, i:j, None])
                # Σ_j P_T (log P_T − log P_S), built in place in the student's buffer.
                log_ratio = log_p_s.neg_().add_(log_p_t)
                kl[b, i:j] = log_ratio.mul_(log_p_t.exp_()).sum(dim=1)
        ctx.save_for_backward(a_t, a_s, lse_t, lse_s)
        ctx.inv_tau, ctx.block = inv_tau, block
        return kl

    @staticmethod
    def backward(ctx, g):
        a_t, a_s, lse_t, lse_s = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None, None
        inv_tau, block = ctx.inv_tau, ctx.block
        B, N, _ = a_s.shape
        g = g.to(a_s.dtype)
        da = torch.zeros_like(a_s)
        for b in range(B):
            for i in range(0, N, block):
                j = min(i + block, N)
                p_t = _relations(a_t[b], i, j, inv_tau).sub_(lse_t[b, i:j, None]).exp_()
                grad = _relations(a_s[b], i, j, inv_tau).sub_(lse_s[b, i:j, None]).exp_()
                grad.sub_(p_t).mul_(g[b, i:j, None])  # G[block] = g (P_S − P_T)
                del p_t
                da[b, i:j] += grad @ a_s[b]
                da[b] += grad.T @ a_s[b, i:j]
        return None, da.mul_(inv_tau), None, None


def chunked_rows(a_t: torch.Tensor, a_s: torch.Tensor, tau: float, block: int | None = None) -> torch.Tensor:
    """Per-row KL (B, N) from normalised rows (B, N, C_T) and (B, N, C_S) of one dtype; the teacher's rows are
    detached. `block` overrides the rows per block (tests use it to cross many block borders)."""
    if block is None:
        block = rows_per_block(a_s.shape[1], a_s.element_size())
    elif block < 1:
        raise ValueError(f"block must be ≥ 1 rows, got {block}")
    return ChunkedRelationKL.apply(a_t.detach(), a_s, 1.0 / tau, int(block))


__all__ = ["ChunkedRelationKL", "chunked_rows", "rows_per_block"]
