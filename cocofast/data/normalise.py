"""The one rule that turns stored pixels into network input, shared by training and `cocofast.segment`.

    stored pixels (H, W, C) of any dtype
      -> channels: alpha dropped; RGB -> gray by ITU-R 601 luma; gray -> RGB by repetition
      -> unit range, by mode:
           range            x / dtype max for integers (uint8 / 255, uint16 / 65535; negative values of
                            signed types are outside the range); floats as they are, declared in [0, 1]
           range:LOW:HIGH   (x - LOW) / (HIGH - LOW): a declared stored range, e.g. range:0:4095 for 12-bit
                            data in uint16, range:0:255 for float TIFFs stored as 0..255
           percentile:P:Q   per image and channel, the P-th percentile -> 0 and the Q-th -> 1 (16-bit
                            fluorescence); percentiles come from `image_stats`, a fixed pixel grid of the
                            whole stored image, so a patch and the slide it came from get the same mapping
         then clipped to [0, 1]. Values outside a declared range are an error in `FolderDataset` (the file
         is named) and a warning in segment (clipped). NaN is no value at all, in or out of a range: both
         refuse it (FolderDataset with the file's NaN count, segment with the band's), since a NaN pixel
         turns every network output it reaches into NaN and every window it touches into class 0.
      -> (training only: crop, resize, augmentation - all in [0, 1])
      -> standardise, mode meanstd:M1,M2,..:S1,S2,..: the range result, then (x - M) / S per channel.

`network_input` is the whole chain without the training-only step; `to_unit_range` and `standardise` are its
two halves, which `FolderDataset` calls around its crop/resize/augment.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# ITU-R 601 luma, the weights Pillow's convert("L") and OpenCV's grayscale reads use.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
MODES = ("range", "percentile", "meanstd")
# Percentile statistics read at most this many pixels per image (a fixed grid), whatever its size.
STATS_SAMPLES = 1 << 20


@dataclass(frozen=True)
class Normalisation:
    """How stored values become [0, 1] (and optionally standardised); see the module docstring."""

    mode: str = "range"
    low: float | None = None  # declared stored range; None: the dtype's (integers) or [0, 1] (floats)
    high: float | None = None
    percentiles: tuple[float, float] = (1.0, 99.0)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"normalisation mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if (self.low is None) != (self.high is None) or (self.low is not None and not self.low < self.high):
            raise ValueError(f"normalisation range [{self.low}, {self.high}]: expected LOW < HIGH")
        p, q = self.percentiles
        if not 0 <= p < q <= 100:
            raise ValueError(f"normalisation percentiles {p}, {q}: expected 0 <= P < Q <= 100")
        if self.mode == "meanstd" and (len(self.mean) != len(self.std) or not self.mean
                                       or any(s <= 0 for s in self.std)):
            raise ValueError(f"normalisation meanstd: mean {self.mean} and std {self.std} must be lists of the same "
                             "length with positive std")

    @classmethod
    def parse(cls, text: str) -> "Normalisation":
        """'range', 'range:LOW:HIGH', 'percentile', 'percentile:P:Q', 'meanstd:M1,M2,M3:S1,S2,S3'
        (meanstd may also carry a range: 'meanstd:M:S:LOW:HIGH')."""
        if isinstance(text, Normalisation):
            return text
        parts = [p.strip() for p in str(text).strip().split(":")]
        mode, args = parts[0].lower(), parts[1:]
        try:
            if mode == "range" and len(args) in (0, 2):
                return cls("range", *(float(a) for a in args)) if args else cls()
            if mode == "percentile" and len(args) in (0, 2):
                return cls("percentile", percentiles=tuple(float(a) for a in args)) if args else cls("percentile")
            if mode == "meanstd" and len(args) in (2, 4):
                mean, std = (tuple(float(v) for v in a.split(",")) for a in args[:2])
                low, high = (float(a) for a in args[2:]) if len(args) == 4 else (None, None)
                return cls("meanstd", low, high, mean=mean, std=std)
        except ValueError as err:
            if "could not convert" not in str(err):
                raise
        raise ValueError(f"normalisation {text!r}: expected 'range', 'range:LOW:HIGH', 'percentile', "
                         "'percentile:P:Q' or 'meanstd:M1,M2,M3:S1,S2,S3'")

    def text(self) -> str:
        """The parse() spelling of this normalisation (stored in configs and checkpoints)."""
        bounds = f":{self.low:g}:{self.high:g}" if self.low is not None else ""
        if self.mode == "percentile":
            return "percentile:{:g}:{:g}".format(*self.percentiles)
        if self.mode == "meanstd":
            return ("meanstd:" + ",".join(f"{v:g}" for v in self.mean) + ":"
                    + ",".join(f"{v:g}" for v in self.std) + bounds)
        return "range" + bounds

    def stored_range(self, dtype) -> tuple[float, float]:
        """(low, high) of the stored values that map to 0 and 1 in the range and meanstd modes."""
        if self.low is not None:
            return float(self.low), float(self.high)
        dtype = np.dtype(dtype)
        if np.issubdtype(dtype, np.integer):
            return 0.0, float(np.iinfo(dtype).max)
        return 0.0, 1.0


def parse_normalisation(text) -> Normalisation:
    return Normalisation.parse(text)


def luma(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) -> (...) grayscale. Written out instead of `rgb @ LUMA`: a threaded BLAS call on a busy
    machine can cost a thousand times more than these three multiply-adds."""
    return rgb[..., 0] * LUMA[0] + rgb[..., 1] * LUMA[1] + rgb[..., 2] * LUMA[2]


