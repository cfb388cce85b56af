"""Launch helpers shared by the cocofast Triton kernels.

Every launch goes through `launch`. Inside `record_only()` it records what would be launched (kernel,
argument types, constexprs, options, Triton's specialisation) instead of running it, so that the compile
guard (cocofast/perf/gpu_compile.py) can compile exactly those specialisations for sm_80 and sm_90 on a
machine without a GPU: the CPU interpreter accepts code that a GPU rejects, so that compile is the guard.
Outside it, a launch does no bookkeeping: describing the arguments costs host time on every call.
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import native_specialize_impl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tile sizes and dot precision as a GPU would use them. Off in the interpreter (big tiles run faster
# there); COCOFAST_GPU_CONFIG=1 forces them, so the compile check sees the launches a GPU would get, and
# `gpu_tiles()` switches them for one block of code (a test of the shipped configuration).
GPU_CONFIG = not INTERPRETED or os.environ.get("COCOFAST_GPU_CONFIG", "0") == "1"

# (module, kernel name, signature, constexprs, options, specialisation) of every distinct launch made
# inside record_only(); options are the launch's num_warps / num_stages and specialisation what Triton's JIT makes of the
# runtime arguments ({name: "1"} for an integer equal to 1, which becomes a constant; {name: "D"} for an
# integer divisible by 16 or a 16-byte aligned pointer, which gets an alignment hint): the compile check
# must reproduce all of them, since each changes the code ptxas sees.
LAUNCHED: dict[tuple, tuple[str, str, dict, dict, dict, dict]] = {}
# While set, `launch` records and returns without running the kernel (record_only()).
RECORD_ONLY = False

_TRITON_TYPES = {
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.int32: "*i32",
    torch.int64: "*i64",
}
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def gpu_config() -> bool:
    """Whether launches use the GPU tiles, row splits and tf32x3 dots (always on CUDA)."""
    return GPU_CONFIG


@contextlib.contextmanager
def gpu_tiles(enabled: bool = True):
    """Launch with the GPU configuration (or the interpreter's) inside the block, without reloading modules:
    every config below reads the switch at launch time."""
    global GPU_CONFIG
    before = GPU_CONFIG
    GPU_CONFIG = bool(enabled)
    try:
        yield
    finally:
        GPU_CONFIG = before


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 accumulation, or fp64 when any input is fp64 (used by gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def dot_precision(acc: torch.dtype) -> str:
    # tf32x3 keeps fp32 accuracy (~1e-6 relative) while using tensor cores; plain tf32 would not meet
    # the 1e-5 contract. The interpreter computes in full precision anyway.
    if acc == torch.float64 or not GPU_CONFIG:
        return "ieee"
    return "tf32x3"


def check_runnable(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    if dev.type == "cuda":
        return
    if not INTERPRETED:
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors; these are on {dev}. Use backend='gram' on CPU, or set "
            "TRITON_INTERPRET=1 before importing cocofast to run the kernels in Triton's CPU interpreter."
        )


def _signature_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return _TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot describe kernel argument of type {type(value).__name__}")


def jit_specialisation(args: dict) -> dict:
    """What Triton's JIT specialises on among `args`, by its own rule (runtime.jit.native_specialize_impl):
    "1" for an integer equal to 1 (compiled as a constant), "D" for a 16-divisible integer or a 16-byte
    aligned pointer (tt.divisibility = 16)."""
    out = {}
    for name, value in args.items():
        if isinstance(value, bool) or isinstance(value, float):
            continue  # never specialised
        kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
        if kind == "constexpr":
            out[name] = "1"
        elif attr == "D":
            out[name] = "D"
    return out


@contextlib.contextmanager
def record_only():
    """Inside the block, launches are recorded and not run: the compile guard records production shapes
    (B = 8, 256² maps) this way, which the interpreter would take hours to run. Outputs are left unwritten."""
    global RECORD_ONLY
    before, RECORD_ONLY = RECORD_ONLY, True
    try:
        yield
    finally:
        RECORD_ONLY = before


def launch(kernel, grid, args: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
           maxnreg: int = 0) -> None:
    """Launch `kernel` with keyword `args` (runtime values), `constexprs` and launch options (maxnreg: a
    register cap for ptxas, 0 for its own choice); inside record_only() the spec is recorded instead."""
    options = {"num_warps": num_warps, "num_stages": num_stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    if not RECORD_ONLY:
        kernel[grid](**args, **constexprs, **options)
        return
    fn = getattr(kernel, "fn", kernel)
    signature = {name: _signature_of(value) for name, value in args.items()}
    special = jit_specialisation(args)
    key = (fn.__module__, fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items(), key=str)),
           tuple(sorted(options.items())), tuple(sorted(special.items())))
    if key not in LAUNCHED:
        LAUNCHED[key] = (fn.__module__, fn.__name__, signature, {k: _plain(v) for k, v in constexprs.items()},
                         options, special)


def _plain(value):
    """Constexprs as JSON-able values (dtypes by name) for the compile check's subprocess."""
    if isinstance(value, tl.dtype):
        return f"tl.{value.name}"
    return value


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


def channel_block(channels: int) -> int:
    """Channel tile of the elementwise row kernels: whole channel range in the interpreter (fewer Python-level
    loop trips), 32 on a GPU (at 64, the two-pass normalisation backward spilled on sm_80 and sm_90)."""
    cap = 32 if GPU_CONFIG else 256
    return max(16, min(cap, next_pow2(channels)))


def row_block(pixels: int) -> int:
    cap = 64 if GPU_CONFIG else 1024
    return max(16, min(cap, next_pow2(pixels)))


class TileConfig(NamedTuple):
    """Tiles and launch options of one kernel launch; `launch(..., **cfg.options)` applies the options."""

    block_rows: int     # pixels per program step (BLOCK_N / BLOCK_I; also BLOCK_J for the N×N walks)
    block_k: int        # channel tile a dot (or a norm) reduces over (BLOCK_K / BLOCK_C)
    block_out: int      # channel tile a program writes (the Gram's C-tile, the walks' BLOCK_D)
    num_warps: int
    num_stages: int
    span: int = 0       # rows one program walks (the Gram backward), a multiple of block_rows
    maxnreg: int = 0    # ptxas register cap per thread; 0 leaves the choice to ptxas

    @property
    def options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages,
                **({"maxnreg": self.maxnreg} if self.maxnreg else {})}


