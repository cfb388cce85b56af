"""Segment images of any size with a trained network: overlapping windows, Gaussian blending, bounded memory.

    python -m cocofast.segment SLIDE.svs --checkpoint runs/demo/checkpoint.pt --out mask.png \\
        [--overlay overlay.png] [--role student] [--window 512] [--overlap 0.25] [--downscale 2 | --mpp 1.0]
        [--level 1] [--normalise range|range:LOW:HIGH|percentile:P:Q|meanstd:M:S]

Input pixels become network input by `cocofast.data.normalise` - the rule training used; by default the
normalisation recorded in the checkpoint's training config.

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
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

import cocofast.checkpoint
from cocofast.data.normalise import Normalisation, image_stats, network_input, to_unit_range, values_outside
from cocofast.data.slides import ArrayReader, DownscaledReader, level_for_mpp, open_reader
from cocofast.data.tiling import axis_starts, stride_from_fraction
from cocofast.data.writers import open_row_writer

# Overlay colours per class (class 0 is left untinted): cancer red, then further distinct colours.
PALETTE = np.array([[0, 0, 0], [230, 25, 45], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180]],
                   dtype=np.float32)


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
                  stats: np.ndarray | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (top, scores): blended class scores (num_classes, n, W) on `device` for rows top..top+n-1,
    band after band, top to bottom; together they cover the image exactly once.

    predict_fn maps a float32 batch (B, C, wh, ww) on `device`, made from stored pixels by
    `cocofast.data.normalise.network_input` with `normalise` (and, for percentiles, the whole image's `stats`),
    to scores (B, K, wh, ww); activation "softmax" blends probabilities, None blends raw outputs (what MONAI
    does). Images smaller than the window are padded by repeating their edge pixels; padded pixels are never
    output. Values outside the declared stored range are clipped, with one warning.
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
    weight = gaussian_importance((wh, ww), sigma_scale, device)
    padded_w = max(width, ww)
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
            outside = None if warned else values_outside(band, norm, stored)
            if outside is not None:
                warnings.warn(f"stored values {outside[0]:g}..{outside[1]:g} fall outside the declared range "
                              f"{norm.stored_range(stored)}; clipped (declare the range with range:LOW:HIGH)",
                              stacklevel=2)
                warned = True
            if band.shape[0] < wh or band.shape[1] < ww:  # image smaller than the window
                band = np.pad(band, ((0, max(wh - band.shape[0], 0)), (0, max(ww - band.shape[1], 0)), (0, 0)),
                              mode="edge")
            for start in range(0, len(xs), batch_size):
                chunk = xs[start:start + batch_size]
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
# command line

def read_checkpoint(checkpoint: str | Path) -> dict:
    """A cocofast checkpoint as a dict: {"models": {role: {"model_name", "model_kwargs", "state_dict"}},
    "config": the training config (optional), ...}; ValueError/FileNotFoundError name the file."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    return cocofast.checkpoint.read_checkpoint(path)  # weights_only, checksum verified; CheckpointError is a ValueError


def model_from_checkpoint(ckpt: dict, role: str = "student", device="cpu", path: str | Path = "checkpoint"):
    """(model in eval mode, its entry) for `role` of a checkpoint read by `read_checkpoint`."""
    models = ckpt["models"]
    if role not in models:
        raise ValueError(f"{path}: no network for role {role!r}; roles in this checkpoint: "
                         f"{', '.join(sorted(models)) or 'none'} (choose one with --role)")
    entry = models[role]
    missing = {"model_name", "model_kwargs", "state_dict"} - set(entry)
    if missing:
        raise ValueError(f"{path}: role {role!r} lacks {', '.join(sorted(missing))}")
    from cocofast.models import create_model

    model = create_model(entry["model_name"], **entry["model_kwargs"])
    model.load_state_dict(entry["state_dict"])
    return model.to(device).eval(), entry


