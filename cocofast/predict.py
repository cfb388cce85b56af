"""Segment a batch of images or slides into label masks and outline overlays, resumably.

    cocofast predict SLIDES/ --checkpoint run/student/best.pt --out predictions/
    cocofast predict slides.txt --checkpoint ... --out ... [--window 512] [--mpp 1.0 | --downscale 2]

INPUT is a folder (every image directly inside it: PNG, JPEG, TIFF, SVS, NDPI, ...) or a list file (one
path per line; relative paths are relative to the list file; blank lines and lines starting with # are
skipped). For each image NAME.ext it writes OUT/masks/NAME.png and OUT/overlays/NAME.png (class outlines, see
cocofast.overlay; --format tif for slides too large for PNG viewers), each atomically, so an output that exists
is complete. OUT/manifest.jsonl records what made each output: the network's content digest (name, arguments,
weights), the role, window, overlap, downscale, level, mpp, reader, normalisation, classes, mask values, amp,
outline width, and the input's size and modification time. A rerun skips an output made by the same network
and settings from the same input, redoes one whose input changed, and refuses (exit 2, naming what differs)
to mix in outputs made by another network or settings, or outputs it has no record of: choose another --out,
or pass --overwrite to redo them. One run at a time holds OUT (a lock, OUT/.predict.lock; a second run exits
2 naming the holder), and it clears the hidden temporaries a killed run left. A file that fails (corrupt,
unreadable, out of memory) is reported and the batch goes on; failures are listed at the end and in
OUT/failures.txt. Exit status: 0 all done, 1 some images failed, 2 bad arguments (nothing is written), 130
interrupted (Ctrl-C; the finished outputs are kept and the same command continues).

Each image goes through `cocofast.segment.segment_image`, the function behind `cocofast segment` (Gaussian-
blended windows, one band of the image in memory at a time), with the same defaults: window, downscale,
channels, classes and input normalisation as the checkpoint's training config records them.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from cocofast.checkpoint import TRUST_HELP, network_digest
from cocofast.data.imageio import IMAGE_SUFFIXES, OPENSLIDE_SUFFIXES, TIFF_SUFFIXES
from cocofast.io import FolderInUse, atomic_write_text, lock_folder, remove_stale_temporaries
from cocofast.overlay import DEFAULT_THICKNESS
from cocofast.segment import SegmentSettings, Segmented, device_of, network_and_settings, segment_image

SUFFIXES = tuple(dict.fromkeys(IMAGE_SUFFIXES + TIFF_SUFFIXES + OPENSLIDE_SUFFIXES))
FAILURES_FILE = "failures.txt"
MANIFEST_FILE = "manifest.jsonl"
MANIFEST_FORMAT = {"format": "cocofast-predict-manifest", "version": 1}
LOCK_NAME = ".predict.lock"


@dataclass(frozen=True)
class Settings:
    """How every image of a batch is segmented (`segment`) and which files it gets."""

    segment: SegmentSettings = field(default_factory=SegmentSettings)
    suffix: str = ".png"
    overlays: bool = True
    progress: bool = False  # the per-image bar; segment.progress is the per-window bar of large images
    probabilities: bool = False  # OUT/probabilities/NAME.tif (cocofast.data.slide_outputs)
    geojson: bool = False  # OUT/geojson/NAME.geojson


@dataclass(frozen=True)
class Job:
    image: Path
    mask: Path
    overlay: Path | None
    probabilities: Path | None = None
    geojson: Path | None = None

    def finished(self) -> bool:
        return self.mask.is_file() and all(p is None or p.is_file() for p in (self.overlay, self.probabilities,
                                                                                 self.geojson))


def predict_image(job: Job, model: torch.nn.Module, settings: Settings, device: torch.device) -> Segmented:
    """Segment one image into job.mask (and its outline overlay) exactly as `cocofast segment` does."""
    segment = settings.segment
    if segment.outputs is not None and (job.probabilities or job.geojson):
        segment = replace(segment, outputs=replace(segment.outputs, probabilities=job.probabilities,
                                                   geojson=job.geojson))
    return segment_image(job.image, model, segment, mask_path=job.mask, overlay_path=job.overlay, device=device)


# --- what to do ------------------------------------------------------------------------------------------
def list_images(source: Path) -> list[Path]:
    """The images a folder holds (sorted), or the paths a list file names (in its order)."""
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if source.suffix.lower() in SUFFIXES:
        return [source]
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{source}: not a list file (byte {err.start} is not UTF-8 text); INPUT is a folder, an "
                         f"image ({', '.join(SUFFIXES)}) or a UTF-8 text file with one path per line") from None
    if "\x00" in text:
        raise ValueError(f"{source}: not a list file (it holds NUL bytes, so it is binary); INPUT is a folder, an "
                         f"image ({', '.join(SUFFIXES)}) or a UTF-8 text file with one path per line")
    images = []
    for line in text.splitlines():
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
        jobs.append(Job(image, mask, overlay,
                        out / "probabilities" / f"{image.stem}.tif" if settings.probabilities else None,
                        out / "geojson" / f"{image.stem}.geojson" if settings.geojson else None))
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
    ap.add_argument("--trust-model-code", "--trust_model_code", action="append", metavar="FACTORY",
                    help=TRUST_HELP)
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
    ap.add_argument("--probabilities", action="store_true",
                    help="also write OUT/probabilities/NAME.tif: per-class probabilities, a pyramidal tiled TIFF")
    ap.add_argument("--probability-dtype", default="uint8", choices=["uint8", "float16"])
    ap.add_argument("--geojson", action="store_true",
                    help="also write OUT/geojson/NAME.geojson: the regions as QuPath GeoJSON, level-0 coordinates")
    ap.add_argument("--geojson-tolerance", type=float, help="simplification in level-0 pixels (default: one "
                                                            "network pixel; 0: exact)")
    ap.add_argument("--skip-glass", action="store_true", help="do not run the network on windows without tissue")
    ap.add_argument("--masks", help="a folder of true masks (NAME.png/.tif, class indices with 255 unscored, or "
                                    "0/255-style levels): score each prediction, write OUT/scores.csv (Dice and "
                                    "IoU per class, per image and over all images)")
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
              (not Path(args.out).exists() or Path(args.out).is_dir(), f"--out {args.out}: exists and is not a folder"),
              (args.masks is None or Path(args.masks).is_dir(), f"--masks {args.masks}: no such folder")]
    return next((message for ok, message in checks if not ok), None)


def main(argv=None) -> int:
    try:
        return run_command(argv)
    except KeyboardInterrupt:  # before any image: nothing to keep
        print("cocofast predict: interrupted", file=sys.stderr)
        return 130


def run_command(argv) -> int:
    args = _parse(argv)
    problem = _check_arguments(args)
    if problem:
        print(f"cocofast predict: error: {problem}", file=sys.stderr)
        return 2
    device = device_of(args.device)
    out = Path(args.out)
    try:
        model, segment = network_and_settings(args, device)
        settings = Settings(segment, suffix=f".{args.format}", overlays=not args.no_overlays,
                            progress=not args.quiet, probabilities=args.probabilities, geojson=args.geojson)
        source = Path(args.input)
        images = list_images(source)
        if not images:
            raise ValueError(f"{source}: holds no images (looked for {', '.join(SUFFIXES)})")
        jobs = plan_jobs(images, out, settings)
        lock = lock_folder(out, LOCK_NAME)
    except FolderInUse as err:
        print(f"cocofast predict: error: --out {out} is in use by another predict run ({err.holder}); wait for "
              f"it to finish, stop it, or choose another --out", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        print(f"cocofast predict: error: {err}", file=sys.stderr)
        return 2
    with lock:
        for folder in (out, out / "masks", out / "overlays"):
            remove_stale_temporaries(folder)  # a killed run's; nobody else writes here while we hold the lock
        manifest = Manifest(out, made_by(model, settings, args.role, device))
        try:
            manifest.load()
            todo, changed = manifest.plan(jobs, overwrite=args.overwrite)
        except (ValueError, OSError) as err:  # outputs of other settings, or OUT cannot be written
            print(f"cocofast predict: error: {err}", file=sys.stderr)
            return 2
        code = run_jobs(jobs, todo, changed, model, settings, device, out, manifest)
        return code if args.masks is None else max(code, write_scores(jobs, Path(args.masks), out, settings))


def write_scores(jobs: list[Job], truth: Path, out: Path, settings: Settings) -> int:
    """OUT/scores.csv: Dice and IoU per class of every prediction against truth/NAME.*; 1 when a true mask is
    missing or unreadable (named on stderr), else 0."""
    import csv
    import io

    from cocofast.metrics import score_mask_files
    from cocofast.segment import mask_levels

    pairs, missing = [], []
    for job in jobs:
        found = [p for p in sorted(truth.glob(f"{job.image.stem}.*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        if found and job.mask.is_file():
            pairs.append((job.image.name, job.mask, found[0]))
        else:
            missing.append(f"{job.image.name}: no true mask {job.image.stem}.* in {truth}" if not found
                           else f"{job.image.name}: no prediction to score")
    seg = settings.segment
    try:
        rows = score_mask_files(pairs, seg.num_classes, mask_levels(seg.num_classes, seg.mask_values))
    except (ValueError, OSError) as err:
        print(f"cocofast predict: error: scoring against {truth}: {err}", file=sys.stderr)
        return 1
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(text.getvalue(), out / "scores.csv")
    overall = rows[-1]
    print(f"cocofast predict: scored {len(pairs)} image(s) -> {out / 'scores.csv'}; over all images: "
          + ", ".join(f"Dice{k} {overall[f'dice{k}']:.4f}" for k in range(seg.num_classes)))
    for line in missing:
        print(f"  not scored: {line}", file=sys.stderr)
    return 1 if missing else 0


# --- what made each output ---------------------------------------------------------------------------------
def made_by(model: torch.nn.Module, settings: Settings, role: str, device: torch.device) -> dict:
    """Everything that changes a mask or overlay: the network's content and how it is run over an image."""
    seg = dataclasses.asdict(settings.segment)  # every setting, so one added later is recorded too
    seg.pop("progress"), seg.pop("batch_size")  # how it is shown and batched changes no output
    seg["amp"] = bool(seg["amp"] and device.type == "cuda")  # autocast runs on CUDA only
    made = {"network": network_digest(model.model_name, model.model_kwargs, model.state_dict()),
            "model_name": model.model_name, "role": role, **seg}
    return json.loads(json.dumps(made, default=str))  # as it reads back from the manifest (tuples: lists)


