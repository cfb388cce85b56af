"""Whole slides with annotations as a torch Dataset: split by slide, read at a stated µm per pixel, from tissue.

    ds = SlideDataset("slides/", split="train", split_file="slides/split.csv", classes={"Tumor": 1},
                      mpp=1.0, patch_size=256, length=800, seed=0)
    ds.set_epoch(epoch)

Sources: a folder of slides (SVS, TIFF, NDPI, MRXS, ...), each with its annotation beside it by stem
(NAME.geojson, NAME.json, NAME.xml, or a label image NAME.labels.png / NAME.labels.tif), or a CSV list file with
a header naming the columns `slide`, `annotation` and optionally `split` and `mpp` (the level-0 µm per pixel,
for slides that do not record it); paths are relative to the list file. Whole slides go to train, val or test
by the list's `split` column or a split file (CSV `slide,split`, the slide by file name or stem): no slide's
pixels ever reach two splits.

Reading: each slide's level and block-mean factor come from its resolution metadata (`choose_level`): the
coarsest level no coarser than `mpp`, then the integer factor closest to it. A patch reads patch_size x factor
pixels of that level and nothing else, so memory is bounded by the patch whatever the slide's size.

Labels: a pixel takes the class of the last annotation containing its centre; unannotated tissue gets
`unannotated` (a class, or IGNORE = 255: not counted by the losses or the metrics); glass (below the tissue
threshold of `cocofast.data.tissue`, found on the thumbnail and applied to the patch) gets `glass`; pixels
beyond the slide's edge get IGNORE.

Sampling: training patches are centred on a random labelled tissue pixel of the thumbnail (with `balance`,
first a class uniformly among those present, then a pixel of it), drawn from (seed, epoch, index) only, so
every rank and worker, and a resumed run, sees the same patches; `length` patches make an epoch. Validation
and test patches are a fixed grid of non-overlapping windows over labelled tissue; where the grid's last
window is pulled back inside the slide, the pixels an earlier window already holds are IGNORE, so every pixel
is scored once.

Construction checks every slide and annotation and raises one `DatasetError` listing each problem with its
file: a slide that does not open or has no pixel size, a resolution finer than the scan, an annotation that
does not parse, a region outside the slide, a class name the mapping lacks, a slide without labelled tissue,
a slide listed twice or in no split.
"""
from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .annotations import GEOJSON_SUFFIXES, XML_SUFFIXES, Annotations, read_annotations
from .folder import DatasetError
from .imageio import IGNORE, OPENSLIDE_SUFFIXES, TIFF_SUFFIXES
from .normalise import Normalisation, standardise, to_unit_range
from .slides import DownscaledReader, choose_level, open_reader
from .tiling import axis_starts, first_cover_offsets
from .tissue import TissueMask, tissue_mask
from .transforms import Augmentation, EpochDraws, augment_pair

SLIDE_SUFFIXES = TIFF_SUFFIXES + OPENSLIDE_SUFFIXES
LABEL_IMAGE_SUFFIXES = (".labels.png", ".labels.tif", ".labels.tiff")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SlideEntry:
    image: Path
    annotation: Path | None
    split: str | None = None
    mpp: float | None = None  # level-0 µm per pixel when the file does not say


@dataclass
class Slide:
    """One usable slide: how it is read and where its labelled tissue is."""

    entry: SlideEntry
    level: int
    factor: int
    scale: float  # level-0 pixels per patch pixel
    height: int  # of the grid patches are read from (level pixels / factor)
    width: int
    channels: int
    tissue: TissueMask
    annotations: Annotations
    labelled: np.ndarray  # (h, w) uint8 thumbnail labels, IGNORE where nothing is sampled


