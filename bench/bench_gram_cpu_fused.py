"""What fused CPU loops would buy the `gram` path: a measurement for a decision, not a code path cocofast runs.

The plain-torch Gram path (cocofast/ops/similarity/gram_torch.py) spends its time beyond the GEMMs in about 21
torch calls per pixel block (square, pixel-norm GEMV, scale, radial part, ...), each one pass over the block,
plus the Python loop over blocks. Here the same algorithm has those passes fused into C++ loops (two sweeps
over a block in the forward, three in the backward, the GEMMs still torch's) and the loop over an image's
blocks in C++, JIT-compiled with torch.utils.cpp_extension (about 25 s the first time, cached after). Both run
without channel mixing (w = 1), so neither needs the max-pool's backward; the forward's norms and the
backward's radial part are the same work either way. Timed as bench_gram_cpu.py times `gram`: one thread,
interleaved medians of thread CPU time, the last-level cache flushed before every call, against the fastest
of the same 7 bare GEMMs.

    python bench/bench_gram_cpu_fused.py [--repeats 7] [--sizes 4096,65536] [--channels 24,64]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_gram_cpu import BATCH, cache_flush, channel_pairs, floor_calls, interleaved_medians, maps
from common import environment, write_csv

from cocofast.cpu_memory import keep_freed_memory

SOURCE = r"""
#include <torch/extension.h>
#include <cmath>

namespace {
// rho[i] = max(sqrt(sum_c w2[c] x[c,i]^2), eps), y[c,i] = x[c,i] / rho[i]: two sweeps over the block.
void norm_scale(const float* x, int64_t ldx, int64_t C, int64_t n, const float* w2, float eps,
                float* rho, float* inv, float* y, int64_t ldy) {
  for (int64_t i = 0; i < n; ++i) rho[i] = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    const float* xc = x + c * ldx; const float wc = w2[c];
    for (int64_t i = 0; i < n; ++i) rho[i] += wc * xc[i] * xc[i];
  }
  for (int64_t i = 0; i < n; ++i) { float r = std::sqrt(rho[i]); r = r > eps ? r : eps; rho[i] = r; inv[i] = 1.f / r; }
  for (int64_t c = 0; c < C; ++c) {
    const float* xc = x + c * ldx; float* yc = y + c * ldy;
    for (int64_t i = 0; i < n; ++i) yc[i] = xc[i] * inv[i];
  }
}

void scale(const float* x, int64_t ldx, int64_t C, int64_t n, const float* rho, float* inv, float* y, int64_t ldy) {
  for (int64_t i = 0; i < n; ++i) inv[i] = 1.f / rho[i];
  for (int64_t c = 0; c < C; ++c) {
    const float* xc = x + c * ldx; float* yc = y + c * ldy;
    for (int64_t i = 0; i < n; ++i) yc[i] = xc[i] * inv[i];
  }
}

// t = [rho > eps] sum_c y e; grad = (e - w2 y t) / rho; ub += sum_i y^2 t: two sweeps.
void radial(const float* y, const float* e, int64_t ld, int64_t C, int64_t n, const float* w2, const float* rho,
            const float* inv, float eps, float* t, float* grad, int64_t ldg, float* ub) {
  for (int64_t i = 0; i < n; ++i) t[i] = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    const float* yc = y + c * ld; const float* ec = e + c * ld;
    for (int64_t i = 0; i < n; ++i) t[i] += yc[i] * ec[i];
  }
  for (int64_t i = 0; i < n; ++i) t[i] = rho[i] > eps ? t[i] : 0.f;
  for (int64_t c = 0; c < C; ++c) {
    const float* yc = y + c * ld; const float* ec = e + c * ld; float* gc = grad + c * ldg;
    const float wc = w2[c]; float s = 0.f;
    for (int64_t i = 0; i < n; ++i) { const float z = yc[i] * t[i]; gc[i] = (ec[i] - wc * z) * inv[i]; s += z * yc[i]; }
    ub[c] += s;
  }
}
}  // namespace

