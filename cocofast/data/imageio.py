"""Reading images and masks from disk: cheap header checks, full decodes, and uniform arrays.

PNG and JPEG go through Pillow, TIFF through tifffile (first page, i.e. full resolution).
Images come out as the stored arrays (`read_array`; `normalise` turns them into float32 (C, H, W) in
[0, 1]); masks as the raw integer values stored in the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# TIFF-based slide formats tifffile reads level by level (with imagecodecs for their JPEG/LZW/JPEG 2000 tiles).
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff")
# Slide formats only OpenSlide reads.
OPENSLIDE_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide")
# The mask label of pixels that count in no loss and no metric (cocofast.losses' IGNORE_INDEX): unlabelled
# slide tissue, padding beyond a slide's edge, pixels an earlier evaluation patch already scored.
IGNORE = 255


@dataclass(frozen=True)
class Header:
    height: int
    width: int
    channels: int


def is_tiff(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in TIFF_SUFFIXES


def read_header(path: str | os.PathLike) -> Header:
    """Size and channel count without decoding pixels; raises ValueError on unreadable or truncated files.

    Truncation is caught from the file's tail: PNG must end with its IEND chunk, JPEG with an EOI
    marker, and every TIFF strip or tile must lie inside the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ValueError(f"cannot read: {err.strerror}") from None
    if size == 0:
        raise ValueError("empty file (0 bytes)")
    if is_tiff(path):
        return _tiff_header(path, size)
    try:
        with Image.open(path) as img:
            width, height = img.size
            fmt, mode = img.format, img.mode
            channels = len(img.getbands()) if mode != "P" else 3
    except Exception as err:  # Pillow raises several types for junk input
        raise ValueError(f"not a readable image ({type(err).__name__}: {err})") from None
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 1024))
        tail = fh.read()
    if fmt == "PNG" and b"IEND" not in tail[-64:]:
        raise ValueError("truncated PNG (no IEND chunk at the end of the file)")
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        raise ValueError("truncated JPEG (no end-of-image marker at the end of the file)")
    return Header(height, width, channels)


def _tiff_header(path: Path, size: int) -> Header:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            shape = dict(zip(page.axes, page.shape))
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
    except Exception as err:
        raise ValueError(f"not a readable TIFF ({type(err).__name__}: {err})") from None
    if any(end > size for end in ends):
        raise ValueError(f"truncated TIFF (image data runs to byte {max(ends)} of a {size}-byte file)")
    if "Y" not in shape or "X" not in shape:
        raise ValueError(f"TIFF first page has axes {page.axes!r}, expected a 2-D image")
    return Header(shape["Y"], shape["X"], shape.get("S", 1))


def read_array(path: str | os.PathLike, palette_as: str = "indices") -> np.ndarray:
    """Decode a whole file to (H, W) or (H, W, C) in its stored dtype.

    Palette images give their indices (what a palette mask stores) or, with palette_as="colours",
    the RGB(A) colours (what a palette photo shows).
    """
    path = Path(path)
    if is_tiff(path):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            array = page.asarray()
            axes = page.axes
        if "S" in axes and axes.index("S") < axes.index("Y"):  # planar storage: samples first
            array = np.moveaxis(array, axes.index("S"), -1)
        return np.squeeze(array) if array.ndim > 3 else array
    with Image.open(path) as img:
        if img.mode == "P" and palette_as == "colours":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif img.mode == "1":
            img = img.convert("L")  # bilevel: 0/255 like an 8-bit binary mask
        elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("RGB")
        return np.asarray(img)


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Raw mask values (H, W). Colour masks are accepted only when all channels are equal."""
    array = read_array(path)
    if array.ndim == 3:
        first = array[:, :, 0]
        if not all(np.array_equal(first, array[:, :, c]) for c in range(1, array.shape[2])):
            raise ValueError(f"mask has {array.shape[2]} differing colour channels; expected one channel "
                             "of class values (grayscale or palette)")
        array = first
    if array.ndim != 2:
        raise ValueError(f"mask has shape {array.shape}; expected (height, width)")
    if not np.issubdtype(array.dtype, np.integer):
        if array.dtype == bool:
            array = array.astype(np.uint8)
        elif np.all(np.mod(array, 1) == 0):
            array = array.astype(np.int64)
        else:
            raise ValueError(f"mask holds non-integer values (dtype {array.dtype})")
    return array
