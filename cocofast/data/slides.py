"""Large images read by region and label images written row by row, so memory never holds a whole slide.

Readers share one small interface: `height`, `width`, `channels`, `dtype` and `read(top, left, height,
width)` -> (h, w, channels) array, clipped to the image. `open_reader(path)` picks one:
  * PNG, JPEG (and anything else Pillow opens): decoded once, since these formats have no random access;
  * TIFF / SVS through tifffile, page by page and region by region: uncompressed data are read row
    ranges straight from the file; tiled or striped data decode only the tiles/strips a region touches
    (a small LRU cache keeps the ones a band of windows reuses). Codecs tifffile lacks without the
    optional `imagecodecs` package (JPEG, LZW, JPEG 2000: most SVS files) make it fall back to
    OpenSlide when `openslide-python` is installed, and otherwise fail with a message naming both.
Writers take rows in order and keep only a block of them: `PngRowWriter` (a streaming PNG encoder) and
`TiffRowWriter` (tiled, zlib-compressed TIFF through tifffile, for outputs too large for PNG viewers);
`open_row_writer` picks one by file suffix.
"""
from __future__ import annotations

import math
import os
import struct
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from .imageio import TIFF_SUFFIXES


class ArrayReader:
    """An in-memory (H, W) or (H, W, C) array as a reader."""

    def __init__(self, array: np.ndarray):
        array = np.asarray(array) if not isinstance(array, np.memmap) else array
        self.array = array[:, :, None] if array.ndim == 2 else array
        if self.array.ndim != 3:
            raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {array.shape}")
        self.height, self.width, self.channels = self.array.shape
        self.dtype = self.array.dtype

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        return np.asarray(self.array[max(top, 0):top + height, max(left, 0):left + width])

    def close(self) -> None:
        pass


class PILReader(ArrayReader):
    """PNG, JPEG and other Pillow formats: decoded once to uint8 gray or RGB."""

    def __init__(self, path: str | os.PathLike):
        try:
            with Image.open(path) as img:
                img = img.convert("L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
                super().__init__(np.asarray(img))
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from None


class TiffReader:
    """One page (pyramid level) of a TIFF/SVS file, read by region without decoding the rest."""

    def __init__(self, path: str | os.PathLike, level: int = 0, cache_bytes: int = 32 << 20):
        import tifffile

        self.path = Path(path)
        self.tif = tifffile.TiffFile(self.path)
        levels = self.tif.series[0].levels if self.tif.series else []
        if not levels:
            raise ValueError(f"{self.path}: no image series in this TIFF")
        if not 0 <= level < len(levels):
            raise ValueError(f"{self.path}: level {level} requested, file has levels 0..{len(levels) - 1}")
        page = levels[level].pages[0]
        self.page = page
        axes = dict(zip(page.axes, page.shape))
        if "Y" not in axes or "X" not in axes or set(axes) - {"Y", "X", "S"}:
            raise ValueError(f"{self.path}: page axes {page.axes!r} are not a 2-D gray/colour image")
        self.height, self.width, self.channels = axes["Y"], axes["X"], axes.get("S", 1)
        self.dtype = page.dtype
        self.separate = page.planarconfig == 2 and self.channels > 1
        self.contiguous = page.is_contiguous and not self.separate and page.compression == 1
        self.seg_h = page.tilelength if page.is_tiled else min(page.rowsperstrip or self.height, self.height)
        self.seg_w = page.tilewidth if page.is_tiled else self.width
        self.seg_rows = math.ceil(self.height / self.seg_h)
        self.seg_cols = math.ceil(self.width / self.seg_w)
        seg_bytes = self.seg_h * self.seg_w * (1 if self.separate else self.channels) * self.dtype.itemsize
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_items = max(4, cache_bytes // max(seg_bytes, 1))
        if not self.contiguous:
            self._decode(0)  # fail now, with a clear message, if the codec is missing

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
            rows = np.frombuffer(fh.read((y1 - y0) * row_bytes), self.dtype)
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
        except (KeyError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"{self.path}: cannot decode {page.compression!r} data with tifffile alone ({err}); install "
                "'imagecodecs', or 'openslide-python' (with the OpenSlide library) for SVS") from None
        if seg is None:  # an empty tile: tifffile's fill value
            seg = np.zeros(shape, self.dtype)
        seg = np.asarray(seg).reshape(seg.shape[-3], seg.shape[-2], seg.shape[-1])
        return seg

    def close(self) -> None:
        self.tif.close()


class OpenSlideReader:
    """OpenSlide-backed reader (optional dependency, imported only when used)."""

    def __init__(self, path: str | os.PathLike, level: int = 0):
        import openslide  # noqa: PLC0415 - optional

        self.slide = openslide.OpenSlide(str(path))
        if not 0 <= level < self.slide.level_count:
            raise ValueError(f"{path}: level {level} requested, slide has levels 0..{self.slide.level_count - 1}")
        self.level = level
        self.downsample = self.slide.level_downsamples[level]
        self.width, self.height = self.slide.level_dimensions[level]
        self.channels, self.dtype = 3, np.dtype(np.uint8)

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        y0, y1 = max(top, 0), min(top + height, self.height)
        x0, x1 = max(left, 0), min(left + width, self.width)
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(y1 - y0, 0), max(x1 - x0, 0), 3), np.uint8)
        origin = (int(x0 * self.downsample), int(y0 * self.downsample))  # OpenSlide wants level-0 coordinates
        region = self.slide.read_region(origin, self.level, (x1 - x0, y1 - y0))
        return np.asarray(region.convert("RGB"))

    def close(self) -> None:
        self.slide.close()


