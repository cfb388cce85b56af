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

Each image goes through `cocofast.segment.segment_image`, the function behind `cocofast segment` (Gaussian-
blended windows, one band of the image in memory at a time), with the same defaults: window, downscale,
channels, classes and input normalisation as the checkpoint's training config records them.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cocofast.data.imageio import IMAGE_SUFFIXES, OPENSLIDE_SUFFIXES, TIFF_SUFFIXES
from cocofast.io import atomic_write_text
from cocofast.overlay import DEFAULT_THICKNESS
from cocofast.segment import SegmentSettings, Segmented, device_of, network_and_settings, segment_image

SUFFIXES = tuple(dict.fromkeys(IMAGE_SUFFIXES + TIFF_SUFFIXES + OPENSLIDE_SUFFIXES))
FAILURES_FILE = "failures.txt"


@dataclass(frozen=True)
class Settings:
    """How every image of a batch is segmented (`segment`) and which files it gets."""

    segment: SegmentSettings = field(default_factory=SegmentSettings)
    suffix: str = ".png"
    overlays: bool = True
    progress: bool = False  # the per-image bar; segment.progress is the per-window bar of large images


@dataclass(frozen=True)
class Job:
    image: Path
    mask: Path
    overlay: Path | None

    def finished(self) -> bool:
        return self.mask.is_file() and (self.overlay is None or self.overlay.is_file())


def predict_image(job: Job, model: torch.nn.Module, settings: Settings, device: torch.device) -> Segmented:
    """Segment one image into job.mask (and its outline overlay) exactly as `cocofast segment` does."""
    return segment_image(job.image, model, settings.segment, mask_path=job.mask, overlay_path=job.overlay,
                         device=device)


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
    ap.add_argument("--window", type=int, help="window side in pixels (default: the checkpoint config's "
                                               "image_size, else 512)")
    ap.add_argument("--overlap", type=float, default=0.25, help="window overlap fraction in [0, 1)")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    ap.add_argument("--downscale", type=int, help="run the network at 1/N resolution (default: the checkpoint "
                                                  "config's patch_size // image_size, else 1)")
    ap.add_argument("--level", type=int, help="pyramid level of slides (default 0 = full resolution)")
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
    checks = [(args.window is None or args.window >= 1,
               f"--window {args.window}: must be a positive number of pixels"),
              (0.0 <= args.overlap < 1.0, f"--overlap {args.overlap}: must be a fraction in [0, 1)"),
              (args.batch_size >= 1, f"--batch-size {args.batch_size}: must be at least 1"),
              (args.downscale is None or args.downscale >= 1,
               f"--downscale {args.downscale}: must be a positive integer"),
              (args.level is None or args.level >= 0, f"--level {args.level}: must be >= 0"),
              (args.mpp is None or args.mpp > 0, f"--mpp {args.mpp}: must be a positive number of µm per pixel"),
              (args.mpp is None or (args.level is None and args.downscale is None),  # even --level 0
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
    device = device_of(args.device)
    try:
        model, segment = network_and_settings(args, device)
        settings = Settings(segment, suffix=f".{args.format}", overlays=not args.no_overlays,
                            progress=not args.quiet)
        source = Path(args.input)
        images = list_images(source)
        if not images:
            raise ValueError(f"{source}: holds no images (looked for {', '.join(SUFFIXES)})")
        jobs = plan_jobs(images, Path(args.out), settings)
    except (ValueError, OSError, UnicodeDecodeError) as err:
        print(f"cocofast predict: error: {err}", file=sys.stderr)
        return 2
    return run_jobs(jobs, model, settings, device, Path(args.out), overwrite=args.overwrite)


def run_jobs(jobs: list[Job], model, settings: Settings, device, out: Path, *, overwrite: bool = False) -> int:
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
                predict_image(job, model, settings, device)
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