// One image: x1 (C1, N), x2 (C2, N) contiguous fp32; fills rho (2, N) and g (C, C) += Y Y^T.
void forward_image(torch::Tensor x1, torch::Tensor x2, torch::Tensor w2, double eps, int64_t blk,
                   torch::Tensor rho, torch::Tensor g) {
  const int64_t C1 = x1.size(0), C2 = x2.size(0), C = C1 + C2, N = x1.size(1);
  auto ycat = torch::empty({C, blk}, x1.options());
  auto inv = torch::empty({blk}, x1.options());
  for (int64_t n0 = 0; n0 < N; n0 += blk) {
    const int64_t n = std::min(blk, N - n0);
    auto y = ycat.narrow(1, 0, n);
    norm_scale(x1.data_ptr<float>() + n0, N, C1, n, w2.data_ptr<float>(), (float)eps,
               rho.data_ptr<float>() + n0, inv.data_ptr<float>(), ycat.data_ptr<float>(), blk);
    norm_scale(x2.data_ptr<float>() + n0, N, C2, n, w2.data_ptr<float>() + C1, (float)eps,
               rho.data_ptr<float>() + N + n0, inv.data_ptr<float>(), ycat.data_ptr<float>() + C1 * blk, blk);
    g.addmm_(y, y.t());
  }
}

