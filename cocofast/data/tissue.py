"""Tissue versus glass: a threshold found on a slide's thumbnail, applied at any resolution.

Two measures, as the pathology tools use them (histolab's and TIAToolbox's Otsu tissue masks):
  * "saturation": HSV saturation (max - min) / max of RGB; glass is bright and grey (near 0), stained tissue
    is coloured. The default for H&E.
  * "od": optical density -log10(I / I_max) averaged over channels; glass transmits everything (near 0),
    tissue absorbs. Also works for grayscale slides, which have no saturation.
The threshold is Otsu's (the split of the thumbnail's 256-bin histogram that maximises the between-class
variance) unless one is given. The thumbnail is block means of the slide's coarsest level, read band by band,
at most `max_side` pixels on its longer side, so memory is the thumbnail's whatever the slide's size.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .slides import DownscaledReader, full_scale, open_reader

METHODS = ("saturation", "od")
THUMBNAIL_SIDE = 1024
OD_MAX = 2.5  # optical densities are clipped here (1/316 of the light): darker is as dark as it gets


def tissue_measure(pixels: np.ndarray, method: str = "saturation", stored_dtype=None) -> np.ndarray:
    """(h, w) float32 tissue measure of stored pixels (h, w, C): larger is more tissue-like."""
    if method not in METHODS:
        raise ValueError(f"tissue method {method!r}: expected one of {', '.join(METHODS)}")
    stored_dtype = pixels.dtype if stored_dtype is None else stored_dtype
    unit = pixels[..., :3].astype(np.float32) / full_scale(stored_dtype)
    if method == "saturation":
        if unit.shape[-1] < 3:
            raise ValueError("a grayscale slide has no saturation; use tissue method 'od'")
        high, low = unit.max(axis=-1), unit.min(axis=-1)
        return np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0).astype(np.float32)
    od = -np.log10(np.clip(unit, 10 ** -OD_MAX, 1.0))
    return od.mean(axis=-1).astype(np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of `values` (a 256-bin histogram over their range); tissue is above it."""
    values = values[np.isfinite(values)].ravel()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return high
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts).astype(np.float64)
    total = weight[-1]
    mass = np.cumsum(counts * centres)
    w0, w1 = weight[:-1], total - weight[:-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean0 = mass[:-1] / w0
        mean1 = (mass[-1] - mass[:-1]) / w1
        between = w0 * w1 * (mean0 - mean1) ** 2
    between = np.nan_to_num(between, nan=-1.0)
    return float(edges[1:][:-1][int(np.argmax(between))])


@dataclass
class TissueMask:
    """A slide's tissue mask at thumbnail resolution: `mask[r, c]` covers level-0 pixels
    [c * scale, (c + 1) * scale) x [r * scale, (r + 1) * scale)."""

    mask: np.ndarray  # (h, w) bool
    scale: float  # level-0 pixels per thumbnail pixel
    threshold: float
    method: str

    def of_pixels(self, pixels: np.ndarray, stored_dtype=None) -> np.ndarray:
        """The same threshold applied to pixels of any resolution: (h, w) bool."""
        return tissue_measure(pixels, self.method, stored_dtype) > self.threshold


def thumbnail(path: str | os.PathLike, reader_kind: str = "auto", max_side: int = THUMBNAIL_SIDE):
    """(thumbnail (h, w, C) float32 in stored units, stored dtype, level-0 pixels per thumbnail pixel)."""
    base = open_reader(path, reader_kind)
    shapes = base.level_shapes
    base.close()
    level = len(shapes) - 1
    reader = open_reader(path, reader_kind, level)
    try:
        factor = max(1, math.ceil(max(reader.height, reader.width) / max_side))
        small = DownscaledReader(reader, factor) if factor > 1 else reader
        rows = max(1, (1 << 20) // max(small.width, 1))
        bands = [small.read(top, 0, rows, small.width).astype(np.float32) for top in range(0, small.height, rows)]
        scale = shapes[0][1] / reader.width * factor
        return np.concatenate(bands), reader.dtype, scale
    finally:
        reader.close()


def tissue_mask(path: str | os.PathLike, method: str = "saturation", threshold: float | None = None,
                reader_kind: str = "auto", max_side: int = THUMBNAIL_SIDE) -> TissueMask:
    """The tissue of the slide at `path`: its thumbnail's `method` measure above `threshold` (None: Otsu's)."""
    pixels, dtype, scale = thumbnail(path, reader_kind, max_side)
    measure = tissue_measure(pixels, method, dtype)
    if threshold is None:
        threshold = otsu_threshold(measure)
    return TissueMask(measure > threshold, scale, float(threshold), method)
