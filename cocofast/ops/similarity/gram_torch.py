"""The Gram identity in plain torch: CoCo statistics on any device with memory bounded by one image.

Same contract as `cocofast.kernels.GramStats`: (f₁, f₂) -> (k, p, q) per image in float64, with
k = ‖Â₁ᵀÂ₂‖², p = ‖Â₁ᵀÂ₁‖², q = ‖Â₂ᵀÂ₂‖² (⟨ÂÂᵀ, Â'Â'ᵀ⟩ = ‖ÂᵀÂ'‖²: the uncentred linear-CKA identity of
Kornblith et al. 2019, which removes CoCo DistillNet's N×N matrices). In channel-major layout, per image:
X (C, N) the map, w = softmax(max-pool X) the channel weights, ρ = max(‖diag(w) X[:, n]‖, eps) the pixel
norms, Y = X diag(1/ρ), and Âᵀ = diag(w) Y. Both maps' Y stacked, Ŷ = [Y₁; Y₂], have one Gram G = ŶŶᵀ, and

    S₁ = W₁ G₁₁ W₁,  S₂ = W₂ G₂₂ W₂,  K = W₁ G₁₂ W₂      (W = diag(w): C×C work, free)

so the forward is one GEMM on Ŷ, a channel max and three streaming passes per map (square, norm, scale).
Only the inputs, w, ρ, G and each channel's maxima over spans of SPAN pixels are kept; the backward rebuilds
Ŷ (one pass) rather than holding it, so no input-sized buffer outlives the call. The backward, written out so
each C×N pass does as much as it can:

    E = W dÂᵀ = M Ŷ,  M = G ∘ [[4g_p, 2g_k], [2g_k, 4g_q]] ∘ (wwᵀ)²      (one GEMM for both maps)
    t  = [ρ > eps] · Σ_c Y ∘ E          (the radial part removed by the normalisation)
    E ← E − w² ∘ Y ∘ t;  dF = E / ρ
    u = w ∘ ∂L/∂w = Σ_n Y ∘ E − w² Σ_n Y² t, whose first term is diag(M G): C×C work, no pass
    ∂L/∂(max-pool) = u − w Σ_c u, shared equally by the pixels that attain each channel's max (found from
    the kept span maxima, without another pass).

Work goes image by image and, on CPU, in blocks of pixels, so every temporary is a block's size and stays in
cache across the passes over it; both maps share each op of a block, so a block costs about 9 torch calls
forward and 12 backward (bench/bench_gram_cpu.py: per-image GEMMs run within a few % of batched bmm on CPU;
a pixel-major block made the Gram GEMM 2-2.4x faster at C ≤ 128, but writing Y transposed cost as much as it
saved, and 384 or 192 KB blocks in place of 1 MB lost more in calls than they gained in cache). The only
input-sized allocations are the gradients themselves.
"""
from __future__ import annotations

import torch

SPAN = 64  # pixels per span whose maximum the forward keeps, so the backward finds the max-pool's argmax

# Bytes of one (C₁ + C₂) × block buffer; the passes over a block touch about four of them.
_BLOCK_BYTES = 1 << 20
# Up to this C₁ + C₂ one GEMM for all of ŶŶᵀ is faster than three for its distinct blocks.
_ONE_GRAM_CHANNELS = 128
# Input bytes of the images whose channel max is taken in one go, just before their blocks read them again:
# small enough that the second read comes from cache, large enough that small images share their calls.
_GROUP_BYTES = 8 << 20


