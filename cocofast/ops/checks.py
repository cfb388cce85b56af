"""Input checks shared by cocofast's similarity and pixel-relation ops, and the memory probe they use.

Each check raises ValueError naming the function, the argument and its shape, and what was expected.
"""
from __future__ import annotations

import math
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class NaiveTooLargeError(MemoryError):
    """A naive backend was asked for N×N matrices that would not fit in memory."""


def shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 accumulation, or fp64 when any input is fp64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def largest_safe_magnitude(channels: int, acc: torch.dtype) -> float:
    """The largest |value| whose row norm over `channels` entries cannot overflow `acc`.

    Each pixel's norm sums C squares in the accumulation dtype, so C·x² must stay below its largest value;
    beyond that the norm is Inf and every normalised row is 0 or NaN.
    """
    return math.sqrt(torch.finfo(acc).max / channels)


def check_map(fn: str, name: str, t, values: bool = True) -> None:
    """`t` is a non-empty floating (B, C, H, W) tensor whose row norms are finite in the accumulation dtype.

    With values=False only the type, shape and dtype are checked: a caller whose kernels find the extrema
    in a pass they make anyway hands them to `check_extrema` (no extra read of the map)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: `{name}` must be a torch.Tensor of shape (B, C, H, W), got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{fn}: `{name}` must have 4 dimensions (B, C, H, W), got shape {shape_str(t)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{fn}: `{name}` has dtype {t.dtype}; expected float16, bfloat16, float32 or float64 "
                         f"(shape {shape_str(t)})")
    if t.numel() == 0:
        raise ValueError(f"{fn}: `{name}` is empty, shape {shape_str(t)}")
    if values:
        # One pass, no input-sized temporary: NaN propagates into both ends, ±Inf into one.
        lo, hi = (v.item() for v in torch.aminmax(t.detach()))
        check_extrema(fn, name, t, lo, hi, math.isnan(lo) or math.isnan(hi))


def check_extrema(fn: str, name: str, t: torch.Tensor, lo: float, hi: float, has_nan: bool) -> None:
    """The value part of check_map, from the map's minimum, maximum and whether it holds a NaN."""
    if has_nan:
        raise ValueError(f"{fn}: `{name}` (shape {shape_str(t)}) contains NaN")
    if math.isinf(lo) or math.isinf(hi):
        raise ValueError(f"{fn}: `{name}` (shape {shape_str(t)}) contains Inf")
    acc = accumulation_dtype(t)
    check_magnitude(fn, name, t, max(-lo, hi), largest_safe_magnitude(t.shape[1], acc),
                    f"the {str(acc)[6:]} accumulation of squares in the row norms overflows above {{limit}} for "
                    f"C={t.shape[1]} channels")


def check_magnitude(fn: str, name: str, t: torch.Tensor, largest: float, limit: float, overflow: str) -> None:
    """Refuse finite values too large for the arithmetic: `overflow` says what overflows above {limit}."""
    if largest > limit:
        raise ValueError(f"{fn}: `{name}` (shape {shape_str(t)}) has values up to {largest:.3g} in magnitude, "
                         f"finite but too large: {overflow.format(limit=f'{limit:.3g}')}; rescale the features")


def extrema_check(fn: str, names: tuple[str, str], a: torch.Tensor, b: torch.Tensor):
    """A callback for kernels that find per-channel extrema themselves: check(f, amin, amax, nans), each a
    (B, C) tensor, raises as check_map would for whichever of `a`, `b` is `f`."""
    def check(f, amin, amax, nans):
        lo, hi, n_nan = torch.stack([amin.min(), amax.max(), nans.sum().to(amin.dtype)]).tolist()
        check_extrema(fn, names[0] if f is a else names[1], f, lo, hi, n_nan > 0 or math.isnan(lo + hi))

    return check


def check_pair(fn: str, names: tuple[str, str], a: torch.Tensor, b: torch.Tensor, values: bool = True) -> None:
    """Two maps of one op: each valid, with equal batch, equal pixel count H·W, on one device."""
    check_map(fn, names[0], a, values)
    check_map(fn, names[1], b, values)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{fn}: `{names[0]}` and `{names[1]}` have different batch sizes: shapes {shape_str(a)} "
                         f"and {shape_str(b)}")
    if a.shape[2] * a.shape[3] != b.shape[2] * b.shape[3]:
        raise ValueError(f"{fn}: `{names[0]}` and `{names[1]}` must have the same number of pixels H·W: shapes "
                         f"{shape_str(a)} and {shape_str(b)} ({a.shape[2] * a.shape[3]} vs "
                         f"{b.shape[2] * b.shape[3]})")
    if a.device != b.device:
        raise ValueError(f"{fn}: `{names[0]}` is on {a.device} but `{names[1]}` is on {b.device}")


def available_host_memory() -> int:
    """Bytes the kernel says a new allocation can get without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def available_memory(device: torch.device) -> int:
    """Free bytes on `device`: the CUDA allocator's view on a GPU, MemAvailable on the host."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_host_memory()


def check_naive_fits(fn: str, *, batch: int, n_pix: int, matrices: int, element_bytes: int,
                     device: torch.device, alternatives: str) -> None:
    """Raise NaiveTooLargeError, before anything is allocated, when `matrices` sets of B N×N would not fit."""
    need = batch * n_pix * n_pix * element_bytes * matrices
    avail = available_memory(device)
    if need > avail:
        raise NaiveTooLargeError(
            f"{fn}(backend='naive') would materialise {matrices} sets of B={batch} N×N matrices with N={n_pix} "
            f"(about {need / 2**30:.1f} GiB) but only {avail / 2**30:.1f} GiB is available on {device}; "
            f"use {alternatives}, which never store N×N")


__all__ = ["FLOAT_DTYPES", "NaiveTooLargeError", "accumulation_dtype", "available_host_memory",
           "available_memory", "check_extrema", "check_magnitude", "check_map", "extrema_check", "check_naive_fits", "check_pair", "largest_safe_magnitude",
           "shape_str"]
