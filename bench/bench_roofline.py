"""Modelled GPU time of every similarity path at 1024² patches: max(bytes / HBM bandwidth, FLOPs / peak).

Per path and shape, the bytes come from counting, not from reading the code:
- the Triton kernels (gram, tiled, pixel relation): cocofast.perf.traffic runs them in the CPU
  interpreter at the GPU tile configs (COCOFAST_GPU_CONFIG=1) on small maps and counts their DRAM traffic
  (each byte once per launch), extrapolated to the full shape (see kernel_bytes). Without that module,
  the pass counts in cocofast.ops.similarity.auto stand in, and the `bytes_source` column says so;
- the eager `gram` path: cocofast.ops.similarity.gram_torch.traffic, its own list of passes, checked here
  against the same counter's torch-op rules (cocofast.perf.traffic) on a small shape (`counted_over_model`).
FLOPs are each algorithm's multiply-adds × 2. Maps are fp32; the kernels' dots run as tf32x3 (a third of the
TF32 tensor-core peak), torch's fp32 matmul on the FP32 units (its default, allow_tf32 = False). Peaks are
in cocofast/ops/similarity/auto.py (H100 SXM 3.35 TB/s, A100 SXM 2.0 TB/s). `auto_picks` is what backend='auto'
runs on that GPU at that shape.

    python bench/bench_roofline.py [--quick] [--no-count] [--out bench/results/roofline.csv]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import environment, run_child, write_csv

BATCH, N_PIX = 8, 65_536
SIMILARITY_CHANNELS = (24, 64, 256)
PIXEL_RELATION_PAIRS = ((256, 24), (256, 64))  # FANet teacher against each student
PROBE_SIDE = {"gram": 32, "tiled": 16, "pixel_relation": 16}  # interpreter time grows as N² for the last two
MODEL_GPUS = ("H100", "A100")


def run_case(path: str, c1: int, c2: int, side: int) -> dict:
    """Runs in a child with the interpreter: DRAM-model bytes of one kernel path on (1, C, side, side) maps."""
    from cocofast.perf.traffic import path_traffic

    r = path_traffic(path, c1, c2, side=side)
    return {"forward": r["forward"].dram_bytes, "backward": r["backward"].dram_bytes}


def kernel_bytes(path: str, c1: int, c2: int) -> dict | None:
    """{forward, backward} DRAM bytes of one path at the full shape, or None without cocofast.perf.traffic.

    For the Gram kernels, counted at two sizes (N = 1,024 and 2,304, where the forward's row splits are the
    same, so the fit is exact) and fitted as a + b·N per image: their C×C Grams weigh as much as the maps at
    N = 1,024 and C = 256, so a plain multiple of the small count would overstate the large one. The
    N²-work paths are compute-bound by orders of magnitude; one count, scaled by N, serves."""
    try:
        import cocofast.perf.traffic  # noqa: F401 - only whether it exists
    except ImportError:
        return None
    os.environ["COCOFAST_GPU_CONFIG"] = "1"  # the tiles a GPU would launch, so re-reads are a GPU's
    sides = (PROBE_SIDE[path], PROBE_SIDE[path] * 3 // 2) if path == "gram" else (PROBE_SIDE[path],)
    counts = []
    for side in sides:
        res = run_child("bench_roofline", dict(path=path, c1=c1, c2=c2, side=side), timeout=900, interpret=True)
        if "error" in res:
            return None
        counts.append((side * side, res))
    out = {}
    for phase in ("forward", "backward"):
        if len(counts) == 2:
            (n_a, a), (n_b, b) = counts
            slope = (b[phase] - a[phase]) / (n_b - n_a)
            out[phase] = BATCH * (a[phase] + slope * (N_PIX - n_a))
        else:
            n_a, a = counts[0]
            out[phase] = BATCH * a[phase] * N_PIX / n_a
    return out


def kernel_steps(path: str, c1: int, c2: int, counted: dict | None):
    from cocofast.ops.similarity.auto import triton_gram_steps
    from cocofast.perf.roofline import walk_steps

    if path == "gram":
        if counted is None:
            return (triton_gram_steps(BATCH, N_PIX, c1, c2),
                    "pass-count defaults (cocofast/ops/similarity/auto.py)")
        return (triton_gram_steps(BATCH, N_PIX, c1, c2, forward_bytes=counted["forward"],
                                  backward_bytes=counted["backward"]),
                "cocofast.perf.traffic DRAM model, fitted over N = 1,024 and 2,304")
    if counted is None:
        return None, "not counted: cocofast.perf.traffic unavailable"
    steps = walk_steps(path, BATCH, N_PIX, c1, c2, counted["forward"], counted["backward"])
    return steps, f"cocofast.perf.traffic DRAM model at N = {PROBE_SIDE[path] ** 2:,}, scaled by N"


def counted_over_model(c1: int, c2: int) -> float:
    """The eager gram path's listed passes against the bytes its ops actually move, at B = 2, N = 4,096."""
    import torch

    from cocofast.ops.similarity.gram_torch import TorchGramStats, traffic
    from cocofast.perf.traffic import TrafficCounter

    f1 = torch.randn(2, c1, 64, 64).relu_().requires_grad_(True)
    f2 = torch.randn(2, c2, 64, 64).requires_grad_(True)
    with TrafficCounter() as counter:
        torch.aminmax(f1.detach()), torch.aminmax(f2.detach())
        k, p, q = TorchGramStats.apply(f1, f2, True, 1e-6)
        (k / (p * q).sqrt()).sum().backward()
    return counter.total_bytes / sum(b for _, b, _ in traffic(2, 64 * 64, c1, c2))