def pixel_block(n_pix: int, channels: int, device: torch.device) -> int:
    """Pixels per block. On CPU a block's buffers then stay in cache across the passes over them, and every
    temporary is small whatever N; at least 1,024 pixels so the GEMMs stay efficient. On a GPU each block
    would be another round of launches, so the whole image is one block."""
    if device.type != "cpu":
        return n_pix
    return max(1024, min(n_pix, (_BLOCK_BYTES // (4 * channels)) // 256 * 256))


def _image(f: torch.Tensor, b: int, acc: torch.dtype) -> torch.Tensor:
    """Image b of a (B, C, H, W) map as (C, N) in `acc`: a view when the layout allows, else one copy."""
    return f[b].reshape(f.shape[1], -1).to(acc)


def _spans(x: torch.Tensor) -> torch.Tensor:
    """The whole spans of x (..., N) as a view (..., N // SPAN, SPAN); a ragged tail is left out."""
    if x.shape[-1] < SPAN:  # unfold refuses a size larger than the dimension, even for no spans
        return x.new_empty(*x.shape[:-1], 0, SPAN)
    return x[..., : x.shape[-1] // SPAN * SPAN].unfold(-1, SPAN, SPAN)


def span_maxima(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, spans) of a (B, C, H, W) map, in its dtype: each channel's max (B, C) and the maxima of its whole
    spans of SPAN pixels (B, C, N // SPAN), from one pass; a ragged tail counts in amax only."""
    flat = f.detach().reshape(f.shape[0], f.shape[1], -1)
    spans = _spans(flat).amax(dim=3)
    whole = spans.shape[2] * SPAN
    parts = [spans.amax(dim=2)] if whole else []
    if whole < flat.shape[2]:
        parts.append(flat[:, :, whole:].amax(dim=2))
    return (parts[0] if len(parts) == 1 else torch.maximum(*parts)), spans


def max_positions(x: torch.Tensor, amax: torch.Tensor, spans: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, ...]:
    """Indices of every entry of x (..., N) equal to its row's max `amax` (...), ties included: one index
    tensor per leading dimension, then the pixel ((channel, pixel) for x (C, N)).

    Comparing all of x costs two full passes (compare, then nonzero); only spans whose maximum (`spans`
    (..., N // SPAN) from span_maxima, else one reduction here) reaches the row's max are compared in full:
    one span a channel in general, every span of a dead (all-equal) channel.
    """
    blocks = _spans(x)
    if spans is None:
        spans = blocks.amax(dim=-1)
    *lead, span = (spans == amax[..., None]).nonzero(as_tuple=True)
    hit, offset = (blocks[(*lead, span)] == amax[tuple(lead)][:, None]).nonzero(as_tuple=True)
    found = [[i[hit]] for i in lead] + [[span[hit] * SPAN + offset]]
    whole = blocks.shape[-2] * SPAN
    if whole < x.shape[-1]:
        *tail_lead, tail_pix = (x[..., whole:] == amax[..., None]).nonzero(as_tuple=True)
        for acc, i in zip(found, (*tail_lead, tail_pix + whole)):
            acc.append(i)
    return tuple(torch.cat(parts) for parts in found)


def _weights(f1, f2, imgs: slice, w, sel, maxima) -> None:
    """For images `imgs`: with channel mixing (maxima not None), each map's max-pool and span maxima into
    `maxima` and w = softmax(max-pool) into w; always, sel = rows of w² on each map's channels (the two
    pixel-norm GEMV weights as one matrix)."""
    C1 = f1.shape[1]
    if maxima is not None:
        for f, (amax, spans), cols in ((f1, maxima[0], slice(0, C1)), (f2, maxima[1], slice(C1, None))):
            amax[imgs], spans[imgs] = span_maxima(f[imgs])
            w[imgs, cols] = torch.softmax(amax[imgs].to(w.dtype), dim=1)
    w2 = w[imgs] * w[imgs]
    sel[imgs, 0, :C1], sel[imgs, 1, C1:] = w2[:, :C1], w2[:, C1:]


def traffic(batch: int, n_pix: int, c1: int, c2: int, element_bytes: int = 4) -> list[tuple[str, float, float]]:
    """(step, bytes, GEMM FLOPs) of one forward + backward with channel mixing, summed over the batch: every
    pass of the code below, as if each streamed its operands from memory once (a GPU's HBM; on CPU the pixel
    blocks keep them in cache). Accumulation is fp32; C×C work and the span maxima are left out."""
    m1, m2 = (batch * n_pix * c * 4 for c in (c1, c2))  # one map in fp32
    raw1, raw2 = (batch * n_pix * c * element_bytes for c in (c1, c2))
    m, pix = m1 + m2, batch * n_pix * 4                  # both maps; one per-pixel fp32 vector
    cast = 2 * m if element_bytes != 4 else 0            # fp16/bf16 maps are widened once per pass over an image
    flops = 2 * batch * n_pix * (c1 + c2) ** 2
    one_gram = c1 + c2 <= _ONE_GRAM_CHANNELS  # else three GEMMs, reading Ŷ₁ and Ŷ₂ twice each
    gram_flops = flops if one_gram else 2 * batch * n_pix * (c1 * c1 + c2 * c2 + c1 * c2)
    steps = [("input checks (aminmax)", raw1 + raw2, 0.0),
             ("forward: channel max over spans", raw1 + raw2, 0.0),
             ("forward: widen to fp32", cast, 0.0),
             ("forward: square", 2 * m, 0.0),
             ("forward: pixel norms (one GEMV per block)", m + 2 * pix, 0.0),
             ("forward: sqrt, clamp, reciprocal", 5 * 2 * pix, 0.0),
             ("forward: scale to Ŷ", 2 * m + 2 * pix, 0.0),
             ("forward GEMM ŶŶᵀ", m if one_gram else 2 * m, gram_flops),
             ("backward: widen to fp32", cast, 0.0),
             ("backward: 1/ρ and the dead-pixel test", 3 * 2 * pix, 0.0),
             ("backward: rebuild Ŷ", 2 * m + 2 * pix, 0.0),
             ("backward GEMM M Ŷ", 2 * m, flops),
             ("backward: Ŷ∘E", 3 * m, 0.0),
             ("backward: t, the per-map channel sums", m + 2 * pix, 0.0),
             ("backward: Z = Ŷ∘t", 2 * m + 2 * pix, 0.0),
             ("backward: E − w²Z", 3 * m, 0.0),
             ("backward: Z∘Ŷ and its GEMV", 4 * m, 0.0),
             ("backward: ÷ρ into the gradients", m + raw1 + raw2 + 2 * pix, 0.0)]
    return [s for s in steps if s[1] or s[2]]


class TorchGramStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f1, f2, channel_mix: bool, eps: float):
        acc = torch.float64 if torch.float64 in (f1.dtype, f2.dtype) else torch.float32
        B, C1, C2 = f1.shape[0], f1.shape[1], f2.shape[1]
        C, n_pix = C1 + C2, f1.shape[2] * f1.shape[3]
        blk = pixel_block(n_pix, C, f1.device)
        w = f1.new_ones(B, C, dtype=acc)
        maxima = [(f.new_empty(B, f.shape[1]), f.new_empty(B, f.shape[1], n_pix // SPAN))
                  for f in (f1, f2)] if channel_mix else None
        sel = w.new_zeros(B, 2, C)
        ycat = torch.empty(C, blk, dtype=acc, device=f1.device)
        inv = torch.empty(2, blk, dtype=acc, device=f1.device)
        rho = f1.new_empty(B, 2, n_pix, dtype=acc)
        g = f1.new_zeros(B, C, C, dtype=acc)
        group = max(1, _GROUP_BYTES // (C * n_pix * max(f1.element_size(), f2.element_size())))
        for b in range(B):
            if b % group == 0:
                _weights(f1, f2, slice(b, min(b + group, B)), w, sel, maxima)
            x1, x2 = _image(f1, b, acc), _image(f2, b, acc)
            for n0 in range(0, n_pix, blk):
                n1 = min(n0 + blk, n_pix)
                x1b, x2b, r = x1[:, n0:n1], x2[:, n0:n1], rho[b, :, n0:n1]
                y, ib = ycat[:, : n1 - n0], inv[:, : n1 - n0]
                torch.mul(x1b, x1b, out=y[:C1])
                torch.mul(x2b, x2b, out=y[C1:])
                torch.mm(sel[b], y, out=r)
                r.sqrt_().clamp_min_(eps)
                torch.reciprocal(r, out=ib)
                torch.mul(x1b, ib[0], out=y[:C1])
                torch.mul(x2b, ib[1], out=y[C1:])
                if C <= _ONE_GRAM_CHANNELS:
                    g[b].addmm_(y, y.t())
                else:  # G₁₁, G₂₂, G₁₂: a quarter fewer FLOPs than all of ŶŶᵀ
                    g[b, :C1, :C1].addmm_(y[:C1], y[:C1].t())
                    g[b, C1:, C1:].addmm_(y[C1:], y[C1:].t())
                    g[b, :C1, C1:].addmm_(y[:C1], y[C1:].t())
        if C > _ONE_GRAM_CHANNELS:
            g[:, C1:, :C1] = g[:, :C1, C1:].transpose(1, 2)
        s = g * (w[:, :, None] * w[:, None, :])  # [[S₁, K], [Kᵀ, S₂]]
        spans = [t for pair in maxima for t in pair] if channel_mix else [None] * 4
        ctx.save_for_backward(f1, f2, w, rho, g, *spans)
        ctx.opts = (channel_mix, eps, acc)
        sq = lambda m: m.double().square().sum(dim=(1, 2))  # noqa: E731 - in fp64: p + q − 2k cancels
        return sq(s[:, :C1, C1:]), sq(s[:, :C1, :C1]), sq(s[:, C1:, C1:])

    @staticmethod
    def backward(ctx, gk, gp, gq):
        f1, f2, w, rho, g, amax1, spans1, amax2, spans2 = ctx.saved_tensors
        channel_mix, eps, acc = ctx.opts
        need = ctx.needs_input_grad[:2]
        B, C1, C2 = f1.shape[0], f1.shape[1], f2.shape[1]
        C, n_pix = C1 + C2, f1.shape[2] * f1.shape[3]
        blk = pixel_block(n_pix, C, f1.device)
        gk, gp, gq = gk.to(acc), gp.to(acc), gq.to(acc)
        ww = w[:, :, None] * w[:, None, :]
        m = g * ww * ww  # then ∘ [[4g_p, 2g_k], [2g_k, 4g_q]], for the whole batch at once
        m[:, :C1, :C1] *= 4 * gp[:, None, None]
        m[:, C1:, C1:] *= 4 * gq[:, None, None]
        m[:, :C1, C1:] *= 2 * gk[:, None, None]
        m[:, C1:, :C1] *= 2 * gk[:, None, None]
        u = (m * g).sum(dim=2)  # Σ_n Y ∘ E = diag(M G), G symmetric
        lo, hi = (0 if need[0] else C1), (C if need[1] else C1)  # the rows of E whose gradient is wanted
        m = m[:, lo:hi]
        rows = [slice(C1 * i - lo, C1 + C2 * i - lo) for i in range(2)]  # each map's rows of E
        grads = [torch.empty((B, f.shape[1], n_pix), dtype=f.dtype, device=f.device) if n else None
                 for f, n in zip((f1, f2), need)]
        ycat = torch.empty(C, blk, dtype=acc, device=f1.device)
        e, z = (torch.empty(hi - lo, blk, dtype=acc, device=f1.device) for _ in range(2))
        t = torch.empty(2, blk, dtype=acc, device=f1.device)
        ones_n = w.new_ones(blk)
        which = w.new_zeros(2, C)  # row i: ones on map i's channels, so which @ P sums each map's channels
        which[0, :C1] = which[1, C1:] = 1
        which = which[:, lo:hi]
        w2 = (w * w)[:, :, None]
        ub = torch.zeros_like(w)
        inv_rho = rho.reciprocal()
        alive = (rho > eps).to(acc) if bool((rho <= eps).any()) else None  # skipped when every pixel is
        for b in range(B):
            x1, x2 = _image(f1, b, acc), _image(f2, b, acc)
            for n0 in range(0, n_pix, blk):
                n1 = min(n0 + blk, n_pix)
                n = n1 - n0
                y, r, eb, zb, tb = ycat[:, :n], inv_rho[b, :, n0:n1], e[:, :n], z[:, :n], t[:, :n]
                torch.mul(x1[:, n0:n1], r[0], out=y[:C1])
                torch.mul(x2[:, n0:n1], r[1], out=y[C1:])
                torch.mm(m[b], y, out=eb)
                y = y[lo:hi]
                torch.mul(y, eb, out=zb)
                torch.mm(which, zb, out=tb)  # t, per map
                if alive is not None:
                    tb.mul_(alive[b, :, n0:n1])
                for i in range(2):
                    if grads[i] is not None:
                        torch.mul(y[rows[i]], tb[i], out=zb[rows[i]])
                eb.addcmul_(zb, w2[b, lo:hi], value=-1)
                if channel_mix:
                    ub[b, lo:hi].addmv_(zb.mul_(y), ones_n[:n])  # Σ_n Y²t, the radial part's share
                for i in range(2):
                    if grads[i] is not None:
                        torch.mul(eb[rows[i]], r[i], out=grads[i][b, :, n0:n1])
        if channel_mix:
            u = u - w2[:, :, 0] * ub  # w ∘ ∂L/∂w
            for i, (f, amax, spans) in enumerate(((f1, amax1, spans1), (f2, amax2, spans2))):
                if grads[i] is not None:
                    ui = u[:, C1 * i: C1 + C2 * i]
                    dmax = ui - w[:, C1 * i: C1 + C2 * i] * ui.sum(dim=1, keepdim=True)
                    _max_pool_backward(grads[i], f.detach().reshape(B, f.shape[1], -1), amax, spans, dmax)
        return (*(gr.view(f.shape) if gr is not None else None for gr, f in zip(grads, (f1, f2))), None, None)


def _max_pool_backward(dx: torch.Tensor, x: torch.Tensor, amax: torch.Tensor, spans: torch.Tensor,
                       dmax: torch.Tensor) -> None:
    """dx (B, C, N) += ∂L/∂max-pool (B, C) spread equally over the pixels where each channel attains its max
    (ties included, as torch.amax's own backward does; ReLU maps tie on whole dead channels)."""
    img, chan, pix = max_positions(x, amax, spans)
    count = torch.zeros_like(dmax).index_put_((img, chan), torch.ones_like(img, dtype=dmax.dtype), accumulate=True)
    dx.index_put_((img, chan, pix), (dmax / count)[img, chan].to(dx.dtype), accumulate=True)