class DownscaledReader:
    """Reads another reader at 1/factor resolution (block means), e.g. to match a model trained on
    patches resized from 1024 to 512 pixels (factor 2)."""

    def __init__(self, reader, factor: int):
        if factor < 1:
            raise ValueError(f"downscale factor must be a positive integer, got {factor}")
        self.reader, self.factor = reader, factor
        self.height, self.width = math.ceil(reader.height / factor), math.ceil(reader.width / factor)
        self.channels, self.dtype = reader.channels, np.dtype(np.float32)

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        f = self.factor
        y0, y1 = max(top, 0), min(top + height, self.height)
        x0, x1 = max(left, 0), min(left + width, self.width)
        src = self.reader.read(y0 * f, x0 * f, (y1 - y0) * f, (x1 - x0) * f)
        src = src.astype(np.float32) / full_scale(self.reader.dtype)
        h, w = y1 - y0, x1 - x0
        pad = ((0, h * f - src.shape[0]), (0, w * f - src.shape[1]), (0, 0))
        src = np.pad(src, pad, mode="edge") if any(p[1] for p in pad) else src
        return src.reshape(h, f, w, f, -1).mean(axis=(1, 3))

    def close(self) -> None:
        self.reader.close()


def full_scale(dtype) -> float:
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def open_reader(path: str | os.PathLike, kind: str = "auto", level: int = 0):
    """A reader for `path`; kind is 'auto', 'pil', 'tiff' or 'openslide'."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    if kind == "auto":
        kind = "tiff" if path.suffix.lower() in TIFF_SUFFIXES else "pil"
        if kind == "tiff":
            try:
                return TiffReader(path, level)
            except ValueError:
                try:
                    import openslide  # noqa: F401
                except ImportError:
                    raise
                return OpenSlideReader(path, level)
    if kind == "pil":
        if level:
            raise ValueError(f"{path}: levels exist only for TIFF/SVS pyramids, got level {level}")
        return PILReader(path)
    if kind == "tiff":
        return TiffReader(path, level)
    if kind == "openslide":
        return OpenSlideReader(path, level)
    raise ValueError(f"unknown reader kind {kind!r}; expected auto, pil, tiff or openslide")


# ---------------------------------------------------------------------------------------------------------
# writers

class PngRowWriter:
    """Writes an 8-bit gray or RGB PNG whose rows arrive in order; memory: one block of rows."""

    def __init__(self, path: str | os.PathLike, height: int, width: int, channels: int = 1, level: int = 6):
        if channels not in (1, 3):
            raise ValueError(f"PNG rows must have 1 or 3 channels, got {channels}")
        self.height, self.width, self.channels = height, width, channels
        fh = self.fh = open(path, "wb")
        self.rows_written = 0
        self.zip = zlib.compressobj(level)
        fh.write(b"\x89PNG\r\n\x1a\n")
        colour_type = 0 if channels == 1 else 2
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))

    def write(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.uint8).reshape(-1, self.width * self.channels)
        if self.rows_written + len(rows) > self.height:
            raise ValueError(f"PNG is {self.height} rows high; got row {self.rows_written + len(rows)}")
        # Each scanline starts with its filter type; 0 (none) keeps writing a pure copy.
        lines = np.empty((len(rows), rows.shape[1] + 1), np.uint8)
        lines[:, 0] = 0
        lines[:, 1:] = rows
        data = self.zip.compress(lines.tobytes())
        if data:
            self._chunk(b"IDAT", data)
        self.rows_written += len(rows)

    def close(self) -> None:
        try:
            if self.rows_written != self.height:
                raise ValueError(f"PNG closed after {self.rows_written} of {self.height} rows")
            self._chunk(b"IDAT", self.zip.flush())
            self._chunk(b"IEND", b"")
        finally:
            self.fh.close()

    def _chunk(self, kind: bytes, data: bytes) -> None:
        self.fh.write(struct.pack(">I", len(data)) + kind + data)
        self.fh.write(struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def write_tiff_rows(path: str | os.PathLike, row_blocks, height: int, width: int, channels: int = 1,
                    tile: int = 256) -> None:
    """Write a zlib-compressed tiled TIFF from blocks of rows (each (n, width[, channels]) uint8) that arrive
    in order; holds at most one row of tiles plus one block."""
    import tifffile

    def tiles():
        pending, have = [], 0
        for block in row_blocks:
            block = np.asarray(block, np.uint8).reshape(-1, width, channels)
            pending.append(block)
            have += len(block)
            while have >= tile:
                rows = np.concatenate(pending)
                yield from _tile_row(rows[:tile], tile, channels)
                pending, have = [rows[tile:]], have - tile
        if have:
            yield from _tile_row(np.concatenate(pending), tile, channels)

    shape = (height, width, channels) if channels > 1 else (height, width)
    tifffile.imwrite(path, data=tiles(), shape=shape, dtype=np.uint8, tile=(tile, tile), compression="zlib",
                     photometric="rgb" if channels == 3 else "minisblack")


def _tile_row(rows: np.ndarray, tile: int, channels: int):
    width = rows.shape[1]
    for x in range(0, width, tile):
        out = np.zeros((tile, tile, channels), np.uint8)
        part = rows[:, x:x + tile]
        out[:part.shape[0], :part.shape[1]] = part
        yield out if channels > 1 else out[..., 0]


class TiffRowWriter:
    """Push-style rows into `write_tiff_rows`: tifffile pulls tiles in a helper thread from a short queue,
    so at most a few blocks wait in memory."""

    _END = object()

    def __init__(self, path: str | os.PathLike, height: int, width: int, channels: int = 1):
        import queue
        import threading

        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None

        def blocks():
            while (item := self.queue.get()) is not self._END:
                yield item

        def run():
            try:
                write_tiff_rows(path, blocks(), height, width, channels)
            except BaseException as err:  # handed to the writing thread in write()/close()
                self.error = err
                while self.queue.get() is not self._END:  # unblock the producer
                    pass

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def write(self, rows: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(np.asarray(rows, np.uint8))

    def close(self) -> None:
        self.queue.put(self._END)
        self.thread.join()
        if self.error is not None:
            raise self.error


def open_row_writer(path: str | os.PathLike, height: int, width: int, channels: int = 1, suffix: str | None = None):
    """A PNG or TIFF row writer chosen by suffix (of `path`, or `suffix` when writing to a temp name)."""
    suffix = (suffix or Path(path).suffix).lower()
    if suffix == ".png":
        return PngRowWriter(path, height, width, channels)
    if suffix in (".tif", ".tiff"):
        return TiffRowWriter(path, height, width, channels)
    raise ValueError(f"{path}: cannot write {suffix!r} files; use .png, .tif or .tiff")
