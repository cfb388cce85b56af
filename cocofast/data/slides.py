"""Large images read by region, so memory never holds a whole slide.

Readers share one small interface: `height`, `width`, `channels`, `dtype` (what the file stores),
`mpp` (µm per pixel of the level read, None when the file does not say) and `read(top, left, height,
width)` -> (h, w, channels) array in the stored dtype, clipped to the image. `open_reader(path)` picks one:
  * PNG, JPEG (and anything else Pillow opens): decoded once, since these formats have no random access,
    so they are refused beyond `max_pixels`; 16-bit and float images keep their stored values;
  * TIFF, SVS, NDPI, SCN, BIF through tifffile (with imagecodecs for JPEG, LZW, JPEG 2000 tiles), level by
    level and region by region: uncompressed data are read as row ranges straight from the file; tiled or
    striped data decode only the tiles/strips a region touches (a small LRU cache keeps the ones a band of
    windows reuses);
  * anything tifffile cannot read (MRXS, VMS, unusual SVS) through OpenSlide.
Failures are ValueErrors that name the file and, in 'auto', what each reader said.
`level_for_mpp` picks a pyramid level and an integer block-mean factor for a requested µm per pixel.
"""
from __future__ import annotations

import math
import os
import re
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from .imageio import OPENSLIDE_SUFFIXES, TIFF_SUFFIXES

# Pixels a whole-image decode (PNG, JPEG) may hold: 2^28 is 0.75 GiB as RGB uint8.
MAX_PIXELS = 1 << 28
# A level whose µm per pixel is within this fraction of the request counts as that request.
MPP_TOLERANCE = 0.1


class LevelError(ValueError):
    """A pyramid level the file does not have; no other reader would do better."""


class ArrayReader:
    """An in-memory (H, W) or (H, W, C) array as a reader."""

    mpp = None

    def __init__(self, array: np.ndarray):
        array = np.asarray(array) if not isinstance(array, np.memmap) else array
        self.array = array[:, :, None] if array.ndim == 2 else array
        if self.array.ndim != 3:
            raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {array.shape}")
        self.height, self.width, self.channels = self.array.shape
        self.dtype = self.array.dtype
        self.level_shapes = [(self.height, self.width)]

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        return np.asarray(self.array[max(top, 0):top + height, max(left, 0):left + width])

    def close(self) -> None:
        pass


def pil_array(img: Image.Image) -> np.ndarray:
    """A Pillow image as stored values: gray/RGB(A) uint8, 16-bit gray uint16, 32-bit int32 or float32."""
    if img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    if img.mode in ("I", "F", "L", "RGB", "RGBA", "LA"):
        return np.asarray(img)
    if img.mode == "1":
        return np.asarray(img.convert("L"))
    return np.asarray(img.convert("RGBA" if img.mode == "P" and "transparency" in img.info else "RGB"))


class PILReader(ArrayReader):
    """PNG, JPEG and other Pillow formats: decoded once, in their stored dtype."""

    def __init__(self, path: str | os.PathLike, max_pixels: int = MAX_PIXELS):
        try:
            with Image.open(path) as img:
                width, height = img.size
                if width * height <= max_pixels:
                    img.load()
                    array = pil_array(img)
        except (OSError, SyntaxError, EOFError, ValueError, zlib.error, Image.DecompressionBombError) as err:
            raise ValueError(f"{path}: cannot decode image with Pillow ({type(err).__name__}: {err})") from None
        if width * height > max_pixels:
            raise ValueError(f"{path}: {width}x{height} = {width * height:,} pixels, more than the {max_pixels:,} "
                             "a whole-image decode may hold; store it as a tiled TIFF (read by region) or raise "
                             "max_pixels")
        super().__init__(array)


def tiff_mpp(tif, page) -> float | None:
    """µm per pixel of a TIFF's first page: Aperio's 'MPP = ' description, else X resolution + unit."""
    found = re.search(r"\bMPP\s*=\s*([0-9.]+)", page.description or "")
    if found:
        return float(found.group(1))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        per_unit = num / den if den else 0.0
        microns = {2: 25400.0, 3: 10000.0}.get(unit)
        if microns and per_unit > 0:
            return microns / per_unit
    return None