def load_model(checkpoint: str | Path, role: str = "student", device="cpu"):
    """(model in eval mode, its checkpoint entry) from a cocofast checkpoint file."""
    return model_from_checkpoint(read_checkpoint(checkpoint), role, device, checkpoint)


def checkpoint_normalisation(ckpt: dict) -> str:
    """The normalisation the checkpoint's networks were trained with ('range' when it does not say)."""
    config = ckpt.get("config")
    return str(config.get("normalise") or "range") if isinstance(config, dict) else "range"


def logits_of(output) -> torch.Tensor:
    """The logits of a network output: a tensor, or SegOutput / a tuple whose first item is the logits."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m cocofast.segment",
                                 description="Segment an image of any size with a network from a cocofast checkpoint.")
    ap.add_argument("image", help="PNG, JPEG, TIFF, or a slide (SVS, NDPI, SCN, BIF; MRXS through OpenSlide)")
    ap.add_argument("--checkpoint", required=True, help="checkpoint written by cocofast training")
    ap.add_argument("--out", required=True, help="label image: .png, or .tif/.tiff for very large outputs")
    ap.add_argument("--overlay", help="optional image (.png or .tif) with predicted classes tinted over the input")
    ap.add_argument("--role", default="student", help="which network of the checkpoint (default: student)")
    ap.add_argument("--window", type=int, default=512, help="window side in pixels (default 512)")
    ap.add_argument("--overlap", type=float, default=0.25, help="window overlap fraction in [0, 1)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--downscale", type=int, default=1,
                    help="run the network at 1/N resolution (2 for a model trained on 1024 px patches resized "
                         "to 512); the mask is written at the resolution of the level read")
    ap.add_argument("--mpp", type=float,
                    help="run the network at about this many µm per pixel: picks the pyramid level and the "
                         "downscale factor from the slide's metadata (instead of --level/--downscale)")
    ap.add_argument("--normalise", help="how stored pixels become network input: range, range:LOW:HIGH, "
                                        "percentile:P:Q or meanstd:M,..:S,.. (default: what the checkpoint's "
                                        "training config used, else range)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    ap.add_argument("--no-amp", action="store_true", help="run in float32 on the GPU")
    ap.add_argument("--reader", default="auto", choices=["auto", "pil", "tiff", "openslide"])
    ap.add_argument("--level", type=int, default=0, help="pyramid level of a slide (0 = full resolution)")
    ap.add_argument("--mask-values", default="spread", choices=["spread", "index"],
                    help="spread: class k is written as k*255/(K-1) (0/255 for two classes); index: k")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def _check_arguments(args) -> str | None:
    """The first bad argument, as a message; None when all are usable."""
    if args.window < 1:
        return f"--window {args.window}: must be a positive number of pixels"
    if not 0.0 <= args.overlap < 1.0:
        return f"--overlap {args.overlap}: must be a fraction in [0, 1)"
    if args.batch_size < 1:
        return f"--batch-size {args.batch_size}: must be at least 1"
    if args.downscale < 1:
        return f"--downscale {args.downscale}: must be a positive integer (1 = full resolution)"
    if args.level < 0:
        return f"--level {args.level}: must be >= 0"
    if args.mpp is not None and not args.mpp > 0:
        return f"--mpp {args.mpp}: must be a positive number of µm per pixel"
    if args.mpp is not None and (args.level or args.downscale > 1):
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


def main(argv=None) -> int:
    args = _parse(argv)
    problem = _check_arguments(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    try:
        ckpt = read_checkpoint(args.checkpoint)
        model, entry = model_from_checkpoint(ckpt, args.role, device, args.checkpoint)
        norm = Normalisation.parse(args.normalise or checkpoint_normalisation(ckpt))
        level, factor = args.level, args.downscale
        if args.mpp is not None:
            level, factor, got = level_for_mpp(args.image, args.mpp, args.reader)
            if abs(got / args.mpp - 1) > 0.1:
                print(f"note: {args.image}: the nearest to {args.mpp} µm per pixel is {got:.4g} "
                      f"(level {level}, downscale {factor})", file=sys.stderr)
        reader = open_reader(args.image, args.reader, level)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return _segment(args, model, entry, reader, factor, norm, device)
    except (ValueError, OSError) as err:  # decode errors mid-slide, a full disk: no output is left behind
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        reader.close()


def _segment(args, model, entry, reader, factor: int, norm: Normalisation, device: torch.device) -> int:
    from cocofast.io import atomic_path

    num_classes = int(entry["model_kwargs"].get("num_classes", getattr(model, "num_classes", 2)))
    in_channels = int(entry["model_kwargs"].get("in_channels", getattr(model, "in_channels", 3)))
    divisor = int(getattr(model, "input_divisor", 1))
    if args.window % divisor:
        lower, upper = args.window // divisor * divisor, (args.window // divisor + 1) * divisor
        raise ValueError(f"--window {args.window} is not a multiple of {divisor}, which {entry['model_name']} "
                         f"needs; try {lower or upper} or {upper}")
    stats = image_stats(reader, norm, in_channels)  # of the stored image, as training computes them
    source = DownscaledReader(reader, factor) if factor > 1 else reader
    height, width = reader.height, reader.width
    levels = np.array([k * 255 // (num_classes - 1) if args.mask_values == "spread" else k
                       for k in range(num_classes)], dtype=np.uint8)
    counts = np.zeros(num_classes, np.int64)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return logits_of(model(x))

    bands = blended_bands(predict, source, args.window, args.overlap, args.batch_size, num_classes,
                          device=device, in_channels=in_channels, amp=not args.no_amp,
                          progress=not args.quiet, normalise=norm, stats=stats)
    outputs = [(Path(args.out), 1)] + ([(Path(args.overlay), 3)] if args.overlay else [])
    with contextlib.ExitStack() as stack:
        writers = [open_row_writer(stack.enter_context(atomic_path(path)), height, width, channels,
                                   suffix=path.suffix) for path, channels in outputs]
        for top, scores in bands:
            labels = argmax_rows(scores)
            if factor > 1:  # back to full resolution: each low-resolution label covers factor^2 pixels
                labels = labels.repeat(factor, 0).repeat(factor, 1)[:, :width]
                top *= factor
                labels = labels[:max(0, min(len(labels), height - top))]
            counts += np.bincount(labels.ravel(), minlength=num_classes)[:num_classes]
            writers[0].write(levels[labels])
            for start in range(0, len(labels) if args.overlay else 0, 64):  # in slices: float temporaries
                rows = labels[start:start + 64]
                pixels = reader.read(top + start, 0, len(rows), width)
                writers[1].write(_tint(pixels, rows, norm, stats if in_channels == 3 or pixels.shape[2] < 3
                                       else None))
        for writer in writers:
            writer.close()
    total = max(int(counts.sum()), 1)
    shares = ", ".join(f"class {k}: {c / total:.1%}" for k, c in enumerate(counts))
    print(f"{args.image}: {width}x{height} -> {args.out} ({shares})")
    return 0


def _tint(pixels: np.ndarray, labels: np.ndarray, norm: Normalisation, stats, alpha: float = 0.4) -> np.ndarray:
    """Input rows (n, W, C) shown as the network saw them (the [0, 1] stage of the rule), blended with the class
    colours; class 0 stays as it is."""
    channels = 3 if pixels.shape[2] >= 3 else 1
    if norm.mode == "percentile" and (stats is None or stats.shape[1] != channels):
        norm = Normalisation()  # statistics of another channel layout: show the stored range instead
    rgb = to_unit_range(pixels, channels, norm, stats=stats).transpose(1, 2, 0) * 255.0
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    colour = PALETTE[np.minimum(labels, len(PALETTE) - 1)]
    tinted = labels[..., None] > 0
    rgb = np.where(tinted, (1 - alpha) * rgb + alpha * colour, rgb)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


if __name__ == "__main__":
    sys.exit(main())
