"""The Gram identity in plain torch: CoCo statistics on any device with memory bounded by one image.

Same contract as `cocofast.kernels.GramStats`: (f₁, f₂) -> (k, p, q) per image in float64, with
k = ‖Â₁ᵀÂ₂‖², p = ‖Â₁ᵀÂ₁‖², q = ‖Â₂ᵀÂ₂‖² (⟨ÂÂᵀ, Â'Â'ᵀ⟩ = ‖ÂᵀÂ'‖²: the uncentred linear-CKA identity of
Kornblith et al. 2019, which removes CoCo DistillNet's N×N matrices). In channel-major layout, per image:
X (C, N) the map, w = softmax(max-pool X) the channel weights, ρ = max(‖diag(w) X[:, n]‖, eps) the pixel
norms, Y = X diag(1/ρ), and Âᵀ = diag(w) Y. Then

    S₁ = W₁ (Y₁Y₁ᵀ) W₁,  S₂ = W₂ (Y₂Y₂ᵀ) W₂,  K = W₁ (Y₁Y₂ᵀ) W₂      (W = diag(w): C×C work, free)

so the forward is three GEMMs on Y and four streaming passes per map (max, square, norm, scale). Only the
inputs, w, ρ and the C×C matrices are kept; the backward rebuilds Y (one pass) rather than holding it, so
no input-sized buffer outlives the call. The backward, written out so each N×C pass does as much as it can:

    E₁ = W₁ dÂ₁ᵀ = [4g_p W₁S₁W₁ | 2g_k W₁KW₂] [Y₁; Y₂]     (one GEMM, inner dimension C₁ + C₂)
    t  = [ρ > eps] · Σ_c Y ∘ E          (the radial part removed by the normalisation)
    E ← E − w² ∘ Y ∘ t;  u = Σ_n Y ∘ E  (u = w ∘ ∂L/∂w);  dF = E / ρ
    ∂L/∂(max-pool) = u − w Σ_c u, shared equally by the pixels that attain each channel's max.

Work goes image by image and, on CPU, in blocks of pixels, so every temporary is a block's size and stays in
cache across the passes over it (bench/bench_gram_cpu.py: per-image GEMMs also beat batched bmm on CPU).
The only input-sized allocations are the gradients themselves.
"""
from __future__ import annotations

import torch