def row(path, c1, c2, steps, source, gpu_key) -> dict:
    from cocofast.ops.similarity.auto import GPUS
    from cocofast.perf.roofline import breakdown

    gpu = GPUS[gpu_key]
    b = breakdown(steps, gpu)
    return {"path": path, "gpu": gpu.name, "batch": BATCH, "N": N_PIX, "C1": c1, "C2": c2, "maps": "fp32",
            "bytes_source": source, "GB": round(b["bytes"] / 1e9, 3), "GFLOP": round(b["flops"] / 1e9, 1),
            "math": b["math"], "memory_ms": round(b["memory_s"] * 1e3, 3),
            "compute_ms": round(b["compute_s"] * 1e3, 3), "modelled_ms": round(b["modelled_s"] * 1e3, 3),
            "bound": b["bound"]}


def main(argv=None) -> list[dict]:
    from cocofast.ops.similarity.auto import GPUS, faster_backend, gram_torch_steps, modelled_time

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the gram paths only (no tiled / pixel-relation counts)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "roofline.csv")
    ap.add_argument("--no-count", action="store_true",
                    help="skip the interpreter counts (minutes); the kernels' pass-count defaults stand in")
    args, _ = ap.parse_known_args(argv)
    count = (lambda *a: None) if args.no_count else kernel_bytes
    rows = []
    for c in SIMILARITY_CHANNELS:
        eager = gram_torch_steps(BATCH, N_PIX, c, c, matmul_math="fp32")
        check = round(counted_over_model(c, c), 3)
        fused, source = kernel_steps("gram", c, c, count("gram", c, c))
        tiled = None if args.quick else kernel_steps("tiled", c, c, count("tiled", c, c))
        for g in MODEL_GPUS:
            times = {"triton": modelled_time(fused, GPUS[g]), "gram": modelled_time(eager, GPUS[g])}
            r_eager = row("gram (eager torch)", c, c, eager, "cocofast.ops.similarity.gram_torch.traffic", g)
            r_eager["counted_over_model"] = check
            r_fused = row("triton (fused Gram kernels)", c, c, fused, source, g)
            r_fused["triton_over_gram"] = round(times["triton"] / times["gram"], 3)
            r_fused["auto_picks"] = faster_backend(times)
            rows += [r_eager, r_fused]
            if tiled and tiled[0]:
                rows.append(row("tiled (flash-style kernels)", c, c, tiled[0], tiled[1], g))
    if not args.quick:
        for ct, cs in PIXEL_RELATION_PAIRS:
            steps, source = kernel_steps("pixel_relation", ct, cs, count("pixel_relation", ct, cs))
            for g in MODEL_GPUS:
                if steps:
                    rows.append(row("pixel relation (flash-style KL)", ct, cs, steps, source, g))
    for r in rows:
        print(" | ".join(f"{k}={v}" for k, v in r.items() if k not in ("batch", "N", "maps")), flush=True)
    write_csv(args.out, rows, environment())
    return rows


if __name__ == "__main__":
    main()