// One image: grad1 (C1, N), grad2 (C2, N) = the gradients; ub (C) += sum_n Y^2 t.
void backward_image(torch::Tensor x1, torch::Tensor x2, torch::Tensor m, torch::Tensor w2, torch::Tensor rho,
                    double eps, int64_t blk, torch::Tensor grad1, torch::Tensor grad2, torch::Tensor ub) {
  const int64_t C1 = x1.size(0), C2 = x2.size(0), C = C1 + C2, N = x1.size(1);
  auto ycat = torch::empty({C, blk}, x1.options());
  auto e = torch::empty({C, blk}, x1.options());
  auto inv = torch::empty({2, blk}, x1.options());
  auto t = torch::empty({blk}, x1.options());
  const float* r = rho.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += blk) {
    const int64_t n = std::min(blk, N - n0);
    scale(x1.data_ptr<float>() + n0, N, C1, n, r + n0, inv.data_ptr<float>(), ycat.data_ptr<float>(), blk);
    scale(x2.data_ptr<float>() + n0, N, C2, n, r + N + n0, inv.data_ptr<float>() + blk,
          ycat.data_ptr<float>() + C1 * blk, blk);
    auto eb = e.narrow(1, 0, n);
    at::mm_out(eb, m, ycat.narrow(1, 0, n));
    radial(ycat.data_ptr<float>(), e.data_ptr<float>(), blk, C1, n, w2.data_ptr<float>(), r + n0,
           inv.data_ptr<float>(), (float)eps, t.data_ptr<float>(), grad1.data_ptr<float>() + n0, N,
           ub.data_ptr<float>());
    radial(ycat.data_ptr<float>() + C1 * blk, e.data_ptr<float>() + C1 * blk, blk, C2, n,
           w2.data_ptr<float>() + C1, r + N + n0, inv.data_ptr<float>() + blk, (float)eps, t.data_ptr<float>(),
           grad2.data_ptr<float>() + n0, N, ub.data_ptr<float>() + C1);
  }
}
"""


def compile_loops():
    from torch.utils.cpp_extension import load_inline

    # -ffast-math lets the compiler reorder the per-channel sums so they vectorise (the plain path's torch
    # reductions reorder theirs too); the gradients are checked against the plain path before any timing.
    return load_inline("cocofast_bench_gram_loops", cpp_sources=SOURCE,
                       functions=["forward_image", "backward_image"],
                       extra_cflags=["-O3", "-march=native", "-ffast-math"], verbose=False)


def fused_gram_stats(loops):
    """(f1, f2) -> (k, p, q) per image, without channel mixing, as TorchGramStats(f1, f2, False, eps)."""
    import torch

    from cocofast.ops.similarity.gram_torch import pixel_block

    eps = 1e-6

    class FusedGramStats(torch.autograd.Function):
        @staticmethod
        def forward(ctx, f1, f2):
            B, C1, C2 = f1.shape[0], f1.shape[1], f2.shape[1]
            C, n_pix = C1 + C2, f1.shape[2] * f1.shape[3]
            w2 = f1.new_ones(C)
            rho, g = f1.new_empty(B, 2, n_pix), f1.new_zeros(B, C, C)
            for b in range(B):
                loops.forward_image(f1[b].reshape(C1, -1), f2[b].reshape(C2, -1), w2, eps,
                                    pixel_block(n_pix, C, f1.device), rho[b], g[b])
            ctx.save_for_backward(f1, f2, rho, g)
            sq = lambda m: m.double().square().sum(dim=(1, 2))  # noqa: E731
            return sq(g[:, :C1, C1:]), sq(g[:, :C1, :C1]), sq(g[:, C1:, C1:])

        @staticmethod
        def backward(ctx, gk, gp, gq):
            f1, f2, rho, g = ctx.saved_tensors
            B, C1, C2 = f1.shape[0], f1.shape[1], f2.shape[1]
            C, n_pix = C1 + C2, f1.shape[2] * f1.shape[3]
            m = g.clone()  # w = 1: M = G ∘ [[4g_p, 2g_k], [2g_k, 4g_q]]
            m[:, :C1, :C1] *= 4 * gp[:, None, None].float()
            m[:, C1:, C1:] *= 4 * gq[:, None, None].float()
            m[:, :C1, C1:] *= 2 * gk[:, None, None].float()
            m[:, C1:, :C1] *= 2 * gk[:, None, None].float()
            grads = torch.empty_like(f1), torch.empty_like(f2)
            w2, ub = f1.new_ones(C), f1.new_zeros(C)
            for b in range(B):
                loops.backward_image(f1[b].reshape(C1, -1), f2[b].reshape(C2, -1), m[b], w2, rho[b], eps,
                                     pixel_block(n_pix, C, f1.device), grads[0][b].view(C1, -1),
                                     grads[1][b].view(C2, -1), ub)
            return grads

    return FusedGramStats.apply


def step_of(stats):
    def step(f1, f2):
        f1.grad = f2.grad = None
        k, p, q = stats(f1, f2)
        (k / (p * q).sqrt()).sum().backward()
    return step


def main(argv=None) -> list[dict]:
    import torch

    from cocofast.ops.similarity.gram_torch import TorchGramStats

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sizes", default="4096,65536", help="comma-separated N (square numbers)")
    ap.add_argument("--channels", default="24,64", help="comma-separated C or C1/C2")
    args, _ = ap.parse_known_args(argv)
    torch.set_num_threads(1)
    malloc = "kept" if keep_freed_memory() else "system"
    env = environment()
    try:
        loops = compile_loops()
    except Exception as err:  # no C++ compiler, or no Python headers: nothing to measure here
        print(f"bench_gram_cpu_fused: skipped, the C++ loops did not compile: {err}", file=sys.stderr)
        return []
    plain = step_of(lambda f1, f2: TorchGramStats.apply(f1, f2, False, 1e-6))
    fused = step_of(fused_gram_stats(loops))
    flush = cache_flush()
    rows = []
    for n_pix in (int(n) for n in args.sizes.split(",")):
        for c1, c2 in channel_pairs(args.channels):
            f1, f2 = maps(BATCH, n_pix, c1, c2)
            plain(f1, f2)
            want = f1.grad.clone(), f2.grad.clone()
            fused(f1, f2)
            error = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip((f1.grad, f2.grad), want))
            assert error < 1e-4, f"fused loops disagree with the plain-torch path: {error:.2e}"
            floors = floor_calls(BATCH, n_pix, c1, c2)
            calls = {"plain": lambda: plain(f1, f2), "fused": lambda: fused(f1, f2), **floors}
            med = interleaved_medians(calls, args.repeats, flush)
            floor = min(med[k] for k in floors)
            row = {"N": n_pix, "batch": BATCH, "channels": f"{c1}/{c2}" if c1 != c2 else c1,
                   "repeats": args.repeats, "malloc": malloc, "channel_mix": False,
                   "plain_torch_ms": round(med["plain"] * 1e3, 1), "fused_loops_ms": round(med["fused"] * 1e3, 1),
                   "floor_ms": round(floor * 1e3, 1), "plain_over_floor": round(med["plain"] / floor, 2),
                   "fused_over_floor": round(med["fused"] / floor, 2),
                   "fused_gradient_error": f"{error:.1e}"}
            rows.append(row)
            print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    write_csv(HERE / "results" / "gram_cpu_fused.csv", rows, env)
    return rows


if __name__ == "__main__":
    main()
