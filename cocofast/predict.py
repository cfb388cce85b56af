"""Segment a batch of images or slides into label masks and outline overlays, resumably.

    cocofast predict SLIDES/ --checkpoint run/student/best.pt --out predictions/
    cocofast predict slides.txt --checkpoint ... --out ... [--window 512] [--mpp 1.0 | --downscale 2]

INPUT is a folder (every image directly inside it: PNG, JPEG, TIFF, SVS, NDPI, ...) or a list file (one
path per line; relative paths are relative to the list file; blank lines and lines starting with # are
skipped). For each image NAME.ext it writes OUT/masks/NAME.png and OUT/overlays/NAME.png (class outlines, see
cocofast.overlay; --format tif for slides too large for PNG viewers), each atomically, so an output that exists
is complete: a rerun skips images whose outputs exist (--overwrite redoes them). A file that fails (corrupt,
unreadable, out of memory) is reported and the batch goes on; failures are listed at the end and in
OUT/failures.txt. Exit status: 0 all done, 1 some images failed, 2 bad arguments (nothing is written).

Each image goes through the same sliding-window inference as `cocofast segment` (Gaussian-blended windows,
one band of the image in memory at a time, the checkpoint's input normalisation).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cocofast.checkpoint import read_checkpoint
from cocofast.data.imageio import IMAGE_SUFFIXES, OPENSLIDE_SUFFIXES, TIFF_SUFFIXES
from cocofast.data.normalise import Normalisation, image_stats
from cocofast.data.slides import DownscaledReader, level_for_mpp, open_reader
from cocofast.data.writers import open_row_writer
from cocofast.io import atomic_path, atomic_write_text
from cocofast.models import logits_of
from cocofast.overlay import DEFAULT_THICKNESS, OutlineStream, display_rgb, paint_outlines
from cocofast.segment import argmax_rows, blended_bands, checkpoint_normalisation, model_from_checkpoint

SUFFIXES = tuple(dict.fromkeys(IMAGE_SUFFIXES + TIFF_SUFFIXES + OPENSLIDE_SUFFIXES))
FAILURES_FILE = "failures.txt"
OVERLAY_ROWS = 64  # overlay rows converted at a time: bounds the float temporaries of wide slides


@dataclass(frozen=True)
class Settings:
    """How every image of a batch is segmented and written."""

    window: int = 512
    overlap: float = 0.25
    batch_size: int = 4
    downscale: int = 1
    level: int = 0
    mpp: float | None = None
    reader: str = "auto"
    amp: bool = True
    mask_values: str = "spread"
    suffix: str = ".png"
    overlays: bool = True
    thickness: int = DEFAULT_THICKNESS
    progress: bool = False


@dataclass(frozen=True)
class Job:
    image: Path
    mask: Path
    overlay: Path | None

    def finished(self) -> bool:
        return self.mask.is_file() and (self.overlay is None or self.overlay.is_file())


def predict_image(job: Job, model: torch.nn.Module, norm: Normalisation, settings: Settings,
                  device: torch.device) -> np.ndarray:
    """Segment one image into job.mask (and its outline overlay); returns the pixel count of each class."""
    kwargs = getattr(model, "model_kwargs", {})  # networks registered elsewhere may lack the attributes
    num_classes = int(getattr(model, "num_classes", kwargs.get("num_classes", 2)))
    in_channels = int(getattr(model, "in_channels", kwargs.get("in_channels", 3)))
    level, factor = settings.level, settings.downscale
    if settings.mpp is not None:
        level, factor, _ = level_for_mpp(job.image, settings.mpp, settings.reader)
    reader = open_reader(job.image, settings.reader, level)
    try:
        stats = image_stats(reader, norm, in_channels)
        source = DownscaledReader(reader, factor) if factor > 1 else reader
        height, width = reader.height, reader.width
        levels = np.array([k * 255 // max(num_classes - 1, 1) if settings.mask_values == "spread" else k
                           for k in range(num_classes)], dtype=np.uint8)
        counts = np.zeros(num_classes, np.int64)
        bands = blended_bands(lambda x: logits_of(model(x)), source, settings.window, settings.overlap,
                              settings.batch_size, num_classes, device=device, in_channels=in_channels,
                              amp=settings.amp, normalise=norm, stats=stats,
                              # a window bar only where it helps (slides), not a flicker per small image
                              progress=settings.progress and source.height * source.width > 16 * settings.window ** 2)
        outlines = OutlineStream(height, settings.thickness)
        with contextlib.ExitStack() as stack:
            mask_writer = open_row_writer(stack.enter_context(atomic_path(job.mask)), height, width, 1,
                                          suffix=job.mask.suffix)
            overlay_writer = None
            if job.overlay is not None:
                overlay_writer = open_row_writer(stack.enter_context(atomic_path(job.overlay)), height, width, 3,
                                                 suffix=job.overlay.suffix)
            for top, scores in bands:
                labels = argmax_rows(scores)
                if factor > 1:  # back to full resolution: each low-resolution label covers factor^2 pixels
                    labels = labels.repeat(factor, 0).repeat(factor, 1)[:, :width]
                    top *= factor
                    labels = labels[:max(0, min(len(labels), height - top))]
                counts += np.bincount(labels.ravel(), minlength=num_classes)[:num_classes]
                mask_writer.write(levels[labels])
                if overlay_writer is None:
                    continue
                first, outline = outlines.push(labels)
                for start in range(0, len(outline), OVERLAY_ROWS):
                    rows = outline[start:start + OVERLAY_ROWS]
                    pixels = reader.read(first + start, 0, len(rows), width)
                    overlay_writer.write(paint_outlines(display_rgb(pixels, norm, stats), rows))
            mask_writer.close()
            if overlay_writer is not None:
                overlay_writer.close()
        return counts
    finally:
        reader.close()


# --- what to do ------------------------------------------------------------------------------------------
def list_images(source: Path) -> list[Path]:
    """The images a folder holds (sorted), or the paths a list file names (in its order)."""
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if source.suffix.lower() in SUFFIXES:
        return [source]
    images = []
    for line in source.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line).expanduser()
            images.append(path if path.is_absolute() else source.parent / path)
    return images


def plan_jobs(images: list[Path], out: Path, settings: Settings) -> list[Job]:
    """One job per image; ValueError when two images would share an output or an output is an input."""
    jobs, owners = [], {}
    for image in images:
        mask = out / "masks" / f"{image.stem}{settings.suffix}"
        overlay = out / "overlays" / f"{image.stem}{settings.suffix}" if settings.overlays else None
        if mask in owners:
            raise ValueError(f"{owners[mask]} and {image} would both write {mask}; rename one, or predict them "
                             f"into different --out folders")
        owners[mask] = image
        jobs.append(Job(image, mask, overlay))
    inputs = {os.path.abspath(j.image) for j in jobs}
    for job in jobs:
        for path in (job.mask, job.overlay):
            if path is not None and os.path.abspath(path) in inputs:
                raise ValueError(f"{path} is an input image; refusing to overwrite it (choose another --out)")
    return jobs


# --- command line ----------------------------------------------------------------------------------------
def _parse(argv):
    ap = argparse.ArgumentParser(prog="cocofast predict", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[4:]))
    ap.add_argument("input", help="a folder of images, a list file (one path per line), or one image")
    ap.add_argument("--checkpoint", required=True, help="checkpoint written by cocofast training")
    ap.add_argument("--out", required=True, help="folder for masks/ and overlays/")
    ap.add_argument("--role", default="student", help="which network of the checkpoint (default: student)")
    ap.add_argument("--window", type=int, default=512, help="window side in pixels (default 512)")
    ap.add_argument("--overlap", type=float, default=0.25, help="window overlap fraction in [0, 1)")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    ap.add_argument("--downscale", type=int, default=1, help="run the network at 1/N resolution")
    ap.add_argument("--level", type=int, default=0, help="pyramid level of slides (0 = full resolution)")
    ap.add_argument("--mpp", type=float, help="run at about this many µm per pixel (instead of --level/--downscale)")
    ap.add_argument("--reader", default="auto", choices=["auto", "pil", "tiff", "openslide"])
    ap.add_argument("--normalise", help="input normalisation (default: the checkpoint's training config)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    ap.add_argument("--no-amp", action="store_true", help="run in float32 on the GPU")
    ap.add_argument("--mask-values", default="spread", choices=["spread", "index"],
                    help="spread: class k is written as k*255/(K-1); index: k")
    ap.add_argument("--format", default="png", choices=["png", "tif"], help="file type of masks and overlays")
    ap.add_argument("--outline-width", type=int, default=DEFAULT_THICKNESS, help="outline width in pixels")
    ap.add_argument("--no-overlays", action="store_true", help="write masks only")
    ap.add_argument("--overwrite", action="store_true", help="redo images whose outputs already exist")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def _check_arguments(args) -> str | None:
    """The first bad argument, as a message; None when all are usable."""
    checks = [(args.window >= 1, f"--window {args.window}: must be a positive number of pixels"),
              (0.0 <= args.overlap < 1.0, f"--overlap {args.overlap}: must be a fraction in [0, 1)"),
              (args.batch_size >= 1, f"--batch-size {args.batch_size}: must be at least 1"),
              (args.downscale >= 1, f"--downscale {args.downscale}: must be a positive integer"),
              (args.level >= 0, f"--level {args.level}: must be >= 0"),
              (args.mpp is None or args.mpp > 0, f"--mpp {args.mpp}: must be a positive number of µm per pixel"),
              (args.mpp is None or not (args.level or args.downscale > 1),
               "--mpp picks the level and downscale itself; give either --mpp or --level/--downscale"),
              (args.outline_width >= 1, f"--outline-width {args.outline_width}: must be at least 1 pixel"),
              (Path(args.input).exists(), f"{args.input}: no such folder, list file or image"),
              (not Path(args.out).exists() or Path(args.out).is_dir(), f"--out {args.out}: exists and is not a folder")]
    return next((message for ok, message in checks if not ok), None)


def main(argv=None) -> int:
    args = _parse(argv)
    problem = _check_arguments(args)
    if problem:
        print(f"cocofast predict: error: {problem}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    settings = Settings(window=args.window, overlap=args.overlap, batch_size=args.batch_size,
                        downscale=args.downscale, level=args.level, mpp=args.mpp, reader=args.reader,
                        amp=not args.no_amp, mask_values=args.mask_values, suffix=f".{args.format}",
                        overlays=not args.no_overlays, thickness=args.outline_width, progress=not args.quiet)
    try:
        ckpt = read_checkpoint(args.checkpoint)
        model, entry = model_from_checkpoint(ckpt, args.role, device, args.checkpoint)
        norm = Normalisation.parse(args.normalise or checkpoint_normalisation(ckpt))
        divisor = int(getattr(model, "input_divisor", 1))
        if args.window % divisor:
            raise ValueError(f"--window {args.window} is not a multiple of {divisor}, which "
                             f"{entry['model_name']} needs")
        source = Path(args.input)
        images = list_images(source)
        if not images:
            raise ValueError(f"{source}: holds no images (looked for {', '.join(SUFFIXES)})")
        jobs = plan_jobs(images, Path(args.out), settings)
    # TypeError and RuntimeError: a checkpoint whose arguments or weights do not fit its network.
    except (ValueError, OSError, UnicodeDecodeError, TypeError, RuntimeError) as err:
        print(f"cocofast predict: error: {err}", file=sys.stderr)
        return 2
    return run_jobs(jobs, model, norm, settings, device, Path(args.out), overwrite=args.overwrite)


def run_jobs(jobs: list[Job], model, norm: Normalisation, settings: Settings, device, out: Path, *,
             overwrite: bool = False) -> int:
    from tqdm import tqdm

    done = skipped = 0
    failures: list[tuple[Path, str]] = []
    with tqdm(jobs, desc="predict", unit="image", disable=not settings.progress) as bar:
        for job in bar:
            bar.set_postfix_str(job.image.name)
            if job.finished() and not overwrite:
                skipped += 1
                continue
            try:
                predict_image(job, model, norm, settings, device)
                done += 1
            except Exception as err:  # one bad file must not stop the batch; the message names it
                failures.append((job.image, f"{type(err).__name__}: {err}"))
                tqdm.write(f"cocofast predict: {job.image}: failed: {failures[-1][1]}", file=sys.stderr)
    report = out / FAILURES_FILE
    if failures:
        atomic_write_text("".join(f"{path}\t{why}\n" for path, why in failures), report)
    elif report.exists():
        report.unlink()  # a rerun that redid the failed images leaves no stale list behind
    print(f"cocofast predict: {done} segmented, {skipped} already done, {len(failures)} failed -> {out}")
    for path, why in failures:
        print(f"  failed: {path}: {why}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