def select_channels(pixels: np.ndarray, in_channels: int) -> np.ndarray:
    """(H, W[, C]) stored -> (H, W, in_channels) float32, still in stored units."""
    image = pixels.astype(np.float32) if pixels.dtype != np.float32 else pixels.copy()
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] in (2, 4):  # drop alpha
        image = image[:, :, :-1]
    have = image.shape[2]
    if have == in_channels:
        return image
    if in_channels == 1 and have == 3:
        return luma(image)[:, :, None]
    if in_channels == 3 and have == 1:
        return np.repeat(image, 3, axis=2)
    raise ValueError(f"cannot turn a {have}-channel image into the {in_channels} channels the network takes")


def unit_bounds(norm: Normalisation, stored_dtype, stats: np.ndarray | None, channels: int):
    """Per-channel (low, high) float32 arrays that map to 0 and 1."""
    if norm.mode == "percentile":
        if stats is None:
            raise ValueError("percentile normalisation needs the image's statistics (image_stats)")
        return stats[0].astype(np.float32), stats[1].astype(np.float32)
    low, high = norm.stored_range(stored_dtype)
    return np.full(channels, low, np.float32), np.full(channels, high, np.float32)


def to_unit_range(pixels: np.ndarray, in_channels: int, norm: Normalisation = Normalisation(),
                  stored_dtype=None, stats: np.ndarray | None = None) -> np.ndarray:
    """Stored pixels (H, W[, C]) -> float32 (in_channels, H, W) in [0, 1] by the module's rule.

    stored_dtype: the dtype the file stores (when `pixels` are already block means in stored units);
    stats: (2, in_channels) percentile bounds from `image_stats`, for the percentile mode.
    """
    stored_dtype = pixels.dtype if stored_dtype is None else stored_dtype
    image = select_channels(pixels, in_channels)
    low, high = unit_bounds(norm, stored_dtype, stats, image.shape[2])
    # A flat channel (high == low, e.g. an empty fluorescence channel) maps to 0 rather than dividing by zero.
    span = np.where(high > low, high - low, 1.0).astype(np.float32)
    image -= low
    image /= span
    np.clip(image, 0.0, 1.0, out=image)
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def standardise(image, norm: Normalisation):
    """(C, H, W) [0, 1] tensor or array -> (x - mean) / std in the meanstd mode; unchanged otherwise."""
    if norm.mode != "meanstd":
        return image
    channels = image.shape[0]
    if len(norm.mean) not in (1, channels):
        raise ValueError(f"normalisation meanstd has {len(norm.mean)} means for a {channels}-channel input")
    lib = torch if isinstance(image, torch.Tensor) else np
    mean = lib.as_tensor(norm.mean) if lib is torch else np.asarray(norm.mean, np.float32)
    std = lib.as_tensor(norm.std) if lib is torch else np.asarray(norm.std, np.float32)
    if lib is torch:
        mean, std = mean.to(image.device, image.dtype), std.to(image.device, image.dtype)
    return (image - mean.reshape(-1, 1, 1)) / std.reshape(-1, 1, 1)


def network_input(pixels: np.ndarray, in_channels: int, norm: Normalisation = Normalisation(),
                  stored_dtype=None, stats: np.ndarray | None = None) -> np.ndarray:
    """The whole rule: stored pixels -> float32 (in_channels, H, W) as the network sees them."""
    return standardise(to_unit_range(pixels, in_channels, norm, stored_dtype, stats), norm)


def stats_step(height: int, width: int) -> int:
    """Grid spacing of the pixels `image_stats` reads: every step-th row and column."""
    return max(1, math.ceil(math.sqrt(height * width / STATS_SAMPLES)))


def image_stats(reader, norm: Normalisation, in_channels: int) -> np.ndarray | None:
    """(2, in_channels) percentile bounds of a whole image for the percentile mode (None otherwise).

    Reads band by band and keeps pixels on a fixed grid (rows and columns 0, s, 2s, ...), so the memory
    is one band and the answer depends only on the stored image.
    """
    if norm.mode != "percentile":
        return None
    step = stats_step(reader.height, reader.width)
    rows = step * max(1, 256 // step)
    samples = []
    for top in range(0, reader.height, rows):
        band = reader.read(top, 0, rows, reader.width)[::step, ::step]
        samples.append(select_channels(band, in_channels).reshape(-1, in_channels))
    values = np.concatenate(samples)
    return np.percentile(values, norm.percentiles, axis=0).astype(np.float32)


def nan_pixels(pixels: np.ndarray) -> int:
    """Pixels of (H, W[, C]) float data with a NaN in any channel (0 for integer data)."""
    if pixels.dtype.kind != "f" or pixels.size == 0:
        return 0
    nan = np.isnan(pixels)
    return int((nan.any(axis=2) if nan.ndim == 3 else nan).sum())


def values_outside(pixels: np.ndarray, norm: Normalisation, stored_dtype=None) -> tuple[float, float] | None:
    """(min, max) of `pixels` when some fall outside the declared stored range, else None.

    The percentile mode declares no range; integer dtypes without a declared range cannot leave theirs.
    """
    if norm.mode == "percentile" or pixels.size == 0:
        return None
    stored_dtype = pixels.dtype if stored_dtype is None else np.dtype(stored_dtype)
    if norm.low is None and np.issubdtype(stored_dtype, np.unsignedinteger):
        return None
    if pixels.dtype.kind == "f" and np.isnan(pixels).any():
        return float("nan"), float("nan")
    low, high = norm.stored_range(stored_dtype)
    lo, hi = float(pixels.min()), float(pixels.max())
    return (lo, hi) if lo < low or hi > high else None
