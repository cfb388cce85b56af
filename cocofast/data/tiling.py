"""Window arithmetic shared by patch tiling (training) and sliding-window inference.

One rule everywhere: windows start every `stride` pixels and the last window is pulled back
so that it ends exactly on the image border. Every pixel is covered, no window sticks out of
the image, and a 2048-pixel side cut into 1024-pixel patches gives starts (0, 1024).
"""
from __future__ import annotations

import math


def resolve_stride(patch: int, stride: int | None = None, overlap: int | None = None) -> int:
    """Stride in pixels from either a stride or an overlap (patch - stride); default: no overlap."""
    if patch < 1:
        raise ValueError(f"patch size must be a positive number of pixels, got {patch}")
    if stride is not None and overlap is not None:
        raise ValueError(f"give either stride ({stride}) or overlap ({overlap}), not both")
    if overlap is not None:
        if not 0 <= overlap < patch:
            raise ValueError(f"overlap must be in [0, patch size {patch}), got {overlap}")
        stride = patch - overlap
    if stride is None:
        stride = patch
    if stride < 1:
        raise ValueError(f"stride must be a positive number of pixels, got {stride}")
    return int(stride)


def stride_from_fraction(window: int, overlap: float) -> int:
    """Stride for a fractional overlap in [0, 1), as sliding-window inference takes it.

    Same rounding as MONAI's `int(window * (1 - overlap))`, never below 1 pixel.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be a fraction in [0, 1), got {overlap}")
    return max(1, int(window * (1.0 - overlap)))


def axis_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows along one axis of `length` pixels.

    A side shorter than the window gets one window at 0 (the caller pads). Otherwise windows start
    at 0, stride, 2*stride, ... and the last one is clamped to `length - window`.
    """
    if length < 1 or window < 1 or stride < 1:
        raise ValueError(f"length, window and stride must be positive, got {length}, {window}, {stride}")
    if length <= window:
        return [0]
    count = math.ceil((length - window) / stride) + 1
    return [min(i * stride, length - window) for i in range(count)]


def first_cover_offsets(starts: list[int], window: int) -> list[int]:
    """For windows at `starts` (increasing) along one axis, where inside each one the pixels no earlier window
    covers begin: 0 for the first, and for a last window pulled back to the border, the part it shares with
    the one before. Evaluation that counts a window's pixels from there on scores every pixel exactly once."""
    return [0] + [max(0, before + window - start) for before, start in zip(starts, starts[1:])]


def patch_grid(height: int, width: int, patch: int | tuple[int, int],
               stride: int | tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """(top, left) of every patch covering a height x width image, row by row."""
    ph, pw = _pair(patch)
    sh, sw = _pair(stride) if stride is not None else (ph, pw)
    return [(top, left) for top in axis_starts(height, ph, sh) for left in axis_starts(width, pw, sw)]


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"expected an int or a (height, width) pair, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)
