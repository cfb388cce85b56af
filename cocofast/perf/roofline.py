"""Roofline reports: where the modelled GPU time of a path goes, and the N×N walks as steps.

The model itself (datasheet peaks, Step, modelled_time, the fused and eager Gram paths as steps) is what
backend='auto' decides with, so it is runtime code in cocofast.ops.similarity.auto; this module only reads
it. bench/bench_roofline.py writes these reports for every path at 1024² patches.
"""
from __future__ import annotations

from cocofast.ops.similarity.auto import GPUSpec, Step, modelled_time


def breakdown(steps: list[Step], gpu: GPUSpec) -> dict:
    """Bytes, FLOPs, the arithmetic kinds, the time at bandwidth alone and at peak alone (each summed over
    steps), the modelled time (per step the larger of the two) and which bound dominates."""
    memory = sum(s.bytes / gpu.hbm_bytes_per_s for s in steps)
    compute = sum(s.flops / gpu.peak(s.math) for s in steps)
    return {"bytes": sum(s.bytes for s in steps), "flops": sum(s.flops for s in steps),
            "math": "/".join(sorted({s.math for s in steps if s.flops})), "memory_s": memory,
            "compute_s": compute, "modelled_s": modelled_time(steps, gpu),
            "bound": "memory" if memory >= compute else "compute"}


def walk_steps(path: str, batch: int, n_pix: int, c1: int, c2: int, forward_bytes: float,
               backward_bytes: float) -> list[Step]:
    """The flash-style N×N walks ('tiled', 'pixel_relation') as one forward and one backward step, with
    counted bytes (cocofast.perf.traffic) and their FLOPs (multiply-adds × 2, tf32x3 dots):
    tiled forms the M₁ and M₂ tiles forward and rebuilds both per gradient backward; the pixel relation forms
    R_T and R_S forward, rebuilds both backward and forms (G + Gᵀ)Â_S."""
    n2 = batch * n_pix * n_pix
    if path == "tiled":
        fwd_flops, bwd_flops = 2 * n2 * (c1 + c2), 2 * n2 * (c1 + c2) * 3
    elif path == "pixel_relation":
        fwd_flops, bwd_flops = 2 * n2 * (c1 + c2), 2 * n2 * (c1 + c2) + 2 * n2 * c2
    else:
        raise ValueError(f"path must be 'tiled' or 'pixel_relation'; got {path!r}")
    return [Step(f"{path} forward", forward_bytes, fwd_flops, "tf32x3"),
            Step(f"{path} backward", backward_bytes, bwd_flops, "tf32x3")]


__all__ = ["breakdown", "walk_steps"]