def input_stamp(image: Path) -> dict:
    try:
        st = image.stat()
    except OSError:
        return {"input": str(image.absolute()), "size": None, "mtime_ns": None}
    return {"input": str(image.absolute()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class Manifest:
    """OUT/manifest.jsonl: one line per settings (`made_by`, under a digest) and one per output (its settings'
    digest and its input's stamp), the last line for an output winning.

    An output's line is appended (and synced) before the output is written, so after a kill every complete
    output has its line; a torn last line is ignored (its output was never started). Each run rewrites the
    file compactly, atomically, before its first image.
    """

    def __init__(self, out: Path, made: dict):
        self.out, self.path, self.made = out, out / MANIFEST_FILE, made
        self.key = hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:16]
        self.settings: dict[str, dict] = {}
        self.outputs: dict[str, dict] = {}

    def name(self, path: Path) -> str:
        return path.relative_to(self.out).as_posix()

    def load(self) -> None:
        if not self.path.is_file():
            return
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
            header = json.loads(lines[0]) if lines else None
        except (UnicodeDecodeError, ValueError, OSError) as err:
            header = err
        if header != MANIFEST_FORMAT:
            raise ValueError(f"{self.path} is not a cocofast predict manifest (first line {str(header)[:60]!r}), "
                             f"so what made the outputs in {self.out} is unknown; choose another --out, or pass "
                             f"--overwrite to redo them")
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill: the output it announced was never written
            if isinstance(entry, dict) and isinstance(entry.get("made_by"), dict):
                self.settings[str(entry.get("settings"))] = entry["made_by"]
            elif isinstance(entry, dict) and isinstance(entry.get("mask"), str):
                self.outputs[entry["mask"]] = entry

    def plan(self, jobs: list[Job], overwrite: bool) -> tuple[list[Job], int]:
        """(the jobs to run, how many of them redo an output whose input changed); ValueError when outputs of
        other settings, or outputs nobody recorded, are in the way and --overwrite was not given."""
        todo, changed, foreign, unknown = [], 0, [], []
        for job in jobs:
            present = [p for p in (job.mask, job.overlay) if p is not None and p.exists()]
            record = self.outputs.get(self.name(job.mask))
            if overwrite or not present:
                todo.append(job)
            elif record is None or record.get("settings") not in self.settings:
                unknown.append(present[0])
            elif record["settings"] != self.key:
                foreign.append((present[0], self.settings[record["settings"]]))
            elif {k: record.get(k) for k in ("input", "size", "mtime_ns")} != input_stamp(job.image):
                todo.append(job)
                changed += 1
            elif not job.finished() or (job.overlay is not None and record.get("overlay") is None):
                todo.append(job)
            # else: made by these very settings from this very input: kept
        if foreign:
            then = foreign[0][1]
            diffs = [f"{k}: {short(then.get(k))} then, {short(v)} now" for k, v in self.made.items()
                     if then.get(k) != v]
            raise ValueError(f"{self.out} holds {len(foreign)} output(s) made by another network or settings "
                             f"({'; '.join(diffs)}), e.g. {foreign[0][0]}; choose another --out, or pass "
                             f"--overwrite to redo them with this one")
        if unknown:
            raise ValueError(f"{self.out} holds {len(unknown)} output(s) with no record in {self.path.name} of "
                             f"what made them (an older cocofast, another tool, or by hand), e.g. {unknown[0]}; "
                             f"choose another --out, or pass --overwrite to redo them")
        redo = {j.mask for j in todo}
        self.compact(keep={self.name(j.mask) for j in jobs if j.mask not in redo})
        return todo, changed

    def compact(self, keep: set[str]) -> None:
        """Rewrite the file with this run's settings and the records of outputs that still exist."""
        outputs = {name: r for name, r in self.outputs.items() if name in keep or (self.out / name).exists()}
        used = {r["settings"] for r in outputs.values() if r.get("settings") in self.settings}
        self.settings = {k: v for k, v in self.settings.items() if k in used}
        self.settings[self.key] = self.made
        lines = [MANIFEST_FORMAT, *({"settings": k, "made_by": v} for k, v in self.settings.items()),
                 *(r for r in outputs.values() if r.get("settings") in self.settings)]
        atomic_write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines), self.path)
        self.outputs = outputs

    def announce(self, job: Job) -> None:
        """Before `job` writes: drop its old outputs (another network's, or a changed input's) and append its
        record, synced, so a complete output is never left without one."""
        for path in (job.mask, job.overlay):
            if path is not None:
                path.unlink(missing_ok=True)
        record = {"mask": self.name(job.mask), "overlay": None if job.overlay is None else self.name(job.overlay),
                  "settings": self.key, **input_stamp(job.image)}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.outputs[record["mask"]] = record


