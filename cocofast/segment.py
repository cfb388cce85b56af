"""Segment images of any size with a trained network: overlapping windows, Gaussian blending, bounded memory.

    python -m cocofast.segment SLIDE.svs --checkpoint runs/demo/checkpoint.pt --out mask.png \\
        [--overlay overlay.png] [--role student] [--window 512] [--overlap 0.25] [--downscale 2 | --mpp 1.0]
        [--level 1] [--normalise range|range:LOW:HIGH|percentile:P:Q|meanstd:M:S]

Input pixels become network input by `cocofast.data.normalise` - the rule training used. What flags leave
out comes from the checkpoint's training config (`trained_input`): the window is the training image_size,
the downscale patch_size // image_size (the network saw patch_size patches resized to image_size), and
channels, classes and normalisation are the ones it was trained with. `segment_image` is the one
image -> mask (+ outline overlay) routine; `cocofast predict` runs it over a batch.

How memory stays bounded: windows are visited one horizontal band at a time. The class-score
accumulator covers only the current band (window rows x image width); when the next band starts lower,
the rows above it can receive no more windows, so they are normalised, turned into labels and written
out (PNG rows through a streaming encoder, or TIFF tiles) before the accumulator shifts up. Images are
read by band through the readers of `cocofast.data.slides` (TIFF/SVS by region). What stays resident is
the model, one band of input, the accumulator and a batch of windows - not the image, not the output.

Blending: every window's class probabilities are weighted by a Gaussian centred on the window
(sigma = window * sigma_scale with sigma_scale = 1/8, as nnU-Net and MONAI do, weights clamped below
at max(smallest weight, 1e-3) exactly like MONAI's importance map) and the weighted sum is divided by
the summed weights, so window borders, where a network sees least context, count least.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

import cocofast.checkpoint
from cocofast.data.normalise import Normalisation, image_stats, nan_pixels, network_input, values_outside
from cocofast.data.slides import ArrayReader, DownscaledReader, level_for_mpp, open_reader
from cocofast.data.tiling import axis_starts, stride_from_fraction
from cocofast.data.slide_outputs import BandOutputs, SlideOutputs, glass_windows
from cocofast.data.writers import open_row_writer
from cocofast.io import atomic_path
from cocofast.models import create_model, logits_of
from cocofast.ops.checks import available_memory
from cocofast.overlay import DEFAULT_THICKNESS, OutlineStream, display_rgb, paint_outlines

OVERLAY_ROWS = 64  # overlay rows converted at a time: bounds the float temporaries of wide slides
DEFAULT_WINDOW = 512  # the window of a checkpoint whose training config does not give image_size


def gaussian_importance(window: tuple[int, int], sigma_scale: float = 0.125, device=None) -> torch.Tensor:
    """(h, w) separable Gaussian weights with peak 1 at the window centre, MONAI's formula and clamp."""
    axes = []
    for n in window:
        x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2.0
        axes.append(torch.exp(-(x**2) / (2.0 * (sigma_scale * n) ** 2)))
    weight = axes[0][:, None] * axes[1][None, :]
    return weight.clamp_(min=max(float(weight.min()), 1e-3))


def _as_reader(source):
    if isinstance(source, (np.ndarray, np.memmap)):
        return ArrayReader(source)
    if isinstance(source, torch.Tensor):
        raise TypeError("pass images as (H, W, C) numpy arrays or readers, not tensors")
    return source