class TiffReader:
    """One page (pyramid level) of a TIFF/SVS/NDPI file, read by region without decoding the rest."""

    def __init__(self, path: str | os.PathLike, level: int = 0, cache_bytes: int = 32 << 20):
        import tifffile

        self.path = Path(path)
        try:
            self.tif = tifffile.TiffFile(self.path)
            levels = self.tif.series[0].levels if self.tif.series else []
        except Exception as err:  # tifffile raises TiffFileError, struct.error, ValueError... on junk
            raise ValueError(f"{self.path}: not a readable TIFF ({type(err).__name__}: {err})") from None
        if not levels:
            self.close()
            raise ValueError(f"{self.path}: no image series in this TIFF")
        if not 0 <= level < len(levels):
            self.close()
            raise LevelError(f"{self.path}: level {level} requested, the file has levels 0..{len(levels) - 1}")
        self.level_shapes = [tuple(lv.pages[0].shape[:2]) for lv in levels]
        base_mpp = tiff_mpp(self.tif, levels[0].pages[0])
        page = self.page = levels[level].pages[0]
        axes = dict(zip(page.axes, page.shape))
        if "Y" not in axes or "X" not in axes or set(axes) - {"Y", "X", "S"}:
            self.close()
            raise ValueError(f"{self.path}: page axes {page.axes!r} are not a 2-D gray/colour image")
        self.height, self.width, self.channels = axes["Y"], axes["X"], axes.get("S", 1)
        self.mpp = base_mpp * self.level_shapes[0][1] / self.width if base_mpp else None
        self.dtype = page.dtype
        size = self.path.stat().st_size
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        if any(end > size for end in ends):
            self.close()
            raise ValueError(f"{self.path}: truncated TIFF (level {level} data run to byte {max(ends)} of a "
                             f"{size}-byte file)")
        self.separate = page.planarconfig == 2 and self.channels > 1
        self.contiguous = page.is_contiguous and not self.separate and page.compression == 1
        self.seg_h = page.tilelength if page.is_tiled else min(page.rowsperstrip or self.height, self.height)
        self.seg_w = page.tilewidth if page.is_tiled else self.width
        self.seg_rows = math.ceil(self.height / self.seg_h)
        self.seg_cols = math.ceil(self.width / self.seg_w)
        seg_bytes = self.seg_h * self.seg_w * (1 if self.separate else self.channels) * self.dtype.itemsize
        expected = self.seg_rows * self.seg_cols * (self.channels if self.separate else 1)
        if not self.contiguous and len(page.dataoffsets) < expected:
            self.close()
            raise ValueError(f"{self.path}: truncated or damaged TIFF (level {level} lists "
                             f"{len(page.dataoffsets)} of its {expected} tiles/strips)")
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_items = max(4, cache_bytes // max(seg_bytes, 1))
        if not self.contiguous:
            try:
                self._decode(0)  # fail now, with a clear message, if the codec is missing
            except ValueError:
                self.close()
                raise

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        y0, y1 = max(top, 0), min(top + height, self.height)
        x0, x1 = max(left, 0), min(left + width, self.width)
        out = np.empty((max(y1 - y0, 0), max(x1 - x0, 0), self.channels), self.dtype)
        if out.size == 0:
            return out
        if self.contiguous:
            row_bytes = self.width * self.channels * self.dtype.itemsize
            fh = self.tif.filehandle
            fh.seek(self.page.dataoffsets[0] + y0 * row_bytes)
            rows = np.frombuffer(fh.read((y1 - y0) * row_bytes), self.page.dtype.newbyteorder(self.tif.byteorder))
            out[:] = rows.reshape(y1 - y0, self.width, self.channels)[:, x0:x1]
            return out
        planes = range(self.channels) if self.separate else [None]
        for r in range(y0 // self.seg_h, (y1 - 1) // self.seg_h + 1):
            for c in range(x0 // self.seg_w, (x1 - 1) // self.seg_w + 1):
                sy, sx = r * self.seg_h, c * self.seg_w
                ya, yb = max(y0, sy), min(y1, sy + self.seg_h)
                xa, xb = max(x0, sx), min(x1, sx + self.seg_w)
                for s in planes:
                    plane = 0 if s is None else s
                    seg = self._segment(plane * self.seg_rows * self.seg_cols + r * self.seg_cols + c)
                    part = seg[ya - sy:yb - sy, xa - sx:xb - sx]
                    if s is None:
                        out[ya - y0:yb - y0, xa - x0:xb - x0] = part
                    else:
                        out[ya - y0:yb - y0, xa - x0:xb - x0, s] = part[..., 0]
        return out

    def _segment(self, index: int) -> np.ndarray:
        seg = self.cache.get(index)
        if seg is None:
            seg = self._decode(index)
            self.cache[index] = seg
            if len(self.cache) > self.cache_items:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(index)
        return seg

    def _decode(self, index: int) -> np.ndarray:
        page, fh = self.page, self.tif.filehandle
        fh.seek(page.dataoffsets[index])
        data = fh.read(page.databytecounts[index])
        try:
            seg, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as err:  # codec errors have library-specific types (imagecodecs.ZlibError, ...)
            kind = "tile" if page.is_tiled else "strip"
            raise ValueError(f"{self.path}: cannot decode {kind} {index} ({page.compression.name} data; "
                             f"{type(err).__name__}: {err})") from None
        if seg is None:  # an empty tile: tifffile's fill value
            seg = np.zeros(shape, self.dtype)
        return np.asarray(seg).reshape(seg.shape[-3], seg.shape[-2], seg.shape[-1])

    def close(self) -> None:
        self.tif.close()


class OpenSlideReader:
    """OpenSlide-backed reader, for the formats tifffile does not read (MRXS, VMS, ...)."""

    def __init__(self, path: str | os.PathLike, level: int = 0):
        try:
            import openslide
        except ImportError as err:
            raise ValueError(f"{path}: openslide-python is not installed ({err})") from None
        try:
            self.slide = openslide.OpenSlide(str(path))
        except Exception as err:  # OpenSlideError, OpenSlideUnsupportedFormatError
            raise ValueError(f"{path}: OpenSlide cannot open it ({type(err).__name__}: {err})") from None
        count = self.slide.level_count
        if not 0 <= level < count:
            self.slide.close()  # after reading the count: a closed slide answers nothing
            raise LevelError(f"{path}: level {level} requested, the slide has levels 0..{count - 1}")
        self.path, self.level = Path(path), level
        self.downsample = self.slide.level_downsamples[level]
        self.width, self.height = self.slide.level_dimensions[level]
        self.level_shapes = [(h, w) for w, h in self.slide.level_dimensions]
        base = self.slide.properties.get("openslide.mpp-x")
        self.mpp = float(base) * self.downsample if base else None
        self.channels, self.dtype = 3, np.dtype(np.uint8)

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        y0, y1 = max(top, 0), min(top + height, self.height)
        x0, x1 = max(left, 0), min(left + width, self.width)
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(y1 - y0, 0), max(x1 - x0, 0), 3), np.uint8)
        origin = (int(x0 * self.downsample), int(y0 * self.downsample))  # OpenSlide wants level-0 coordinates
        try:
            region = self.slide.read_region(origin, self.level, (x1 - x0, y1 - y0))
        except Exception as err:  # OpenSlideError: the slide's data are damaged, and OpenSlide stays failed
            raise ValueError(f"{self.path}: OpenSlide cannot read rows {y0}..{y1 - 1} ({type(err).__name__}: "
                             f"{err})") from None
        return np.asarray(region.convert("RGB"))

    def close(self) -> None:
        self.slide.close()


class DownscaledReader:
    """Reads another reader at 1/factor resolution as block means, in the stored units of the source
    (float32; `stored_dtype` says which range they are in), e.g. to match a model trained on patches
    resized from 1024 to 512 pixels (factor 2)."""

    def __init__(self, reader, factor: int):
        if factor < 1:
            raise ValueError(f"downscale factor must be a positive integer, got {factor}")
        check_factor(factor, reader.height, reader.width)
        self.reader, self.factor = reader, factor
        self.height, self.width = math.ceil(reader.height / factor), math.ceil(reader.width / factor)
        self.channels, self.dtype = reader.channels, np.dtype(np.float32)
        self.stored_dtype = getattr(reader, "stored_dtype", reader.dtype)
        self.mpp = reader.mpp * factor if getattr(reader, "mpp", None) else None
        self.level_shapes = [(self.height, self.width)]

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        f = self.factor
        y0, y1 = max(top, 0), min(top + height, self.height)
        x0, x1 = max(left, 0), min(left + width, self.width)
        src = self.reader.read(y0 * f, x0 * f, (y1 - y0) * f, (x1 - x0) * f).astype(np.float32)
        h, w = y1 - y0, x1 - x0
        pad = ((0, h * f - src.shape[0]), (0, w * f - src.shape[1]), (0, 0))
        src = np.pad(src, pad, mode="edge") if any(p[1] for p in pad) else src
        return src.reshape(h, f, w, f, -1).mean(axis=(1, 3))

    def close(self) -> None:
        self.reader.close()


def check_factor(factor: int, height: int, width: int, what: str = "downscale factor") -> None:
    """A block-mean factor no larger than the image's shorter side: beyond it the image is less than one
    block across, and the blocks' edge padding would be `factor` times the image in each direction."""
    if factor > min(height, width):
        raise ValueError(f"{what} {factor} on a {width}x{height} image would give {width / factor:.3g}x"
                         f"{height / factor:.3g} pixels, less than one; the largest usable factor is "
                         f"{min(height, width)}")


def full_scale(dtype) -> float:
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def open_reader(path: str | os.PathLike, kind: str = "auto", level: int = 0, max_pixels: int = MAX_PIXELS):
    """A reader for `path`; kind is 'auto', 'pil', 'tiff' or 'openslide'.

    'auto': Pillow for PNG/JPEG; tifffile, then OpenSlide, for TIFF-based slides; OpenSlide for the others.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    suffix = path.suffix.lower()
    if kind == "auto":
        if suffix not in TIFF_SUFFIXES + OPENSLIDE_SUFFIXES:
            kind = "pil"
        else:
            tried = []
            for reader in ((TiffReader,) if suffix in TIFF_SUFFIXES else ()) + (OpenSlideReader,):
                try:
                    return reader(path, level)
                except LevelError:
                    raise
                except ValueError as err:
                    tried.append(f"{reader.__name__}: {str(err).removeprefix(f'{path}: ')}")
            raise ValueError(f"{path}: no reader could open it; " + "; ".join(tried))
    if kind == "pil":
        if level:
            raise LevelError(f"{path}: levels exist only in TIFF/SVS pyramids, got level {level}")
        return PILReader(path, max_pixels)
    if kind == "tiff":
        return TiffReader(path, level)
    if kind == "openslide":
        return OpenSlideReader(path, level)
    raise ValueError(f"unknown reader kind {kind!r}; expected auto, pil, tiff or openslide")


def level_for_mpp(path: str | os.PathLike, mpp: float, kind: str = "auto") -> tuple[int, int, float]:
    """(level, block-mean factor, resulting µm per pixel) that read `path` at about `mpp` µm per pixel.

    The coarsest level no coarser than the request (within MPP_TOLERANCE), then the integer factor that
    comes closest; never upsampled.
    """
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"µm per pixel must be a finite positive number, got {mpp}")
    base = open_reader(path, kind)
    try:
        if base.mpp is None:
            raise ValueError(f"{path}: the file does not record its pixel size (µm per pixel); choose a level "
                             "and downscale factor instead")
        width0 = base.level_shapes[0][1]
        level_mpps = [base.mpp * width0 / w for _, w in base.level_shapes]
        shapes = list(base.level_shapes)
    finally:
        base.close()
    return choose_level(level_mpps, shapes, mpp, path)


def choose_level(level_mpps: list[float], shapes: list[tuple[int, int]], mpp: float,
                 path: str | os.PathLike = "the slide") -> tuple[int, int, float]:
    """`level_for_mpp` given each level's µm per pixel and (height, width) (for a pixel size the file lacks)."""
    usable = [i for i, m in enumerate(level_mpps) if m <= mpp * (1 + MPP_TOLERANCE)]
    if not usable:
        raise ValueError(f"{path}: {mpp} µm per pixel is finer than the full resolution "
                         f"({level_mpps[0]:.4g} µm per pixel); images are never upsampled")
    level = max(usable, key=lambda i: level_mpps[i])
    ratio = mpp / level_mpps[level]  # inf where the division overflows: refused below, not rounded
    factor = max(1, round(ratio)) if math.isfinite(ratio) else ratio
    height, width = shapes[level]
    check_factor(factor, height, width, f"{path}: {mpp} µm per pixel needs level {level} ({level_mpps[level]:.4g} "
                 f"µm per pixel) downscaled by")
    return level, factor, level_mpps[level] * factor
