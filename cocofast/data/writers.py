"""Label images written row by row, so memory never holds a whole output.

`PngRowWriter` (a streaming PNG encoder) and `TiffRowWriter` (tiled, zlib-compressed TIFF through tifffile,
for outputs too large for PNG viewers); `open_row_writer` picks one by file suffix.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

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