def _weights(x: torch.Tensor, channel_mix: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(w, max-pool) of one image (C, N); without channel mixing w = 1 and there is no max-pool."""
    if not channel_mix:
        return torch.ones(x.shape[0], dtype=x.dtype, device=x.device), None
    amax = x.amax(dim=1)
    return torch.softmax(amax, dim=0), amax


def _scaled_rows(x: torch.Tensor, w2: torch.Tensor, eps: float, out: torch.Tensor, rho: torch.Tensor) -> None:
    """ρ = max(‖diag(w) x[:, n]‖, eps) per pixel into `rho`, with w2 = w²; writes Y = x / ρ into `out`.

    The norm as a GEMV of x² with w² (`out` holds x² meanwhile): measured 2-3× faster on CPU than
    torch.linalg.vector_norm over dim 0 of a channel-major map. Y as x times the n reciprocals: on a
    cache-resident (24, 5,376) block a multiply pass took 16 µs, a divide 24 µs (1 thread).
    """
    torch.mul(x, x, out=out)
    torch.mv(out.t(), w2, out=rho).sqrt_().clamp_min_(eps)
    torch.mul(x, rho.reciprocal(), out=out)


def _image(f: torch.Tensor, b: int, acc: torch.dtype) -> torch.Tensor:
    """Image b of a (B, C, H, W) map as (C, N) in `acc`: a view when the layout allows, else one copy."""
    return f[b].reshape(f.shape[1], -1).to(acc)


# Bytes of one (C₁ + C₂) × block buffer; the passes over a block touch about four of them.
_BLOCK_BYTES = 1 << 20


def pixel_block(n_pix: int, channels: int, device: torch.device) -> int:
    """Pixels per block. On CPU a block's buffers then stay in cache across the passes over them, and every
    temporary is small whatever N; at least 1,024 pixels so the GEMMs stay efficient. On a GPU each block
    would be another round of launches, so the whole image is one block."""
    if device.type != "cpu":
        return n_pix
    return max(1024, min(n_pix, (_BLOCK_BYTES // (4 * channels)) // 256 * 256))


def traffic(batch: int, n_pix: int, c1: int, c2: int, element_bytes: int = 4) -> list[tuple[str, float, float]]:
    """(step, bytes, GEMM FLOPs) of one forward + backward with channel mixing, summed over the batch: every
    pass of the code below, as if each streamed its operands from memory once (a GPU's HBM; on CPU the pixel
    blocks keep them in cache). Accumulation is fp32; C×C and per-pixel vectors are left out."""
    maps = []
    for c in (c1, c2):
        m = batch * n_pix * c * 4            # one map in fp32
        raw = batch * n_pix * c * element_bytes
        cast = 2 * m if element_bytes != 4 else 0  # fp16/bf16 maps are widened once per pass over the image
        maps.append((m, raw, cast))
    m1, m2 = maps[0][0], maps[1][0]
    flops = lambda a, b: 2 * batch * n_pix * a * b  # noqa: E731
    steps = [("input checks (aminmax)", maps[0][1] + maps[1][1], 0.0)]
    for i, (m, _, cast) in enumerate(maps, 1):
        steps += [(f"map {i} forward: widen to fp32", cast, 0.0), (f"map {i} forward: channel max", m, 0.0),
                  (f"map {i} forward: square", 2 * m, 0.0), (f"map {i} forward: norm GEMV", m, 0.0),
                  (f"map {i} forward: scale to Y", 2 * m, 0.0)]
    steps += [("forward GEMM Y₁Y₁ᵀ", m1, flops(c1, c1)), ("forward GEMM Y₂Y₂ᵀ", m2, flops(c2, c2)),
              ("forward GEMM Y₁Y₂ᵀ", m1 + m2, flops(c1, c2))]
    for i, ((m, _, cast), c) in enumerate(zip(maps, (c1, c2)), 1):
        out_bytes = batch * n_pix * c * element_bytes
        steps += [(f"map {i} backward: widen to fp32", cast, 0.0), (f"map {i} backward: rebuild Y", 2 * m, 0.0),
                  (f"map {i} backward: GEMM [coef] [Y₁; Y₂]", m1 + m2 + m, flops(c, c1 + c2)),
                  (f"map {i} backward: Y∘E", 3 * m, 0.0), (f"map {i} backward: two GEMV sums", 2 * m, 0.0),
                  (f"map {i} backward: Y∘t", 2 * m, 0.0), (f"map {i} backward: E − w²Z", 3 * m, 0.0),
                  (f"map {i} backward: Z∘Y and its GEMV", 4 * m, 0.0),
                  (f"map {i} backward: ÷ρ into the gradient", m + out_bytes, 0.0),
                  (f"map {i} backward: max-pool spans", m, 0.0)]
    return [s for s in steps if s[1] or s[2]]


class TorchGramStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f1, f2, channel_mix: bool, eps: float):
        acc = torch.float64 if torch.float64 in (f1.dtype, f2.dtype) else torch.float32
        B, C1, C2 = f1.shape[0], f1.shape[1], f2.shape[1]
        n_pix = f1.shape[2] * f1.shape[3]
        blk = pixel_block(n_pix, C1 + C2, f1.device)
        ycat = torch.empty(C1 + C2, blk, dtype=acc, device=f1.device)
        w1, w2 = f1.new_empty(B, C1, dtype=acc), f2.new_empty(B, C2, dtype=acc)
        rho1, rho2 = (f1.new_empty(B, n_pix, dtype=acc) for _ in range(2))
        amax1, amax2 = f1.new_zeros(B, C1, dtype=acc), f2.new_zeros(B, C2, dtype=acc)
        g = f1.new_zeros(B, C1 + C2, C1 + C2, dtype=acc)  # [Y₁; Y₂][Y₁; Y₂]ᵀ, upper blocks only
        for b in range(B):
            x1, x2 = _image(f1, b, acc), _image(f2, b, acc)
            w1[b], m1 = _weights(x1, channel_mix)
            w2[b], m2 = _weights(x2, channel_mix)
            if channel_mix:
                amax1[b], amax2[b] = m1, m2
            g11, g22, g12 = g[b, :C1, :C1], g[b, C1:, C1:], g[b, :C1, C1:]
            sq1, sq2 = w1[b] * w1[b], w2[b] * w2[b]
            for n0 in range(0, n_pix, blk):
                n1 = min(n0 + blk, n_pix)
                y1, y2 = ycat[:C1, : n1 - n0], ycat[C1:, : n1 - n0]
                _scaled_rows(x1[:, n0:n1], sq1, eps, y1, rho1[b, n0:n1])
                _scaled_rows(x2[:, n0:n1], sq2, eps, y2, rho2[b, n0:n1])
                g11.addmm_(y1, y1.t())
                g22.addmm_(y2, y2.t())
                g12.addmm_(y1, y2.t())
        s1 = g[:, :C1, :C1] * (w1[:, :, None] * w1[:, None, :])
        s2 = g[:, C1:, C1:] * (w2[:, :, None] * w2[:, None, :])
        k = g[:, :C1, C1:] * (w1[:, :, None] * w2[:, None, :])
        ctx.save_for_backward(f1, f2, w1, w2, rho1, rho2, amax1, amax2, s1, s2, k)
        ctx.opts = (channel_mix, eps, acc)
        sq = lambda m: m.double().square().sum(dim=(1, 2))  # noqa: E731 - in fp64: p + q − 2k cancels
        return sq(k), sq(s1), sq(s2)

    @staticmethod
    def backward(ctx, gk, gp, gq):
        f1, f2, w1, w2, rho1, rho2, amax1, amax2, s1, s2, k = ctx.saved_tensors
        channel_mix, eps, acc = ctx.opts
        need = ctx.needs_input_grad[:2]
        B, C1, C2 = f1.shape[0], f1.shape[1], f2.shape[1]
        n_pix = f1.shape[2] * f1.shape[3]
        blk = pixel_block(n_pix, C1 + C2, f1.device)
        grads = [torch.empty(B, f.shape[1], n_pix, dtype=f.dtype, device=f.device) if n else None
                 for f, n in zip((f1, f2), need)]
        ycat = torch.empty(C1 + C2, blk, dtype=acc, device=f1.device)
        e, scratch = (torch.empty(max(C1, C2), blk, dtype=acc, device=f1.device) for _ in range(2))
        gk, gp, gq = gk.to(acc), gp.to(acc), gq.to(acc)
        rows = (slice(0, C1), slice(C1, C1 + C2))
        for b in range(B):
            xs, ws, rhos = (_image(f1, b, acc), _image(f2, b, acc)), (w1[b], w2[b]), (rho1[b], rho2[b])
            amaxs = (amax1[b], amax2[b])
            wk = w1[b, :, None] * k[b] * w2[b, None, :]
            coefs = (torch.cat([(4 * gp[b]) * (w1[b, :, None] * s1[b] * w1[b, None, :]), (2 * gk[b]) * wk], 1),
                     torch.cat([(2 * gk[b]) * wk.t(), (4 * gq[b]) * (w2[b, :, None] * s2[b] * w2[b, None, :])], 1))
            # Per image, hoisted out of the block loop: each torch call costs microseconds of dispatch.
            consts = [dict(w2=(w * w)[:, None], alive=rho > eps, ones_c=w.new_ones(w.shape[0]),
                           ones_n=w.new_ones(blk), ua=torch.zeros_like(w), ub=torch.zeros_like(w),
                           inv_rho=rho.reciprocal())
                      for w, rho in zip(ws, rhos)]
            for n0 in range(0, n_pix, blk):
                n1 = min(n0 + blk, n_pix)
                yb = ycat[:, : n1 - n0]
                for i in range(2):
                    torch.mul(xs[i][:, n0:n1], consts[i]["inv_rho"][n0:n1], out=yb[rows[i]])
                for i in range(2):
                    if grads[i] is None:
                        continue
                    c = xs[i].shape[0]
                    eb = torch.mm(coefs[i], yb, out=e[:c, : n1 - n0])
                    _chain_block(eb, yb[rows[i]], scratch[:c, : n1 - n0], grads[i][b, :, n0:n1],
                                 consts[i], n0, n1, channel_mix)
            for i in range(2):
                if grads[i] is not None and channel_mix:
                    u = consts[i]["ua"] - consts[i]["w2"][:, 0] * consts[i]["ub"]  # w ∘ ∂L/∂w
                    _max_pool_backward(grads[i][b], xs[i], amaxs[i], u - ws[i] * u.sum())
        return (*(gr.view(f.shape) if gr is not None else None for gr, f in zip(grads, (f1, f2))), None, None)


def _chain_block(e, y, scratch, out, k: dict, n0: int, n1: int, channel_mix: bool) -> None:
    """One pixel block of E = W dÂᵀ (C, n) -> dF written into `out`: removes the radial part that the row
    normalisation cancels, then ÷ ρ. With channel mixing, accumulates k["ua"] − w² k["ub"] = w ∘ ∂L/∂w.

    Sums over channels and over pixels run as GEMVs of a product with a ones vector: on CPU that measured
    faster than linalg.vecdot or .sum(dim=0) on these channel-major blocks."""
    n = n1 - n0
    prod = torch.mul(y, e, out=scratch)
    t = torch.mv(prod.t(), k["ones_c"]).mul_(k["alive"][n0:n1])
    if channel_mix:
        k["ua"].addmv_(prod, k["ones_n"][:n])  # Σ_n Y∘E
    z = torch.mul(y, t, out=scratch)
    e.addcmul_(z, k["w2"], value=-1)
    if channel_mix:
        k["ub"].addmv_(z.mul_(y), k["ones_n"][:n])  # Σ_n Y²t, the radial part's share
    torch.mul(e, k["inv_rho"][n0:n1], out=out)


def max_positions(x: torch.Tensor, amax: torch.Tensor, span: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(channel, pixel) of every entry of x (C, N) equal to its channel's max `amax`, ties included.

    Comparing all of x costs two full passes (compare, then nonzero); the maxima of spans of `span` pixels are
    one fast reduction, and only spans whose maximum reaches the channel's max are compared in full: one span
    a channel in general, every span of a dead (all-equal) channel.
    """
    C, N = x.shape
    whole = N // span * span
    spans = x[:, :whole].reshape(C, -1, span)
    cand_c, cand_s = (spans.amax(dim=2) == amax[:, None]).nonzero(as_tuple=True)
    hit, offset = (spans[cand_c, cand_s] == amax[cand_c, None]).nonzero(as_tuple=True)
    chan, pix = [cand_c[hit]], [cand_s[hit] * span + offset]
    if whole < N:
        tail_c, tail_p = (x[:, whole:] == amax[:, None]).nonzero(as_tuple=True)
        chan.append(tail_c)
        pix.append(tail_p + whole)
    return torch.cat(chan), torch.cat(pix)


def _max_pool_backward(dx: torch.Tensor, x: torch.Tensor, amax: torch.Tensor, dmax: torch.Tensor) -> None:
    """dx (C, N) += ∂L/∂max-pool spread equally over the pixels where each channel attains its max (ties
    included, as torch.amax's own backward does; ReLU maps tie on whole dead channels)."""
    chan, pix = max_positions(x, amax)
    count = torch.bincount(chan, minlength=dx.shape[0]).to(dmax.dtype)
    dx.index_put_((chan, pix), ((dmax / count)[chan]).to(dx.dtype), accumulate=True)