def gram_forward_config(pixels: int, channels: int) -> TileConfig:
    """The fused Gram forward: a (64 × 64) fp32 tile of the concatenated Gram per program, 32 pixels a step.

    GPU, C > 32: 8 warps, 1 stage. The 64×64 fp32 accumulator, the tf32x3 hi/lo operand splits and the
    row-norm loop take 208-255 registers a thread, so one 8-warp CTA runs per SM (16 of 64 warps): the
    wgmma/HMMA pipeline, not latency hiding across CTAs, bounds the loop. 64 pixels a step spilled 3.3 KB on
    sm_80 once the norms and tie counts joined the loop. C ≤ 32 (Mobile U-Net's 24): 32-wide tiles, so no
    dot is mostly padding, and 4 warps (126-168 registers, 3-4 CTAs per SM); with 8 warps ptxas held them
    to 128 registers and spilled 28-64 B on sm_90. The row norms are summed over 16-channel tiles there:
    compiled as a B = 8, 256² launch is specialised (unit pixel stride a constant, aligned pointers), 32-
    channel tiles spilled 16 B (fp32, sm_90) and 8 B (bf16, sm_80); 16-row blocks spilled 4 B on sm_90.
    Above 32 channels the norms use 32-channel tiles. In the interpreter: big tiles (fewer loop trips).
    """
    if not GPU_CONFIG:
        c = max(16, min(256, next_pow2(channels)))
        return TileConfig(row_block(pixels), c, c, 4, 1)
    if channels <= 32:
        return TileConfig(32, 16, 32, 4, 1)
    return TileConfig(32, 32, 64, 8, 1)


