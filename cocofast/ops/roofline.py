"""Modelled GPU time of a backend, and the `auto` decision built on it.

Each step (one kernel launch, or one eager torch op) takes max(bytes / HBM bandwidth, FLOPs / peak) on the
device's datasheet figures; a backend's time is the sum over its steps. This is a roofline: it ignores
launch overhead, caches and occupancy, so it ranks backends by the work they must move and compute, which is
what separates the fused kernels from the eager torch path at a given shape.

Datasheet peaks (dense, no sparsity), SXM parts:
    H100   HBM3 3.35 TB/s;  FP32 67 TFLOP/s; TF32 tensor 494.7; BF16 tensor 989.4
    H200   HBM3e 4.8 TB/s;  same compute as H100
    A100   HBM2e 2.0 TB/s (80 GB: 2.039);  FP32 19.5; TF32 156; BF16 312
Triton's fp32 dots run as tf32x3 (three TF32 MMAs for fp32 accuracy): a third of the TF32 peak. torch's fp32
matmul runs on the FP32 units unless torch.backends.cuda.matmul.allow_tf32 is set, which the model reads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cocofast.gram_torch import traffic as gram_torch_traffic


@dataclass(frozen=True)
class GPUSpec:
    name: str
    hbm_bytes_per_s: float
    fp32_flops_per_s: float
    tf32_flops_per_s: float
    bf16_flops_per_s: float

    def peak(self, math: str) -> float:
        """FLOP/s of one arithmetic kind: 'fp32' (SIMT), 'tf32', 'tf32x3' or 'bf16' (tensor cores)."""
        peaks = {"fp32": self.fp32_flops_per_s, "tf32": self.tf32_flops_per_s,
                 "tf32x3": self.tf32_flops_per_s / 3, "bf16": self.bf16_flops_per_s}
        if math not in peaks:
            raise ValueError(f"math must be one of {', '.join(peaks)}; got {math!r}")
        return peaks[math]


GPUS = {
    "H100": GPUSpec("H100 SXM", 3.35e12, 67e12, 494.7e12, 989.4e12),
    "H200": GPUSpec("H200 SXM", 4.8e12, 67e12, 494.7e12, 989.4e12),
    "A100": GPUSpec("A100 SXM", 2.0e12, 19.5e12, 156e12, 312e12),
}


@dataclass(frozen=True)
class Step:
    """One launch: bytes it moves through HBM, FLOPs it computes, and on which units ('fp32', 'tf32x3', ...)."""
    name: str
    bytes: float
    flops: float = 0.0
    math: str = "fp32"


def step_time(step: Step, gpu: GPUSpec) -> float:
    compute = step.flops / gpu.peak(step.math) if step.flops else 0.0
    return max(step.bytes / gpu.hbm_bytes_per_s, compute)


def modelled_time(steps, gpu: GPUSpec) -> float:
    """Seconds: the sum over steps of max(bytes / bandwidth, FLOPs / peak)."""
    return sum(step_time(s, gpu) for s in steps)


def torch_matmul_math() -> str:
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def gram_torch_steps(batch: int, n_pix: int, c1: int, c2: int, element_bytes: int = 4,
                     matmul_math: str | None = None) -> list[Step]:
    """The eager `gram` path (cocofast.gram_torch) as steps: its GEMMs at the matmul peak, its streaming passes
    at bandwidth. Bytes and FLOPs are those `gram_torch.traffic` lists for its own passes."""
    math = matmul_math or torch_matmul_math()
    return [Step(name, nbytes, flops, math) for name, nbytes, flops in
            gram_torch_traffic(batch, n_pix, c1, c2, element_bytes)]


# Passes over both N×C maps of the fused kernels, as cocofast.kernels.traffic counts them (DRAM model, each
# byte once per launch), fitted as a + b·N over N = 1,024 and 2,304 and taken to N = 65,536 (C = 24 to
# 256): forward 2.02-2.04 (the channel max, then one Gram pass), backward 1.01-1.02 × (maps + gradients),
# i.e. one read of each map and one write of its gradient. bench/bench_roofline.py recounts them at every run.
TRITON_FORWARD_PASSES = 2.04
TRITON_BACKWARD_PASSES = 1.04  # reads of the maps; the gradient write is the + 1 below
GRAM_TILE = 64  # the kernels' channel tile: the symmetric Grams compute the upper tile pairs only


def triton_gram_steps(batch: int, n_pix: int, c1: int, c2: int, element_bytes: int = 4, *,
                      forward_bytes: float | None = None, backward_bytes: float | None = None,
                      math: str = "tf32x3") -> list[Step]:
    """The fused `triton` path: one forward and one backward step. Bytes default to the pass counts above;
    pass counted figures (kernels/traffic.py) as forward_bytes / backward_bytes to model the kernels as they
    are. FLOPs: the forward forms K in full and S₁, S₂ on their upper channel-tile pairs; the backward
    evaluates dÂ = Â·S + Â'·K once per map (a GEMM with inner dimension C₁ + C₂)."""
    maps = batch * n_pix * (c1 + c2) * element_bytes
    fwd_bytes = maps * TRITON_FORWARD_PASSES if forward_bytes is None else forward_bytes
    bwd_bytes = maps * (TRITON_BACKWARD_PASSES + 1) if backward_bytes is None else backward_bytes
    upper = lambda c: min(c * c, c * (c + GRAM_TILE) / 2)  # noqa: E731
    fwd_flops = 2 * batch * n_pix * (upper(c1) + upper(c2) + c1 * c2)
    bwd_flops = 2 * batch * n_pix * (c1 + c2) * (c1 + c2)
    return [Step("triton forward", fwd_bytes, fwd_flops, math), Step("triton backward", bwd_bytes, bwd_flops, math)]


def gpu_spec(device_name: str) -> GPUSpec:
    """The datasheet of a CUDA device by name; H100 figures for a device not in the table."""
    return next((spec for key, spec in GPUS.items() if key in device_name), GPUS["H100"])


def faster_backend(times: dict[str, float]) -> str:
    """The backend with the least modelled time; on a tie, the one listed first."""
    if not times:
        raise ValueError("faster_backend: `times` is empty; expected {backend name: seconds}")
    return min(times, key=lambda name: (times[name], list(times).index(name)))


def similarity_auto_backend(f1: torch.Tensor, f2: torch.Tensor) -> str:
    """What backend='auto' runs for two maps: `gram` off CUDA; on CUDA `triton` where its modelled time is
    lower than the eager `gram` path's, else `gram`."""
    if not f1.is_cuda:
        return "gram"
    gpu = gpu_spec(torch.cuda.get_device_name(f1.device))
    shape = (f1.shape[0], f1.shape[2] * f1.shape[3], f1.shape[1], f2.shape[1], f1.element_size())
    return faster_backend({"triton": modelled_time(triton_gram_steps(*shape), gpu),
                           "gram": modelled_time(gram_torch_steps(*shape), gpu)})


__all__ = ["GPUS", "GPUSpec", "Step", "TRITON_BACKWARD_PASSES", "TRITON_FORWARD_PASSES", "faster_backend",
           "gpu_spec", "gram_torch_steps", "modelled_time", "similarity_auto_backend", "step_time",
           "torch_matmul_math", "triton_gram_steps", "GRAM_TILE"]