def blended_bands(predict_fn: Callable[[torch.Tensor], torch.Tensor], reader, window: int | tuple[int, int],
                  overlap: float = 0.25, batch_size: int = 4, num_classes: int = 2, *,
                  device: str | torch.device = "cpu", in_channels: int | None = None,
                  activation: str | None = "softmax", sigma_scale: float = 0.125, amp: bool = True,
                  progress: bool = False, normalise: Normalisation | str = "range",
                  stats: np.ndarray | None = None,
                  skip: Callable[[int, int], bool] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (top, scores): blended class scores (num_classes, n, W) on `device` for rows top..top+n-1,
    band after band, top to bottom; together they cover the image exactly once.

    predict_fn maps a float32 batch (B, C, wh, ww) on `device`, made from stored pixels by
    `cocofast.data.normalise.network_input` with `normalise` (and, for percentiles, the whole image's `stats`),
    to scores (B, K, wh, ww); activation "softmax" blends probabilities, None blends raw outputs (what MONAI
    does). Images smaller than the window are padded by repeating their edge pixels; padded pixels are never
    output. Values outside the declared stored range are clipped, with one warning; NaN pixels are a ValueError.
    """
    reader = _as_reader(reader)
    device = torch.device(device)
    wh, ww = (window, window) if isinstance(window, int) else tuple(window)
    if wh < 1 or ww < 1:
        raise ValueError(f"window must be a positive number of pixels, got {window}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    norm = Normalisation.parse(normalise)
    if norm.mode == "percentile" and stats is None:
        raise ValueError("percentile normalisation needs the whole image's stats (cocofast.data.image_stats)")
    height, width = reader.height, reader.width
    in_channels = in_channels or reader.channels
    stored = getattr(reader, "stored_dtype", reader.dtype)
    warned = False
    ys = axis_starts(height, wh, stride_from_fraction(wh, overlap))
    xs = axis_starts(width, ww, stride_from_fraction(ww, overlap))
    padded_w = max(width, ww)
    band_bytes = 4 * wh * (padded_w * (num_classes + 1) + ww)  # float32 accumulator, weight sums, window weights
    if band_bytes > available_memory(device):
        raise ValueError(f"a {wh}x{ww} window over a {width}-pixel-wide image needs {band_bytes / 2**30:.3g} GiB "
                         f"for one band of blended scores, more than the {available_memory(device) / 2**30:.3g} "
                         f"GiB free on {device}; choose a smaller --window")
    weight = gaussian_importance((wh, ww), sigma_scale, device)
    acc = torch.zeros(num_classes, wh, padded_w, dtype=torch.float32, device=device)
    wsum = torch.zeros(wh, padded_w, dtype=torch.float32, device=device)
    use_amp = amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16

    from tqdm import tqdm

    bar = tqdm(total=len(ys) * len(xs), unit="window", desc="segment", disable=not progress, leave=False)
    base = 0  # image row held by acc[:, 0]

    def finished(rows: int) -> tuple[int, torch.Tensor]:
        n = min(rows, height - base)
        return base, acc[:, :n, :width] / wsum[:n, :width]

    try:
        for y in ys:
            shift = y - base
            if shift > 0:
                yield finished(shift)
                acc[:, :wh - shift] = acc[:, shift:].clone()
                wsum[:wh - shift] = wsum[shift:].clone()
                acc[:, wh - shift:] = 0
                wsum[wh - shift:] = 0
                base = y
            band = reader.read(y, 0, wh, width)  # stored dtype; converted window by window below
            nans = nan_pixels(band)
            if nans:  # not "out of range": clipping cannot give NaN a value, and it would blank whole windows
                raise ValueError(f"the image holds {nans} NaN pixel(s) in rows {y}..{y + len(band) - 1}; NaN is "
                                 f"no pixel value and every window it touched would come out class 0: replace "
                                 f"NaN (e.g. by 0, numpy.nan_to_num) before segmenting")
            outside = None if warned else values_outside(band, norm, stored)
            if outside is not None:
                warnings.warn(f"stored values {outside[0]:g}..{outside[1]:g} fall outside the declared range "
                              f"{norm.stored_range(stored)}; clipped (declare the range with range:LOW:HIGH)",
                              stacklevel=2)
                warned = True
            if band.shape[0] < wh or band.shape[1] < ww:  # image smaller than the window
                band = np.pad(band, ((0, max(wh - band.shape[0], 0)), (0, max(ww - band.shape[1], 0)), (0, 0)),
                              mode="edge")
            run = xs if skip is None else [x for x in xs if not skip(y, x)]
            if len(run) < len(xs):  # skip(y, x): a window of glass, not run but given class 0 outright
                if activation != "softmax":
                    raise ValueError("skipping windows needs softmax blending (a probability of 1 for class 0)")
                for x in sorted(set(xs) - set(run)):
                    acc[0, :, x:x + ww] += weight
                    wsum[:, x:x + ww] += weight
                bar.update(len(xs) - len(run))
            for start in range(0, len(run), batch_size):
                chunk = run[start:start + batch_size]
                batch = torch.stack([torch.from_numpy(network_input(band[:, x:x + ww], in_channels, norm, stored,
                                                                    stats)) for x in chunk])
                batch = batch.to(device, non_blocking=True)
                with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    scores = predict_fn(batch)
                if scores.shape != (len(chunk), num_classes, wh, ww):
                    raise ValueError(f"the network returned shape {tuple(scores.shape)} for a batch of "
                                     f"{tuple(batch.shape)}; expected ({len(chunk)}, {num_classes}, {wh}, {ww})")
                scores = scores.float()
                if activation == "softmax":
                    scores = scores.softmax(dim=1)
                elif activation is not None:
                    raise ValueError(f"activation must be 'softmax' or None, got {activation!r}")
                scores = scores * weight
                for s, x in zip(scores, chunk):
                    acc[:, :, x:x + ww] += s
                    wsum[:, x:x + ww] += weight
                bar.update(len(chunk))
        yield finished(wh)
    finally:
        bar.close()


def sliding_window_segment(predict_fn: Callable[[torch.Tensor], torch.Tensor], reader,
                           window: int | tuple[int, int], overlap: float = 0.25, batch_size: int = 4,
                           num_classes: int = 2, *, out: np.ndarray | None = None, **kwargs) -> np.ndarray:
    """Labels (H, W) uint8 of an image of any size (a reader, or an (H, W[, C]) array).

    `out` may be any array-like with slice assignment (e.g. a numpy memmap); rows are written into it as
    soon as they are final. Other keyword arguments go to `blended_bands`.
    """
    reader = _as_reader(reader)
    if out is None:
        out = np.zeros((reader.height, reader.width), np.uint8)
    for top, scores in blended_bands(predict_fn, reader, window, overlap, batch_size, num_classes, **kwargs):
        out[top:top + scores.shape[1]] = argmax_rows(scores)
    return out


def argmax_rows(scores: torch.Tensor, rows: int = 64) -> np.ndarray:
    """Labels (n, W) uint8 of scores (K, n, W), a few rows at a time (argmax makes int64 temporaries)."""
    out = np.empty(scores.shape[1:], np.uint8)
    for top in range(0, scores.shape[1], rows):
        out[top:top + rows] = scores[:, top:top + rows].argmax(0).to(torch.uint8).cpu().numpy()
    return out


def sliding_window_scores(predict_fn, reader, window, overlap=0.25, batch_size=4, num_classes=2,
                          **kwargs) -> torch.Tensor:
    """Blended scores (K, H, W) of the whole image on the CPU (for small images and checks)."""
    bands = [s.cpu() for _, s in blended_bands(predict_fn, reader, window, overlap, batch_size, num_classes,
                                                **kwargs)]
    return torch.cat(bands, dim=1)


# ---------------------------------------------------------------------------------------------------------
# one image -> mask file (and outline overlay), band by band

@dataclass(frozen=True)
class SegmentSettings:
    """How `segment_image` turns one image into a mask: the network's input and output, and the files.

    downscale: the network runs at 1/N of the level read (block means); masks and overlays are written at
    the level's resolution. mpp, when given, picks level and downscale from the file's metadata instead.
    """

    window: int = DEFAULT_WINDOW
    overlap: float = 0.25
    batch_size: int = 4
    downscale: int = 1
    level: int = 0
    mpp: float | None = None
    reader: str = "auto"
    normalise: Normalisation = field(default_factory=Normalisation)
    in_channels: int = 3
    num_classes: int = 2
    mask_values: str = "spread"  # spread: class k -> k * 255 // (K - 1); index: k
    amp: bool = True
    progress: bool = False
    thickness: int = DEFAULT_THICKNESS  # outline width of the overlay, in pixels
    outputs: SlideOutputs | None = None  # a probability pyramid, GeoJSON regions, glass left out


@dataclass(frozen=True)
class Segmented:
    """What `segment_image` did: the mask's size, the scale the network ran at, pixels per class."""

    width: int
    height: int
    level: int
    downscale: int
    counts: np.ndarray

    def shares(self) -> str:
        total = max(int(self.counts.sum()), 1)
        return ", ".join(f"class {k}: {c / total:.1%}" for k, c in enumerate(self.counts))


def mask_levels(num_classes: int, mask_values: str = "spread") -> np.ndarray:
    """The stored mask value of each class: k * 255 // (K - 1) ('spread', so 0/255 for two classes) or k."""
    if mask_values not in ("spread", "index"):
        raise ValueError(f"mask_values must be 'spread' or 'index', got {mask_values!r}")
    return np.array([k * 255 // max(num_classes - 1, 1) if mask_values == "spread" else k
                     for k in range(num_classes)], dtype=np.uint8)


def mpp_level(image, mpp: float, reader: str = "auto", given: bool = False) -> tuple[int, int, float]:
    """`level_for_mpp`, saying which flags choose the scale of an image that does not record its pixel size."""
    try:
        return level_for_mpp(image, mpp, reader)
    except ValueError as err:
        if "does not record its pixel size" not in str(err):
            raise
        origin = "" if given else " (the resolution the network was trained at, from its checkpoint)"
        raise ValueError(f"{image}: the file does not record its pixel size, so {mpp} µm per pixel{origin} cannot "
                         f"be found in it; choose the scale with --downscale N (and --level L), or with --mpp "
                         f"once you know it") from None


def segment_image(image: str | os.PathLike, model: torch.nn.Module, settings: SegmentSettings, *,
                  mask_path: str | os.PathLike, overlay_path: str | os.PathLike | None = None,
                  device: str | torch.device = "cpu") -> Segmented:
    """Segment `image` (any size) into `mask_path` and, when given, a class-outline overlay at `overlay_path`.

    Both files are written row by row as bands become final (PNG or TIFF by suffix) and appear atomically:
    after an error neither is left behind, half-written or stale. The one implementation behind
    `cocofast segment` and `cocofast predict`.
    """
    device = torch.device(device)
    level, factor = settings.level, settings.downscale
    if settings.mpp is not None:
        level, factor, _ = mpp_level(image, settings.mpp, settings.reader)
    if factor < 1:
        raise ValueError(f"downscale must be a positive integer (1 = full resolution), got {factor}")
    norm = Normalisation.parse(settings.normalise)
    num_classes = settings.num_classes
    reader = open_reader(image, settings.reader, level)
    try:
        if settings.in_channels == 1 and reader.channels >= 3:  # the authors' grayscale setting, but say so
            warnings.warn(f"{image}: an RGB image turned to gray (ITU-R 601 luma) for a network that takes 1 "
                          f"channel; its colour is not used", stacklevel=2)
        stats = image_stats(reader, norm, settings.in_channels)  # of the stored image, as training computes them
        source = DownscaledReader(reader, factor) if factor > 1 else reader
        scale = reader.level_shapes[0][1] / reader.width * factor  # level-0 pixels per network pixel
        outputs = settings.outputs
        skip = None
        if outputs is not None and outputs.skip_glass:
            skip = glass_windows(image, outputs, scale, (settings.window, settings.window), settings.reader)
        height, width = reader.height, reader.width
        levels = mask_levels(num_classes, settings.mask_values)
        counts = np.zeros(num_classes, np.int64)
        bands = blended_bands(lambda x: logits_of(model(x)), source, settings.window, settings.overlap,
                              settings.batch_size, num_classes, device=device, in_channels=settings.in_channels,
                              amp=settings.amp, normalise=norm, stats=stats, skip=skip,
                              # a window bar only where it helps (slides), not a flicker per small image
                              progress=settings.progress and source.height * source.width > 16 * settings.window**2)
        outlines = OutlineStream(height, settings.thickness)
        with contextlib.ExitStack() as stack:
            mask_writer = open_row_writer(stack.enter_context(atomic_path(mask_path)), height, width, 1,
                                          suffix=Path(mask_path).suffix)
            overlay_writer = None
            if overlay_path is not None:
                overlay_writer = open_row_writer(stack.enter_context(atomic_path(overlay_path)), height, width, 3,
                                                 suffix=Path(overlay_path).suffix)
            extras = None if outputs is None else BandOutputs(stack, outputs, source.height, source.width,
                                                              num_classes, scale, source.mpp)
            for top, scores in bands:
                labels = argmax_rows(scores)
                if extras is not None:  # at the network's resolution
                    extras.add(top, scores, labels)
                if factor > 1:  # back to full resolution: each low-resolution label covers factor^2 pixels
                    labels = labels.repeat(factor, 0).repeat(factor, 1)[:, :width]
                    top *= factor
                    labels = labels[:max(0, min(len(labels), height - top))]
                counts += np.bincount(labels.ravel(), minlength=num_classes)[:num_classes]
                mask_writer.write(levels[labels])
                if overlay_writer is None:
                    continue
                # Outline rows lag the labels by `thickness` rows (they depend on the rows below them).
                first, outline = outlines.push(labels)
                for start in range(0, len(outline), OVERLAY_ROWS):
                    rows = outline[start:start + OVERLAY_ROWS]
                    pixels = reader.read(first + start, 0, len(rows), width)
                    overlay_writer.write(paint_outlines(display_rgb(pixels, norm, stats), rows))
            mask_writer.close()
            if extras is not None:
                extras.close()
            if overlay_writer is not None:
                overlay_writer.close()
        return Segmented(width, height, level, factor, counts)
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------------------------
# checkpoints

def read_checkpoint(checkpoint: str | Path) -> dict:
    """A cocofast checkpoint as a dict: {"models": {role: {"model_name", "model_kwargs", "state_dict"}},
    "config": the training config (optional), ...}; ValueError/FileNotFoundError name the file."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    return cocofast.checkpoint.read_checkpoint(path)  # weights_only, checksum verified; CheckpointError is a ValueError


def model_from_checkpoint(ckpt: dict, role: str = "student", device="cpu", path: str | Path = "checkpoint",
                          trusted=()):
    """(model in eval mode, its entry) for `role` of a checkpoint read by `read_checkpoint`.

    A network that cannot be rebuilt from its entry (arguments its factory does not take, weights of another
    shape) is a ValueError naming the checkpoint and the role; an import path not in `trusted` is refused
    before anything is imported (cocofast.checkpoint.check_model_code).
    """
    entry = cocofast.checkpoint.model_spec(ckpt, role, path, trusted)
    try:
        model = create_model(entry["model_name"], **entry["model_kwargs"])
        model.load_state_dict(entry["state_dict"])
    except (TypeError, RuntimeError) as err:  # create_model's argument errors, load_state_dict's shape errors
        raise ValueError(f"checkpoint {path}: the {role!r} network ({entry['model_name']}) cannot be rebuilt "
                         f"from its entry: {err}") from None
    return model.to(device).eval(), entry


def load_model(checkpoint: str | Path, role: str = "student", device="cpu", trusted=()):
    """(model in eval mode, its checkpoint entry) from a cocofast checkpoint file; `trusted`: the import paths
    its network may be built from (cocofast.checkpoint.check_model_code)."""
    return model_from_checkpoint(read_checkpoint(checkpoint), role, device, checkpoint, trusted)


def checkpoint_normalisation(ckpt: dict) -> str:
    """The normalisation the checkpoint's networks were trained with ('range' when it does not say)."""
    config = ckpt.get("config")
    return str(config.get("normalise") or "range") if isinstance(config, dict) else "range"


@dataclass(frozen=True)
class TrainedInput:
    """What a network was trained on, as a checkpoint records it: the defaults of segment and predict."""

    window: int  # the training input side (config image_size)
    downscale: int  # config patch_size // image_size: patches were resized by that much before training
    in_channels: int
    num_classes: int
    normalise: str
    mpp: float | None = None  # config slide_mpp: the µm per pixel of a network trained on slides
    class_names: dict = field(default_factory=dict)  # class -> name, from config slide_classes


def trained_input(ckpt: dict, entry: dict, model: torch.nn.Module | None = None,
                  path: str | os.PathLike = "checkpoint") -> TrainedInput:
    """The window, downscale, channels, classes and normalisation a checkpoint's network was trained with.

    From the checkpoint's training config ("config": image_size, patch_size, in_channels, num_classes,
    normalise); channels and classes fall back to the entry's model_kwargs, then to the model's attributes
    (a network built from an import path need not take them as arguments), then to 3 and 2. Without a config
    the window is DEFAULT_WINDOW and the downscale 1. A config value that is not a positive integer is a
    ValueError naming the checkpoint and the key.
    """
    config = ckpt.get("config")
    config = config if isinstance(config, dict) else {}
    kwargs = entry.get("model_kwargs") or {}

    def number(key: str, minimum: int = 1) -> int | None:
        value = config.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"checkpoint {path}: training config {key!r} is {value!r}; expected an integer "
                             f">= {minimum}")
        return value

    def from_network(key: str, default: int) -> int:
        found = number(key)
        if found is None:
            found = kwargs.get(key, getattr(model, key, default))
        return int(found)

    window = number("image_size") or DEFAULT_WINDOW
    patch = number("patch_size", minimum=0) or 0
    downscale = max(1, patch // window) if patch else 1
    if patch and patch % window:
        warnings.warn(f"checkpoint {path}: trained on {patch} px patches resized to {window} px, not an integer "
                      f"ratio; segmenting at downscale {downscale} (choose one with --downscale or --mpp)",
                      stacklevel=2)
    mpp = config.get("slide_mpp")
    mpp = float(mpp) if isinstance(mpp, (int, float)) and not isinstance(mpp, bool) and mpp > 0 else None
    names = {}
    for item in str(config.get("slide_classes") or "").split(","):  # 'Tumor:1,Stroma:2'
        name, _, value = item.strip().rpartition(":")
        if name and value.strip().isdigit():
            names.setdefault(int(value), name.strip())
    return TrainedInput(window, downscale, from_network("in_channels", 3), from_network("num_classes", 2),
                        checkpoint_normalisation(ckpt), mpp, names)


def check_window(window: int, model: torch.nn.Module, name: str = "the network") -> None:
    """ValueError, suggesting the nearest usable sides, when `model` cannot take windows `window` pixels wide."""
    divisor = int(getattr(model, "input_divisor", 1))
    if window % divisor:
        lower, upper = window // divisor * divisor, (window // divisor + 1) * divisor
        raise ValueError(f"--window {window} is not a multiple of {divisor}, which {name} needs; try "
                         f"{lower or upper} or {upper}")


def device_of(name: str) -> torch.device:
    """The device a --device flag names; 'auto' is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------------------
# command line

def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m cocofast.segment",
                                 description="Segment an image of any size with a network from a cocofast checkpoint.")
    ap.add_argument("image", help="PNG, JPEG, TIFF, or a slide (SVS, NDPI, SCN, BIF; MRXS through OpenSlide)")
    ap.add_argument("--checkpoint", required=True, help="checkpoint written by cocofast training")
    ap.add_argument("--out", required=True, help="label image: .png, or .tif/.tiff for very large outputs")
    ap.add_argument("--overlay", help="optional image (.png or .tif): the input with class outlines drawn over it")
    ap.add_argument("--outline-width", type=int, default=DEFAULT_THICKNESS,
                    help=f"overlay outline width in pixels (default {DEFAULT_THICKNESS})")
    ap.add_argument("--role", default="student", help="which network of the checkpoint (default: student)")
    ap.add_argument("--trust-model-code", "--trust_model_code", action="append", metavar="FACTORY",
                    help=cocofast.checkpoint.TRUST_HELP)
    ap.add_argument("--window", type=int, help="window side in pixels (default: the training image_size of the "
                                               f"checkpoint's config, else {DEFAULT_WINDOW})")
    ap.add_argument("--overlap", type=float, default=0.25, help="window overlap fraction in [0, 1)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--downscale", type=int,
                    help="run the network at 1/N resolution (2 for a model trained on 1024 px patches resized "
                         "to 512); the mask is written at the resolution of the level read (default: the "
                         "checkpoint config's patch_size // image_size, else 1)")
    ap.add_argument("--mpp", type=float,
                    help="run the network at about this many µm per pixel: picks the pyramid level and the "
                         "downscale factor from the slide's metadata (instead of --level/--downscale)")
    ap.add_argument("--normalise", help="how stored pixels become network input: range, range:LOW:HIGH, "
                                        "percentile:P:Q or meanstd:M,..:S,.. (default: what the checkpoint's "
                                        "training config used, else range)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    ap.add_argument("--no-amp", action="store_true", help="run in float32 on the GPU")
    ap.add_argument("--reader", default="auto", choices=["auto", "pil", "tiff", "openslide"])
    ap.add_argument("--level", type=int, help="pyramid level of a slide (default 0 = full resolution)")
    ap.add_argument("--mask-values", default="spread", choices=["spread", "index"],
                    help="spread: class k is written as k*255/(K-1) (0/255 for two classes); index: k")
    ap.add_argument("--probabilities", help="also write per-class probabilities as a pyramidal tiled TIFF (.tif) "
                                            "at the resolution the network ran at")
    ap.add_argument("--probability-dtype", default="uint8", choices=["uint8", "float16"],
                    help="uint8: round(255 p); float16: p")
    ap.add_argument("--geojson", help="also write the predicted regions as QuPath GeoJSON (.geojson), level-0 "
                                      "coordinates, classes named as in training (config slide_classes)")
    ap.add_argument("--geojson-tolerance", type=float,
                    help="simplify the GeoJSON polygons to this many level-0 pixels (default: one network pixel; "
                         "0: the mask's staircase exactly)")
    ap.add_argument("--skip-glass", action="store_true",
                    help="do not run the network on windows without tissue (an Otsu saturation mask of the "
                         "thumbnail); they get class 0")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def _check_arguments(args) -> str | None:
    """The first bad argument, as a message; None when all are usable."""
    if args.window is not None and args.window < 1:
        return f"--window {args.window}: must be a positive number of pixels"
    if not 0.0 <= args.overlap < 1.0:
        return f"--overlap {args.overlap}: must be a fraction in [0, 1)"
    if args.batch_size < 1:
        return f"--batch-size {args.batch_size}: must be at least 1"
    if args.downscale is not None and args.downscale < 1:
        return f"--downscale {args.downscale}: must be a positive integer (1 = full resolution)"
    if args.level is not None and args.level < 0:
        return f"--level {args.level}: must be >= 0"
    if args.outline_width < 1:
        return f"--outline-width {args.outline_width}: must be at least 1 pixel"
    if args.mpp is not None and not (args.mpp > 0 and math.isfinite(args.mpp)):
        return f"--mpp {args.mpp}: must be a finite positive number of µm per pixel"
    if args.mpp is not None and (args.level is not None or args.downscale is not None):  # even --level 0
        return "--mpp picks the level and downscale itself; give either --mpp or --level/--downscale"
    source = Path(args.image)
    named = [("out", Path(args.out))] + ([("overlay", Path(args.overlay))] if args.overlay else [])
    for name, path in named:
        if path.suffix.lower() not in (".png", ".tif", ".tiff"):
            return f"--{name} {path}: expected a .png, .tif or .tiff file name"
        if _same_file(path, source):
            return f"--{name} {path} is the input image; refusing to overwrite it"
        if path.is_dir():
            return f"--{name} {path} is a folder; expected a file name"
        parent = next((p for p in [path.absolute().parent, *path.absolute().parents] if p.exists()), None)
        if parent is None or not os.access(parent, os.W_OK | os.X_OK) or not parent.is_dir():
            return f"--{name} {path}: cannot write there ({parent} is not a writable folder)"
    for name, suffixes in (("probabilities", (".tif", ".tiff")), ("geojson", (".geojson", ".json"))):
        path = getattr(args, name) and Path(getattr(args, name))
        if path and (path.suffix.lower() not in suffixes or _same_file(path, source) or path.is_dir()
                     or any(_same_file(path, p) for _, p in named)):
            return f"--{name} {path}: expected a new {' or '.join(suffixes)} file name, not the input or another output"
    if getattr(args, "geojson_tolerance", None) is not None and not args.geojson_tolerance >= 0:
        return f"--geojson-tolerance {args.geojson_tolerance}: must be >= 0 level-0 pixels"
    if args.overlay and _same_file(Path(args.overlay), Path(args.out)):
        return f"--overlay {args.overlay} and --out name the same file"
    if args.normalise:
        try:
            Normalisation.parse(args.normalise)
        except ValueError as err:
            return f"--normalise: {err}"
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b) or a.resolve() == b.resolve()
    except OSError:
        return False


def network_and_settings(args, device) -> tuple[torch.nn.Module, SegmentSettings]:
    """The checkpoint's network and the settings a CLI's arguments ask for, the unset ones taken from what the
    network was trained on (`trained_input`); shared by `segment` and `predict`."""
    ckpt = read_checkpoint(args.checkpoint)
    trusted = cocofast.checkpoint.trusted_paths(getattr(args, "trust_model_code", None))
    model, entry = model_from_checkpoint(ckpt, args.role, device, args.checkpoint, trusted)
    trained = trained_input(ckpt, entry, model, args.checkpoint)
    settings = SegmentSettings(
        window=args.window or trained.window, overlap=args.overlap, batch_size=args.batch_size,
        downscale=args.downscale or trained.downscale, level=args.level or 0, mpp=default_mpp(args, trained),
        reader=args.reader,
        normalise=Normalisation.parse(args.normalise or trained.normalise), in_channels=trained.in_channels,
        num_classes=trained.num_classes, mask_values=args.mask_values, amp=not args.no_amp,
        progress=not args.quiet, thickness=args.outline_width, outputs=SlideOutputs(
            class_names=trained.class_names, skip_glass=getattr(args, "skip_glass", False),
            probability_dtype=getattr(args, "probability_dtype", "uint8"),
            tolerance=getattr(args, "geojson_tolerance", None)))
    check_window(settings.window, model, entry["model_name"])
    return model, settings


def default_mpp(args, trained: TrainedInput) -> float | None:
    """--mpp; else, when neither --level nor --downscale chooses the scale, the training resolution."""
    if args.mpp is not None or args.level is not None or args.downscale is not None:
        return args.mpp
    return trained.mpp


def main(argv=None) -> int:
    args = _parse(argv)
    problem = _check_arguments(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    device = device_of(args.device)
    try:
        model, settings = network_and_settings(args, device)
        mpp, settings = settings.mpp, replace(settings, mpp=None)  # --mpp is resolved below, to say what was chosen
        if mpp is not None:  # resolved here, not in segment_image, to say what was chosen before the run
            level, factor, got = mpp_level(args.image, mpp, args.reader, given=args.mpp is not None)
            if abs(got / mpp - 1) > 0.1:
                print(f"note: {args.image}: the nearest to {mpp} µm per pixel is {got:.4g} "
                      f"(level {level}, downscale {factor})", file=sys.stderr)
            settings = replace(settings, level=level, downscale=factor)
        # decode errors mid-slide, a full disk: no output is left behind
        settings = replace(settings, outputs=replace(
            settings.outputs, probabilities=args.probabilities and Path(args.probabilities),
            geojson=args.geojson and Path(args.geojson)))
        done = segment_image(args.image, model, settings, mask_path=args.out, overlay_path=args.overlay,
                             device=device)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.image}: {done.width}x{done.height} -> {args.out} (window {settings.window}, downscale "
          f"{done.downscale}; {done.shares()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