# --- which slides ------------------------------------------------------------------------------------------
def annotation_of(image: Path) -> Path | None:
    stem = image.name[:-len(image.suffix)]
    for suffix in GEOJSON_SUFFIXES + XML_SUFFIXES + LABEL_IMAGE_SUFFIXES:
        candidate = image.with_name(stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def slides_in_folder(folder: Path) -> tuple[list[SlideEntry], list[tuple[str, str]]]:
    entries, problems = [], []
    for path in sorted(folder.iterdir()):
        name = path.name.lower()
        if not path.is_file() or name.startswith(".") or any(name.endswith(s) for s in LABEL_IMAGE_SUFFIXES):
            continue
        if path.suffix.lower() in SLIDE_SUFFIXES:
            annotation = annotation_of(path)
            if annotation is None:
                problems.append((str(path), "no annotation beside it (looked for "
                                            + ", ".join(path.stem + s for s in GEOJSON_SUFFIXES + XML_SUFFIXES
                                                        + LABEL_IMAGE_SUFFIXES) + ")"))
            entries.append(SlideEntry(path, annotation))
    if not entries and not problems:
        problems.append((str(folder), f"no slides found (looked for {', '.join(SLIDE_SUFFIXES)})"))
    return entries, problems


def slides_in_list(list_file: Path) -> tuple[list[SlideEntry], list[tuple[str, str]]]:
    try:
        rows = list(csv.DictReader(list_file.read_text().splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        return [], [(str(list_file), f"cannot read the list file ({type(err).__name__}: {err})")]
    if not rows or "slide" not in rows[0] or "annotation" not in rows[0]:
        return [], [(str(list_file), "expected a CSV header with columns slide,annotation[,split][,mpp]")]
    entries, problems = [], []
    for number, row in enumerate(rows, 2):
        where = f"{list_file}:{number}"
        image = list_file.parent / (row.get("slide") or "").strip()
        annotation = list_file.parent / (row.get("annotation") or "").strip()
        mpp = (row.get("mpp") or "").strip()
        try:
            mpp_value = float(mpp) if mpp else None
        except ValueError:
            problems.append((where, f"mpp {mpp!r} is not a number"))
            continue
        for path in (image, annotation):
            if not path.is_file():
                problems.append((str(path), f"listed at {where} but does not exist"))
        split = (row.get("split") or "").strip() or None
        entries.append(SlideEntry(image, annotation, split, mpp_value))
    return entries, problems


def read_split_file(path: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """slide name (file name or stem) -> split, from CSV lines `slide,split` (a header line is allowed)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        return {}, [(str(path), f"cannot read the split file ({type(err).__name__}: {err})")]
    splits, problems = {}, []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line or line.replace(" ", "").lower() == "slide,split":
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 2 or fields[1] not in SPLITS:
            problems.append((f"{path}:{number}", f"expected 'SLIDE,SPLIT' with SPLIT one of {', '.join(SPLITS)}, "
                                                 f"got {line!r}"))
        elif fields[0] in splits:
            problems.append((f"{path}:{number}", f"slide {fields[0]} is listed twice; a slide belongs to one split"))
        else:
            splits[fields[0]] = fields[1]
    return splits, problems


def assign_splits(entries: list[SlideEntry], split_file: Path | None):
    problems = []
    splits = {}
    if split_file is not None:
        splits, problems = read_split_file(split_file)
    seen: dict[Path, SlideEntry] = {}
    out = []
    for entry in entries:
        key = entry.image.resolve()
        if key in seen:
            problems.append((str(entry.image), "listed twice; a slide belongs to one split"))
            continue
        seen[key] = entry
        split = entry.split
        stem = entry.image.name[:-len(entry.image.suffix)]
        from_file = splits.get(entry.image.name, splits.get(stem))
        if split is not None and from_file is not None and split != from_file:
            problems.append((str(entry.image), f"the list says split {split!r}, {split_file} says {from_file!r}"))
            continue
        split = split or from_file
        if split not in SPLITS:
            where = f"in {split_file}" if split_file is not None else "(no split column or split file)"
            problems.append((str(entry.image), f"split {split!r} is not one of {', '.join(SPLITS)}" if split
                             else f"is assigned to no split {where}"))
            continue
        out.append(SlideEntry(entry.image, entry.annotation, split, entry.mpp))
    return out, problems


def list_slides(source: str | os.PathLike, split_file: str | os.PathLike | None = None):
    """(entries with their split, problems) of a folder or CSV list file of slides."""
    source = Path(source)
    if source.is_dir():
        entries, problems = slides_in_folder(source)
        if split_file is None and (source / "split.csv").is_file():
            split_file = source / "split.csv"
    elif source.is_file():
        entries, problems = slides_in_list(source)
    else:
        return [], [(str(source), "no such folder or list file")]
    assigned, more = assign_splits(entries, Path(split_file) if split_file else None)
    return assigned, problems + more


# --- the data set ------------------------------------------------------------------------------------------
class SlideDataset(EpochDraws, Dataset):
    """Patches (image float32 (C, P, P), mask int64 (P, P)) of the slides of one split.

    Args:
        source: a folder of slides with annotations beside them, or a CSV list file (module docstring);
            or entries: SlideEntry values (their split set).
        split: 'train', 'val' or 'test'.
        split_file: CSV `slide,split` (default: SOURCE/split.csv for a folder).
        classes: annotation class name -> class index ({"Tumor": 1}); label images hold indices already.
        num_classes: classes the network predicts.
        mpp: µm per pixel the patches are read at.
        patch_size: patch side in pixels at `mpp`.
        length: training patches per epoch (val and test: the grid decides).
        unannotated: class of tissue no annotation covers, or IGNORE (255).
        glass: class of non-tissue pixels no annotation covers.
        balance: training positions drawn class by class (each class equally often) instead of by area.
        tissue_method, tissue_threshold: see `cocofast.data.tissue` (threshold None: Otsu on the thumbnail).
        in_channels, normalise, augment, seed: as `FolderDataset`.
        reader: 'auto', 'tiff' or 'openslide' (see `cocofast.data.slides.open_reader`).
    """

    def __init__(self, source: str | os.PathLike | None = None, *, split: str = "train",
                 split_file: str | os.PathLike | None = None, entries: Sequence[SlideEntry] | None = None,
                 classes: dict[str, int] | None = None, num_classes: int = 2, mpp: float = 1.0,
                 patch_size: int = 256, length: int = 800, unannotated: int = 0, glass: int = 0,
                 balance: bool = False, tissue_method: str = "saturation", tissue_threshold: float | None = None,
                 in_channels: int = 3, normalise: Normalisation | str = "range",
                 augment: Augmentation | None = None, seed: int = 0, reader: str = "auto"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if (source is None) == (entries is None):
            raise ValueError("give exactly one of source (a folder or list file of slides) or entries")
        if not mpp > 0:
            raise ValueError(f"mpp must be a positive number of µm per pixel, got {mpp}")
        if patch_size < 1 or length < 1:
            raise ValueError(f"patch_size and length must be positive, got {patch_size} and {length}")
        for name, value in (("unannotated", unannotated), ("glass", glass)):
            if not (0 <= value < num_classes or value == IGNORE):
                raise ValueError(f"{name} must be a class 0..{num_classes - 1} or {IGNORE} (ignored), got {value}")
        self.normalise = Normalisation.parse(normalise)
        if self.normalise.mode == "percentile":
            raise ValueError("percentile normalisation is per image; slides are read by patch: use 'range' or "
                             "'meanstd'")
        self.split, self.classes, self.num_classes = split, dict(classes or {}), num_classes
        self.mpp, self.patch, self.length = float(mpp), int(patch_size), int(length)
        self.unannotated, self.glass, self.balance = unannotated, glass, balance
        self.in_channels, self.seed, self.reader = in_channels, seed, reader
        self.augment = augment if augment is not None else Augmentation()
        self.augment.check_channels(in_channels)
        self.init_epoch()

        where = str(source) if source is not None else "the given slides"
        if entries is None:
            entries, problems = list_slides(source, split_file)
        else:
            entries, problems = list(entries), []
            for entry in entries:
                if entry.split not in SPLITS:
                    problems.append((str(entry.image), f"split {entry.split!r} is not one of {', '.join(SPLITS)}"))
        if problems:
            raise DatasetError(where, problems)
        self.slides: list[Slide] = []
        for entry in (e for e in entries if e.split == split):
            slide, slide_problems = self._open(entry, tissue_method, tissue_threshold)
            problems.extend(slide_problems)
            if slide is not None:
                self.slides.append(slide)
        if not problems and not self.slides:
            problems.append((where, f"no slide is assigned to the {split} split"))
        if problems:
            raise DatasetError(where, problems)
        rgb = [s.entry.image.name for s in self.slides if s.channels >= 3]
        if in_channels == 1 and rgb:
            warnings.warn(f"{', '.join(rgb[:3])}{' ...' if len(rgb) > 3 else ''}: RGB slides are turned to gray "
                          f"(ITU-R 601 luma) for a 1-channel network (in_channels 1); set in_channels 3 to keep "
                          f"colour", stacklevel=2)
        self._index_positions()

    # --- construction ----------------------------------------------------------------------------------
    def _open(self, entry: SlideEntry, tissue_method: str, tissue_threshold: float | None):
        path = entry.image
        try:
            base = open_reader(path, self.reader)
        except (ValueError, OSError) as err:
            return None, [(str(path), f"slide does not open: {str(err).removeprefix(f'{path}: ')}")]
        try:
            shapes, channels, base_mpp = base.level_shapes, base.channels, base.mpp
        finally:
            base.close()
        base_mpp = entry.mpp or base_mpp
        if base_mpp is None:
            return None, [(str(path), "the slide does not record its pixel size (µm per pixel); give its level-0 "
                                      "mpp in the list file's mpp column")]
        level_mpps = [base_mpp * shapes[0][1] / w for _, w in shapes]
        try:
            level, factor, _ = choose_level(level_mpps, shapes, self.mpp, path)
        except ValueError as err:
            return None, [(str(path), str(err).removeprefix(f"{path}: "))]
        height0, width0 = shapes[0]
        annotations, problems = read_annotations(entry.annotation, self.classes, (width0, height0),
                                                 self.num_classes)
        if annotations is None:
            return None, problems
        try:
            tissue = tissue_mask(path, tissue_method, tissue_threshold, self.reader)
        except ValueError as err:
            return None, [(str(path), f"no tissue mask: {str(err).removeprefix(f'{path}: ')}")]
        labelled = annotations.rasterise(0, 0, tissue.scale, *tissue.mask.shape, fill=IGNORE)
        unlabelled = labelled == IGNORE
        labelled[~tissue.mask] = IGNORE  # sample tissue only
        if self.unannotated != IGNORE:
            labelled[tissue.mask & unlabelled] = self.unannotated
        if not (labelled != IGNORE).any():
            return None, [(str(entry.annotation), f"no labelled tissue: no annotation of a mapped class covers tissue "
                                                  f"of {path.name} (tissue threshold {tissue.threshold:.3g})")]
        level_h, level_w = shapes[level]
        scale = width0 / level_w * factor
        return Slide(entry, level, factor, scale, math.ceil(level_h / factor), math.ceil(level_w / factor),
                     channels, tissue, annotations, labelled), []

    def _index_positions(self) -> None:
        if self.split == "train":
            per_class: dict[int, list[np.ndarray]] = {}
            for i, slide in enumerate(self.slides):
                flat = slide.labelled.ravel()
                for k in np.unique(flat[flat != IGNORE]).tolist():
                    where = np.flatnonzero(flat == k).astype(np.int64)
                    per_class.setdefault(k, []).append(np.stack([np.full_like(where, i), where], 1))
            self.pools = {k: np.concatenate(v) for k, v in sorted(per_class.items())}
            self.pooled = np.concatenate(list(self.pools.values()))
            return
        # val / test: a grid of non-overlapping windows; the pulled-back last window ignores what others hold
        self.grid: list[tuple[int, int, int, int, int]] = []  # (slide, top, left, own_top, own_left)
        p = self.patch
        for i, slide in enumerate(self.slides):
            ys, xs = axis_starts(slide.height, p, p), axis_starts(slide.width, p, p)
            for top, own_top in zip(ys, first_cover_offsets(ys, p)):
                for left, own_left in zip(xs, first_cover_offsets(xs, p)):
                    if self._window_labelled(slide, top, left):
                        self.grid.append((i, top, left, own_top, own_left))

    def _window_labelled(self, slide: Slide, top: int, left: int) -> bool:
        s = slide.scale / slide.tissue.scale  # thumbnail pixels per patch pixel
        r0, c0 = int(top * s), int(left * s)
        r1, c1 = max(r0 + 1, math.ceil((top + self.patch) * s)), max(c0 + 1, math.ceil((left + self.patch) * s))
        return bool((slide.labelled[r0:r1, c0:c1] != IGNORE).any())

    # --- epochs and samples ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.length if self.split == "train" else len(self.grid)

    def position(self, index: int, rng: np.random.Generator) -> tuple[int, int, int]:
        """(slide, top, left) of training patch `index`: centred on a labelled tissue pixel of the thumbnail."""
        if self.balance:
            pool = list(self.pools.values())[int(rng.integers(len(self.pools)))]
        else:
            pool = self.pooled
        slide_index, flat = pool[int(rng.integers(len(pool)))]
        slide = self.slides[int(slide_index)]
        ty, tx = divmod(int(flat), slide.labelled.shape[1])
        jitter = rng.random(2)
        cy = (ty + jitter[0]) * slide.tissue.scale / slide.scale
        cx = (tx + jitter[1]) * slide.tissue.scale / slide.scale
        top = min(max(int(cy - self.patch / 2), 0), max(slide.height - self.patch, 0))
        left = min(max(int(cx - self.patch / 2), 0), max(slide.width - self.patch, 0))
        return int(slide_index), top, left

    def window(self, index: int) -> tuple[int, int, int]:
        """(slide, top, left) of sample `index` in patch pixels of its slide's read grid."""
        if index < 0:
            index += len(self)
        if self.split == "train":
            return self.position(index, np.random.default_rng((self.seed, self.epoch, index)))
        return self.grid[index][:3]

    def __getitem__(self, index: int):
        if index < 0:
            index += len(self)
        rng = np.random.default_rng((self.seed, self.epoch, index))
        if self.split == "train":
            slide_index, top, left = self.position(index, rng)
            own_top = own_left = 0
        else:
            slide_index, top, left, own_top, own_left = self.grid[index]
        slide = self.slides[slide_index]
        pixels, stored = self.read_pixels(slide, top, left)
        mask = self.labels(slide, top, left, pixels, stored)
        mask[:own_top] = IGNORE
        mask[:, :own_left] = IGNORE
        image = torch.from_numpy(to_unit_range(pixels, self.in_channels, self.normalise, stored))
        mask = torch.from_numpy(mask.astype(np.int64))
        if self.split == "train" and self.augment.active:
            image, mask = augment_pair(image, mask, rng, self.augment)
        return standardise(image, self.normalise), mask

    def read_pixels(self, slide: Slide, top: int, left: int):
        """(P, P, C) stored-unit pixels of a patch (edge-padded beyond the slide) and the stored dtype."""
        reader = open_reader(slide.entry.image, self.reader, slide.level)
        try:
            source = DownscaledReader(reader, slide.factor) if slide.factor > 1 else reader
            pixels = source.read(top, left, self.patch, self.patch)
            stored = reader.dtype
        finally:
            reader.close()
        h, w = pixels.shape[:2]
        if (h, w) != (self.patch, self.patch):
            pixels = np.pad(pixels, ((0, self.patch - h), (0, self.patch - w), (0, 0)), mode="edge")
        return pixels, stored

    def labels(self, slide: Slide, top: int, left: int, pixels: np.ndarray, stored) -> np.ndarray:
        """(P, P) uint8 labels: annotation classes, then unannotated tissue, glass, IGNORE beyond the slide."""
        p = self.patch
        mask = slide.annotations.rasterise(left * slide.scale, top * slide.scale, slide.scale, p, p, fill=IGNORE)
        free = mask == IGNORE
        if free.any():
            tissue = slide.tissue.of_pixels(pixels, stored)
            mask[free & tissue] = self.unannotated
            mask[free & ~tissue] = self.glass
        mask[max(slide.height - top, 0):] = IGNORE
        mask[:, max(slide.width - left, 0):] = IGNORE
        return mask

    def slide_windows(self) -> list[tuple[Path, float, int, int]]:
        """(slide, level-0 x, level-0 y, side in level-0 pixels) of every val/test window (for leakage checks)."""
        return [(self.slides[i].entry.image, left * self.slides[i].scale, top * self.slides[i].scale,
                 self.patch * self.slides[i].scale) for i, top, left, *_ in getattr(self, "grid", [])]
