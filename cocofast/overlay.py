"""Prediction overlays: class outlines drawn over the image, so the tissue under a region stays visible.

A pixel of class k > 0 is on the outline when any pixel within `thickness` pixels (a square neighbourhood)
has another class; the outline therefore lies just inside each region, `thickness` pixels wide. The image's
own border is not a boundary (neighbourhoods repeat the edge pixels). Class 0 (background) is never drawn.

Colours are bright and saturated - lime, yellow, cyan, orange, white - which stand out against H&E's pinks
and purples; class k uses OUTLINE_COLOURS[k] (cycling past the end).

    rgb = display_rgb(pixels)                      # stored pixels (any dtype) -> uint8 RGB
    overlay = draw_outlines(rgb, labels)           # whole image
    stream = OutlineStream(height)                 # or band by band, for slides
    for labels_band in bands: top, outline = stream.push(labels_band); paint(rgb_rows(top, len(outline)), outline)
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from cocofast.data.normalise import Normalisation, to_unit_range

OUTLINE_COLOURS = np.array([[0, 0, 0], [0, 255, 0], [255, 255, 0], [0, 255, 255], [255, 140, 0],
                            [255, 255, 255]], dtype=np.uint8)
DEFAULT_THICKNESS = 3


def outline_labels(labels: np.ndarray, thickness: int = DEFAULT_THICKNESS) -> np.ndarray:
    """(H, W) uint8: k on the outline pixels of class k > 0, 0 elsewhere."""
    if thickness < 1:
        raise ValueError(f"outline thickness must be at least 1 pixel, got {thickness}")
    labels = np.asarray(labels)
    size = 2 * thickness + 1
    differs = ndimage.maximum_filter(labels, size=size, mode="nearest") != labels
    differs |= ndimage.minimum_filter(labels, size=size, mode="nearest") != labels
    return np.where(differs & (labels > 0), labels, 0).astype(np.uint8)


def paint_outlines(rgb: np.ndarray, outline: np.ndarray, colours: np.ndarray = OUTLINE_COLOURS) -> np.ndarray:
    """A copy of uint8 RGB rows (n, W, 3) with every outline pixel (class k > 0) set to colours[k]."""
    out = np.array(rgb, dtype=np.uint8, copy=True)
    drawn = outline > 0
    palette = colours[1:]  # class k -> palette[(k - 1) % len]: cycles without ever reusing class 0's slot
    out[drawn] = palette[(outline[drawn].astype(np.int64) - 1) % len(palette)]
    return out


def draw_outlines(rgb: np.ndarray, labels: np.ndarray, thickness: int = DEFAULT_THICKNESS,
                  colours: np.ndarray = OUTLINE_COLOURS) -> np.ndarray:
    """uint8 RGB (H, W, 3) image with the class outlines of `labels` (H, W) drawn over it."""
    rgb = np.asarray(rgb)
    if rgb.shape[:2] != np.shape(labels):
        raise ValueError(f"image {rgb.shape[:2]} and labels {np.shape(labels)} differ in size")
    return paint_outlines(rgb, outline_labels(labels, thickness), colours)


def display_rgb(pixels: np.ndarray, norm: Normalisation | None = None, stats: np.ndarray | None = None) -> np.ndarray:
    """Stored pixels (n, W[, C]) of any dtype -> uint8 RGB as the network saw them (the [0, 1] stage of the
    input rule), so a 16-bit or percentile-normalised slide is shown as it was segmented."""
    pixels = np.asarray(pixels)
    channels = 3 if pixels.ndim == 3 and pixels.shape[2] >= 3 else 1
    norm = norm or Normalisation()
    if norm.mode == "percentile" and (stats is None or stats.shape[1] != channels):
        norm = Normalisation()  # statistics of another channel layout: show the stored range instead
    unit = to_unit_range(pixels, channels, norm, stats=stats if norm.mode == "percentile" else None)
    rgb = np.rint(unit.transpose(1, 2, 0) * 255.0).astype(np.uint8)
    return np.repeat(rgb, 3, axis=2) if channels == 1 else rgb


class OutlineStream:
    """Outlines of a label image that arrives in bands of rows, top to bottom.

    `push(band)` returns (top, outline rows) for the rows that are final: an outline row depends on the
    labels `thickness` rows below it, so output lags input by that many rows, and the last push (the one
    that completes `height` rows) returns the rest. Together the outputs equal `outline_labels` of the
    whole image; memory is one band plus 2 * thickness rows.
    """

    def __init__(self, height: int, thickness: int = DEFAULT_THICKNESS):
        if thickness < 1:
            raise ValueError(f"outline thickness must be at least 1 pixel, got {thickness}")
        self.height, self.thickness = int(height), int(thickness)
        self.held: np.ndarray | None = None  # label rows held_top.. (context above and rows not yet final)
        self.held_top = 0
        self.next_row = 0  # first row not yet returned

    def push(self, band: np.ndarray) -> tuple[int, np.ndarray]:
        band = np.asarray(band)
        self.held = band if self.held is None else np.concatenate([self.held, band])
        received = self.held_top + len(self.held)
        if received > self.height:
            raise ValueError(f"OutlineStream got {received} rows for an image {self.height} rows high")
        ready = received if received == self.height else received - self.thickness
        top = self.next_row
        if ready <= top:
            return top, np.zeros((0, band.shape[1]), np.uint8)
        outline = outline_labels(self.held, self.thickness)[top - self.held_top:ready - self.held_top]
        self.next_row = ready
        keep = max(ready - self.thickness, self.held_top)  # context the next rows' neighbourhoods reach
        self.held = self.held[keep - self.held_top:]
        self.held_top = keep
        return top, outline
