"""What backend='auto' runs for the similarity op: the backend with the lower modelled GPU time.

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
L2: H100 / H200 SXM 50 MB, A100 40 MB (whitepapers). The fused path's second forward read of the maps (the
Gram launch after the channel-max launch) comes from L2 only when everything read in between fits in it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cocofast.ops.similarity.gram_torch import traffic as gram_torch_traffic


@dataclass(frozen=True)
class GPUSpec:
    name: str
    hbm_bytes_per_s: float
    fp32_flops_per_s: float
    tf32_flops_per_s: float
    bf16_flops_per_s: float
    l2_bytes: float

    def peak(self, math: str) -> float:
        """FLOP/s of one arithmetic kind: 'fp32' (SIMT), 'tf32', 'tf32x3' or 'bf16' (tensor cores)."""
        peaks = {"fp32": self.fp32_flops_per_s, "tf32": self.tf32_flops_per_s,
                 "tf32x3": self.tf32_flops_per_s / 3, "bf16": self.bf16_flops_per_s}
        if math not in peaks:
            raise ValueError(f"math must be one of {', '.join(peaks)}; got {math!r}")
        return peaks[math]


GPUS = {
    "H100": GPUSpec("H100 SXM", 3.35e12, 67e12, 494.7e12, 989.4e12, 50 * 2**20),
    "H200": GPUSpec("H200 SXM", 4.8e12, 67e12, 494.7e12, 989.4e12, 50 * 2**20),
    "A100": GPUSpec("A100 SXM", 2.0e12, 19.5e12, 156e12, 312e12, 40 * 2**20),
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
    """The eager `gram` path (cocofast.ops.similarity.gram_torch) as steps: its GEMMs at the matmul peak, its
    streaming passes at bandwidth. Bytes and FLOPs are those `gram_torch.traffic` lists for its own passes."""
    math = matmul_math or torch_matmul_math()
    return [Step(name, nbytes, flops, math) for name, nbytes, flops in
            gram_torch_traffic(batch, n_pix, c1, c2, element_bytes)]


# Passes over both N×C maps of the fused kernels as cocofast.perf.traffic counts them with the GPU tiles
# and row splits (DRAM model: each byte once per launch, L2 serving re-reads within a launch), fitted as
# a + b·N over N = 1,024 and 2,304 and taken to N = 65,536, the largest over C₁/C₂ = 24/24, 256/256, 256/24
# rounded up to 0.01: forward 2.057 at 24/24 (2.03 at 256: the channel max, then one Gram pass, plus the
# row splits' partial Grams), backward reads 1.046 at 24/24 (1.015 at 256). tests/test_traffic.py recounts
# the 24/24 figures against these; bench/bench_roofline.py recounts them at every run.
TRITON_FORWARD_PASSES = 2.06
TRITON_BACKWARD_PASSES = 1.05  # reads of the maps; the gradient write is the + 1 below
GRAM_TILE = 64  # the kernels' channel tile: the symmetric Grams compute the upper tile pairs only
# Share of L2 a re-read may count on: the rest holds the C×C partials, the row norms and other streams,
# and the hashed, set-associative L2 evicts before it is full. An assumption, not a measurement.
L2_USABLE = 0.5


def forward_passes(batch: int, n_pix: int, c1: int, c2: int, element_bytes: int, gpu: GPUSpec | None) -> float:
    """DRAM passes over the maps of the fused forward on `gpu`: the counted TRITON_FORWARD_PASSES, one
    fewer when the whole batch's maps (what the channel-max launch reads before the Gram launch re-reads
    it) fit in the usable L2. gpu=None: no L2 (every launch's bytes from DRAM)."""
    maps = batch * n_pix * (c1 + c2) * element_bytes
    if gpu is not None and maps <= L2_USABLE * gpu.l2_bytes:
        return TRITON_FORWARD_PASSES - 1
    return TRITON_FORWARD_PASSES


def triton_gram_steps(batch: int, n_pix: int, c1: int, c2: int, element_bytes: int = 4, *,
                      forward_bytes: float | None = None, backward_bytes: float | None = None,
                      math: str = "tf32x3", gpu: GPUSpec | None = None) -> list[Step]:
    """The fused `triton` path: one forward and one backward step. Bytes default to the pass counts above
    (with `gpu`, the forward's second read is served from its L2 where the maps fit, see forward_passes);
    pass counted figures (cocofast.perf.traffic) as forward_bytes / backward_bytes to model the kernels as they
    are. FLOPs: the forward forms K in full and S₁, S₂ on their upper channel-tile pairs; the backward
    evaluates dÂ = Â·S + Â'·K once per map (a GEMM with inner dimension C₁ + C₂). The backward's read is
    always from DRAM: the rest of the network's backward runs between it and the forward."""
    maps = batch * n_pix * (c1 + c2) * element_bytes
    passes = forward_passes(batch, n_pix, c1, c2, element_bytes, gpu)
    fwd_bytes = maps * passes if forward_bytes is None else forward_bytes
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
    return faster_backend({"triton": modelled_time(triton_gram_steps(*shape, gpu=gpu), gpu),
                           "gram": modelled_time(gram_torch_steps(*shape), gpu)})


__all__ = ["GPUS", "GPUSpec", "GRAM_TILE", "L2_USABLE", "Step", "TRITON_BACKWARD_PASSES", "TRITON_FORWARD_PASSES",
           "faster_backend", "forward_passes", "gpu_spec", "gram_torch_steps", "modelled_time",
           "similarity_auto_backend", "step_time", "torch_matmul_math", "triton_gram_steps"]