def short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text[:13] + "…" if len(text) > 14 else text


def run_jobs(jobs: list[Job], todo: list[Job], changed: int, model, settings: Settings, device, out: Path,
             manifest: Manifest) -> int:
    from tqdm import tqdm

    done = 0
    skipped = len(jobs) - len(todo)
    failures: list[tuple[Path, str]] = []
    try:
        with tqdm(todo, desc="predict", unit="image", disable=not settings.progress) as bar:
            for job in bar:
                bar.set_postfix_str(job.image.name)
                try:
                    manifest.announce(job)
                    predict_image(job, model, settings, device)
                    done += 1
                except Exception as err:  # one bad file must not stop the batch; the message names it
                    failures.append((job.image, f"{type(err).__name__}: {err}"))
                    tqdm.write(f"cocofast predict: {job.image}: failed: {failures[-1][1]}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"cocofast predict: interrupted after {done} of {len(todo)} image(s); the finished outputs are "
              f"kept: run the same command again to continue", file=sys.stderr)
        return 130
    report = out / FAILURES_FILE
    if failures:
        atomic_write_text("".join(f"{path}\t{why}\n" for path, why in failures), report)
    elif report.exists():
        report.unlink()  # a rerun that redid the failed images leaves no stale list behind
    redone = f" ({changed} redone because their input changed)" if changed else ""
    print(f"cocofast predict: {done} segmented{redone}, {skipped} already done, {len(failures)} failed -> {out}")
    for path, why in failures:
        print(f"  failed: {path}: {why}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