def gram_backward_config(pixels: int, channels: int) -> TileConfig:
    """The fused Gram backward: a dÂ row block (BLOCK_N × block_out channels) in registers per step.

    block_out = next_pow2(C) up to 256, so the whole row block is held and dÂ is one GEMM; wider maps take
    128-wide output tiles and two sweeps (gram.py: TWO_PASS; 256-wide ones reached 255 registers and spilled
    4-12 B for bf16 maps at C = 512). GPU, 8 warps: 64 rows at C ≤ 32, 32 at 64 and 128, 16 at 256 (2,048
    to 4,096 fp32 values, 8-16 a thread, beside F and Â of the same block in the epilogue): 165-255
    registers, no spills on sm_80 / sm_90, so one 8-warp CTA per SM. 64 rows at C = 64 spilled 44-396 B on
    sm_80, 32 rows at 256 16-80 B; 16 warps cap a thread at 128 registers and spilled at 512 channels. K
    tiles of 16 channels above C = 32 keep the tf32x3 operand splits small. One program walks 1,024 rows,
    so its dw partial and its re-reads of the C×C operand are 1/1,024 of the map.
    """
    cp = max(16, min(256, next_pow2(channels)))
    if not GPU_CONFIG:
        rows = max(16, min(1024, next_pow2(pixels), (1 << 18) // cp))
        return TileConfig(rows, cp, cp, 4, 1, span=rows)
    rows = {16: 64, 32: 64, 64: 32, 128: 32}.get(cp, 16)
    # Two sweeps (C > 256): left to itself ptxas held the unmixed fp16 / bf16 build of a B = 8, 256² launch
    # to 128 registers on sm_80 (two CTAs per SM) and spilled 44 B; allowed 255 it takes 159 and spills none.
    maxnreg = 255 if channels > 256 else 0
    return TileConfig(rows, 32 if cp <= 32 else 16, cp, 8, 1, span=rows * max(1, 1024 // rows), maxnreg=maxnreg)


def tile_walk_config(pixels: int, channels: int) -> TileConfig:
    """The flash-style N×N walks (tiled CoCo statistics, CPKD pixel relations): 64×64 pixel tiles.

    GPU: per program two 64×64 fp32 similarity tiles, a 64×32 output accumulator (backward) and the tf32x3
    split operands. A 16-channel reduction tile and 8 warps with a single stage keep that at 134-255
    registers without spills: one 8-warp CTA per SM (two warpgroups issuing wgmma on sm_90, as flash
    attention runs), where 32-channel reduction tiles, 4 warps, or a 64-wide output tile spilled on sm_80.
    The price of the 32-wide output tile: the backward rebuilds the relation tiles ⌈C/32⌉ times.
    """
    if not GPU_CONFIG:
        t = max(16, min(256, next_pow2(pixels)))
        return TileConfig(t, max(16, min(256, next_pow2(channels))), max(16, min(256, next_pow2(channels))), 4, 1)
    return TileConfig(max(16, min(64, next_pow2(pixels))), 16, 32, 8, 1)


def feature_strides(f: torch.Tensor, prefix: str = "", width: bool = True) -> dict:
    """Strides and width of a (B, C, H, W) map, as kernel keyword arguments.

    Kernels address pixel n as (n // W, n % W), so any layout works, and two paired maps may have
    different (H, W) with equal H·W: each map carries its own width.
    """
    sb, sc, sh, sw = f.stride()
    out = dict(stride_b=sb, stride_c=sc, stride_h=sh, stride_w=sw)
    if width:
        out["width"] = f.shape[3]
    return {prefix + k: v for k, v in out.items()}


@triton.jit
def load_mixed_tile(f_ptr, w_ptr, stride_c, stride_h, stride_w, width, n_pix, n_chan, rows, chans,
                    ACC: tl.constexpr):
    """Tile of G' = F·diag(w) as (len(rows), len(chans)) in ACC precision; out-of-range entries are 0."""
    pix = (rows // width) * stride_h + (rows % width) * stride_w
    mask = (rows[:, None] < n_pix) & (chans[None, :] < n_chan)
    x = tl.load(f_ptr + pix[:, None] + chans[None, :] * stride_c, mask=mask, other=0.0).to(ACC)
    w = tl.load(w_ptr + chans, mask=chans < n_chan, other=0.0).to(ACC)
    return x * w[None, :]


@triton.jit
def load_inv_norm(norm_ptr, rows, n_pix, eps):
    """1 / max(‖G'_n‖, eps) for the given rows (0 outside the map, so padded rows vanish)."""
    r = tl.load(norm_ptr + rows, mask=rows < n_pix, other=1.0)
    inv = 1.0 / tl.maximum(r, eps)
    return tl.where(rows < n_pix, inv, 0.0)
