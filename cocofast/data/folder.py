"""Image/mask folders on disk as a torch Dataset, checked completely before the first epoch.

Layout: ROOT/images/NAME.{png,jpg,jpeg,tif,tiff} and ROOT/masks/NAME.{...}, paired by file stem;
or a list file whose lines are `IMAGE MASK` (whitespace- or comma-separated, paths relative to the
list file, `#` starts a comment). Masks hold class indices, or any values declared in `mask_values`
(e.g. {0: 0, 255: 1} for 0/255 binary masks).

Images become network input by the rule of `normalise` (the one `cocofast.segment` applies): stored values to
[0, 1], then crop, resize, augmentation, and last the optional mean/std standardisation. The check before the
first epoch decodes every pixel band by band (a corrupt tile or IDAT names its file there, not mid-training),
checks the values against the declared range and, for per-image percentiles, records each image's bounds.
"""
from __future__ import annotations

import errno
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .imageio import IGNORE, IMAGE_SUFFIXES, is_tiff, load_mask, read_header
from .normalise import Normalisation, image_stats, nan_pixels, standardise, to_unit_range, values_outside
from .slides import MAX_PIXELS, ArrayReader, TiffReader, open_reader
from .tiling import axis_starts, first_cover_offsets, patch_grid, resolve_stride
from .transforms import Augmentation, EpochDraws, augment_pair, resize_pair

# Pixels per band when the check scans an image or mask: bounds its temporaries (bincount's int64 copy).
CHECK_BAND_PIXELS = 1 << 20
# Marks a stored mask value the mapping does not name (no class or ignore_index can be this).
UNMAPPED = np.iinfo(np.int64).min


class DatasetError(ValueError):
    """Every problem found in a dataset at once; `problems` holds (path, reason) pairs."""

    def __init__(self, where: str, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = "\n".join(f"  {path}: {reason}" for path, reason in problems)
        super().__init__(f"{len(problems)} problem(s) in {where}:\n{lines}")


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Path
    height: int
    width: int
    stats: np.ndarray | None = None  # (2, C) per-image percentile bounds, percentile normalisation only


class FolderDataset(EpochDraws, Dataset):
    """Pairs of (image float32 (C, H, W) in [0, 1], mask int64 (H, W)) read from disk.

    Args:
        root: folder holding `images/` and `masks/` (names changeable with images_dir / masks_dir).
        list_file: instead of root, a text file of `IMAGE MASK` lines.
        pairs: instead of root, a sequence of (image path, mask path).
        num_classes: classes in the masks; mapped mask values must lie in [0, num_classes).
        mask_values: stored value -> class, e.g. {0: 0, 255: 1}. Default: values are class indices.
        ignore_index: a class value that means "not labelled"; mask_values may map to it.
        in_channels: 3 reads RGB, 1 reads grayscale (ITU-R 601 luma, as the CoCo authors' code).
        patch_size, stride, overlap: cut each image into patches (2048x2048 with patch_size=1024 gives
            four); stride defaults to patch_size; give stride or overlap (= patch_size - stride).
        resize: resize every patch to this size (int or (H, W)); the CoCo paper trains at 512.
        normalise: a `Normalisation` or its text ('range', 'range:0:4095', 'percentile:1:99',
            'meanstd:M,M,M:S,S,S'); see `cocofast.data.normalise`.
        flips: random horizontal and vertical flips applied to image and mask together (shorthand for
            augment=Augmentation(flips=True)).
        augment: an `Augmentation` (flips, HED stain jitter, brightness/contrast); default none.
        seed: augmentation is drawn from (seed, epoch, index), so every rank and worker sees the same
            augmentation for a sample whatever the process layout; call set_epoch each epoch.
        mask_suffix: mask stem = image stem + mask_suffix (e.g. "_mask").
        check_mask_values: decode every mask on construction to check its values (in bands, threaded).
            Off, an unmapped value still fails - when its sample is loaded, naming the file.
        check_pixels: decode every image on construction (corrupt data, values outside the declared range).
        max_pixels: most pixels one sample may decode at once (PNG/JPEG decode whole images; TIFFs are read
            by region, so only the patch counts).
        threads: check this many pairs at once (default: the CPU count, at most 8).
    """

    def __init__(self, root: str | os.PathLike | None = None, *, list_file: str | os.PathLike | None = None,
                 pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]] | None = None,
                 images_dir: str = "images", masks_dir: str = "masks", num_classes: int = 2,
                 mask_values: dict[int, int] | None = None, ignore_index: int | None = None,
                 in_channels: int = 3, patch_size: int | tuple[int, int] | None = None,
                 stride: int | None = None, overlap: int | None = None,
                 resize: int | tuple[int, int] | None = None, flips: bool = False, seed: int = 0,
                 mask_suffix: str = "", check_mask_values: bool = True, threads: int | None = None,
                 normalise: Normalisation | str = "range", augment: Augmentation | None = None,
                 check_pixels: bool = True, max_pixels: int = MAX_PIXELS, score_once: bool = False):
        if sum(x is not None for x in (root, list_file, pairs)) != 1:
            raise ValueError("give exactly one of root (a folder with images/ and masks/), list_file or pairs")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.in_channels = in_channels
        self.resize = resize
        self.normalise = Normalisation.parse(normalise)
        self.augment = augment if augment is not None else Augmentation(flips=flips)
        self.augment.check_channels(in_channels)
        self.seed = seed
        self.max_pixels = max_pixels
        # Evaluation sets: patches at stride patch_size, and where the last one is pulled back inside the image,
        # the pixels the previous patch holds are IGNORE (255) in its mask, so metrics count every pixel once.
        self.score_once = score_once
        if score_once and (stride is not None or overlap is not None):
            raise ValueError("score_once tiles at stride patch_size; give no stride or overlap")
        self.mapping = _mapping(mask_values, num_classes, ignore_index)
        self.lut = _value_lut(self.mapping)
        self.mask_values = mask_values
        self.init_epoch()

        if pairs is not None:
            where = "the given pairs"
            pairs, problems = _pairs_from_sequence(pairs)
        elif list_file is not None:
            where = str(list_file)
            pairs, problems = _pairs_from_list(Path(list_file))
        else:
            where = str(root)
            pairs, problems = _pairs_from_folders(Path(root), images_dir, masks_dir, mask_suffix)
        if not pairs and not problems:
            problems.append((where, f"no images found (looked for {', '.join(IMAGE_SUFFIXES)})"))
        if problems:  # structural problems first: checking pixels of a broken layout is noise
            raise DatasetError(where, problems)

        if patch_size is not None:
            self.patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
            self.stride = tuple(resolve_stride(p, stride, overlap) for p in self.patch)
        elif stride is not None or overlap is not None:
            raise ValueError("stride and overlap need a patch_size")
        else:
            self.patch = self.stride = None

        threads = threads if threads is not None else min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            checked = list(pool.map(lambda p: self._check_pair(*p, check_mask_values, check_pixels), pairs))
        self.pairs: list[Pair] = []
        for pair, pair_problems in checked:
            problems.extend(pair_problems)
            if pair is not None:
                self.pairs.append(pair)
        if problems:
            raise DatasetError(where, problems)

        self.index: list[tuple[int, int, int, int, int]] = []  # (pair, top, left, height, width)
        for i, pair in enumerate(self.pairs):
            if self.patch is None:
                self.index.append((i, 0, 0, pair.height, pair.width))
            else:
                for top, left in patch_grid(pair.height, pair.width, self.patch, self.stride):
                    self.index.append((i, top, left, *self.patch))
        self.first_cover: dict[int, tuple[int, int]] = {}  # index -> rows, columns an earlier patch holds
        if score_once and self.patch is not None:
            for n, (i, top, left, height, width) in enumerate(self.index):
                ys = axis_starts(self.pairs[i].height, height, height)
                xs = axis_starts(self.pairs[i].width, width, width)
                own = (first_cover_offsets(ys, height)[ys.index(top)], first_cover_offsets(xs, width)[xs.index(left)])
                if any(own):
                    self.first_cover[n] = own

    def _check_pair(self, image: Path, mask: Path, check_values: bool, check_pixels: bool):
        problems = []
        try:
            head = read_header(image)
        except ValueError as err:
            problems.append((str(image), str(err)))
            head = None
        try:
            mask_head = read_header(mask)
        except ValueError as err:
            problems.append((str(mask), str(err)))
            mask_head = None
        if head is None or mask_head is None:
            return None, problems
        if (head.height, head.width) != (mask_head.height, mask_head.width):
            problems.append((str(mask), f"mask is {mask_head.width}x{mask_head.height} but its image "
                                        f"{image.name} is {head.width}x{head.height} (width x height)"))
        if self.patch is not None and (head.height < self.patch[0] or head.width < self.patch[1]):
            problems.append((str(image), f"image is {head.width}x{head.height}, smaller than the "
                                         f"{self.patch[1]}x{self.patch[0]} patch size"))
        sample = self.patch or (head.height, head.width)
        decoded_whole = (head.height, head.width) if not is_tiff(image) else sample
        if decoded_whole[0] * decoded_whole[1] > self.max_pixels:
            problems.append((str(image), f"loading a sample decodes {decoded_whole[1]}x{decoded_whole[0]} pixels, "
                                         f"more than max_pixels={self.max_pixels:,}; cut it into patches "
                                         "(patch_size) stored as a tiled TIFF, or raise max_pixels"))
        stats = None
        if not problems and (check_pixels or self.normalise.mode == "percentile"):
            try:
                stats = self._scan_image(image, check_pixels)
            except ValueError as err:
                problems.append((str(image), str(err).removeprefix(f"{image}: ")))
        if not problems and check_pixels:
            note = narrow_range(image, self.normalise, self.max_pixels)
            if note:
                warnings.warn(note, stacklevel=2)
        if check_values and not problems:
            try:
                bad = self._scan_mask(mask)
            except ValueError as err:
                problems.append((str(mask), f"cannot decode mask ({str(err).removeprefix(f'{mask}: ')})"))
            else:
                if bad:
                    shown = ", ".join(str(v) for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
                    problems.append((str(mask), f"mask values {shown} are not in the mapping "
                                                f"{self._mapping_text()}"))
        if problems:
            return None, problems
        return Pair(image, mask, head.height, head.width, stats), []

    def _scan_image(self, path: Path, every_pixel: bool = True) -> np.ndarray | None:
        """Decode every band of an image; raise on NaN and on values outside the declared range; percentile
        bounds (every_pixel=False: those alone, from their grid of pixels)."""
        reader = open_reader(path, max_pixels=self.max_pixels)
        try:
            if not every_pixel:
                stats = image_stats(reader, self.normalise, self.in_channels)
                if np.isnan(stats).any():
                    raise ValueError("image holds NaN (its percentiles are NaN); NaN is no pixel value: replace "
                                     "it (e.g. by 0) or leave the image out")
                return stats
            rows = max(1, CHECK_BAND_PIXELS // reader.width)
            low, high, nans = np.inf, -np.inf, 0
            for top in range(0, reader.height, rows):
                band = reader.read(top, 0, rows, reader.width)
                nans += nan_pixels(band)
                outside = None if nans else values_outside(band, self.normalise)
                if outside is not None:
                    low, high = min(low, outside[0]), max(high, outside[1])
            if nans:  # every mode: percentiles of NaN are NaN, and a NaN input pixel is a NaN loss
                raise ValueError(f"image holds NaN in {nans} of its {reader.height * reader.width} pixels; NaN is "
                                 "no pixel value (not one outside the range): replace it (e.g. by 0) or leave the "
                                 "image out")
            if self.normalise.mode == "percentile":
                return image_stats(reader, self.normalise, self.in_channels)
            if low <= high:
                declared = self.normalise.stored_range(reader.dtype)
                raise ValueError(f"{reader.dtype} values span {low:g}..{high:g}, outside the declared range "
                                 f"{declared[0]:g}..{declared[1]:g}; declare the stored range (normalise="
                                 f"'range:LOW:HIGH', e.g. 'range:0:255' for 0-255 floats) or use 'percentile'")
            return None
        finally:
            reader.close()

    def _scan_mask(self, path: Path) -> list[int]:
        """Stored mask values the mapping does not name, found band by band (bounded temporaries)."""
        reader = mask_reader(path)
        try:
            rows = max(1, CHECK_BAND_PIXELS // reader.width)
            present: set[int] = set()
            for top in range(0, reader.height, rows):
                band = single_channel(reader.read(top, 0, rows, reader.width), path)
                if band.dtype in (np.uint8, np.uint16):
                    present.update(np.flatnonzero(np.bincount(band.ravel())).tolist())
                else:
                    present.update(np.unique(band).tolist())
        finally:
            reader.close()
        return sorted(int(v) for v in present if int(v) not in self.mapping)

    def _mapping_text(self) -> str:
        if self.mask_values is None:
            return f"(class indices 0..{self.num_classes - 1})"
        return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(self.mask_values.items())) + "}"

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int):
        if index < 0:
            index += len(self)
        pair_index, top, left, height, width = self.index[index]
        pair = self.pairs[pair_index]
        reader = open_reader(pair.image, max_pixels=self.max_pixels)
        try:
            pixels = reader.read(top, left, height, width)
        finally:
            reader.close()
        image = to_unit_range(pixels, self.in_channels, self.normalise, stats=pair.stats)
        reader = mask_reader(pair.mask)
        try:
            raw = single_channel(reader.read(top, left, height, width), pair.mask)
        finally:
            reader.close()
        mask = self._map(raw, pair.mask)
        rows, cols = self.first_cover.get(index, (0, 0))
        mask[:rows] = IGNORE
        mask[:, :cols] = IGNORE
        image, mask = torch.from_numpy(image), torch.from_numpy(mask)
        if self.resize is not None:
            image, mask = resize_pair(image, mask, self.resize)
        if self.augment.active:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            image, mask = augment_pair(image, mask, rng, self.augment)
        return standardise(image, self.normalise), mask

    def _map(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Stored values -> int64 classes; a value the mapping does not name is an error naming the file."""
        if raw.dtype in (np.uint8, np.uint16):
            mask = self.lut[raw]
        else:
            mask = np.full(raw.shape, UNMAPPED, np.int64)
            for value, cls in self.mapping.items():
                mask[raw == value] = cls
        unmapped = mask == UNMAPPED
        if unmapped.any():
            shown = ", ".join(str(v) for v in np.unique(raw[unmapped])[:8].tolist())
            raise ValueError(f"{path}: mask values {shown} are not in the mapping {self._mapping_text()}")
        return mask


# An integer image wider than 8 bits whose largest value is below this share of its dtype's range, read under
# 'range' (x / dtype max), reaches the network as a nearly black input: worth a warning.
NARROW_RANGE = 0.1


def narrow_range(path: Path, norm: Normalisation, max_pixels: int = MAX_PIXELS) -> str | None:
    """The warning for an image of 16 or more bits that uses a small part of the range `norm` maps to [0, 1]."""
    if norm.mode not in ("range", "meanstd") or norm.low is not None:
        return None
    reader = open_reader(path, max_pixels=max_pixels)
    try:
        if reader.dtype.kind != "u" or reader.dtype.itemsize < 2:
            return None
        rows = max(1, CHECK_BAND_PIXELS // reader.width)
        low, high = np.iinfo(reader.dtype).max, 0
        for top in range(0, reader.height, rows):
            band = reader.read(top, 0, rows, reader.width)
            low, high = min(low, int(band.min())), max(high, int(band.max()))
        full = int(np.iinfo(reader.dtype).max)
    finally:
        reader.close()
    if high >= NARROW_RANGE * full:
        return None
    return (f"{path}: {reader.dtype} values span {low}..{high}, {high / full:.1%} of the 0..{full} that normalise "
            f"'{norm.text()}' maps to [0, 1], so the network sees inputs of at most {high / full:.3g}; declare the "
            f"stored range (normalise 'range:0:{high}', or 'range:0:4095' for 12-bit data) or use 'percentile:1:99'")


def mask_reader(path: Path):
    """Masks by region from tiled/striped TIFFs; other formats decode whole (palette indices, not colours)."""
    if is_tiff(path):
        return TiffReader(path)
    try:
        return ArrayReader(load_mask(path))
    except Exception as err:  # Pillow raises several types for corrupt data
        raise ValueError(f"{path}: {type(err).__name__}: {err}") from None


def single_channel(region: np.ndarray, path: Path) -> np.ndarray:
    """(h, w, C) mask region -> (h, w) integers; colour masks only when every channel is equal."""
    first = region[:, :, 0]
    if not all(np.array_equal(first, region[:, :, c]) for c in range(1, region.shape[2])):
        raise ValueError(f"{path}: mask has {region.shape[2]} differing colour channels; expected one channel "
                         "of class values (grayscale or palette)")
    if not np.issubdtype(first.dtype, np.integer):
        if first.dtype == bool:
            return first.astype(np.uint8)
        if np.all(np.mod(first, 1) == 0):
            return first.astype(np.int64)
        raise ValueError(f"{path}: mask holds non-integer values (dtype {first.dtype})")
    return first


def _mapping(mask_values, num_classes, ignore_index) -> dict[int, int]:
    """Stored value -> class; by default values are classes (and ignore_index means itself)."""
    if mask_values is None:
        mapping = {i: i for i in range(num_classes)}
        if ignore_index is not None:
            mapping[ignore_index] = ignore_index
        return mapping
    for value, cls in mask_values.items():
        if not (0 <= cls < num_classes or cls == ignore_index):
            raise ValueError(f"mask_values maps {value} to {cls}, outside classes 0..{num_classes - 1}"
                             + (f" and ignore_index {ignore_index}" if ignore_index is not None else ""))
    return dict(mask_values)


def _value_lut(mapping: dict[int, int]) -> np.ndarray:
    """Lookup table over all uint16 values: stored value -> class, UNMAPPED for values not declared."""
    lut = np.full(1 << 16, UNMAPPED, dtype=np.int64)
    for value, cls in mapping.items():
        if 0 <= value < (1 << 16):
            lut[value] = cls
    return lut


def _image_files(folder: Path, problems: list) -> list[Path]:
    """The image files of `folder`; an image name that is no readable file (a dangling symlink, a symlink
    loop, a folder) goes to `problems`, naming the path: an image dropped without a word is a silent hole."""
    files = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.is_file():
            files.append(p)
        elif p.is_symlink():
            try:
                p.resolve(strict=True)
            except RuntimeError:  # Python < 3.13 reports a loop so
                problems.append((str(p), "symlink loop: it never reaches a file"))
            except OSError as err:
                reason = "symlink loop: it never reaches a file" if err.errno == errno.ELOOP else \
                    f"dangling symlink to {os.readlink(p)} (no such file)"
                problems.append((str(p), reason))
            else:
                problems.append((str(p), f"symlink to {os.readlink(p)}, which is not a file"))
        else:
            problems.append((str(p), "named like an image but is not a file"))
    return files


def _pairs_from_folders(root: Path, images_dir: str, masks_dir: str, mask_suffix: str):
    problems: list[tuple[str, str]] = []
    image_dir, mask_dir = root / images_dir, root / masks_dir
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            problems.append((str(folder), "folder does not exist"))
    if problems:
        return [], problems
    images = _by_stem(_image_files(image_dir, problems), problems)
    masks = _by_stem(_image_files(mask_dir, problems), problems)
    pairs = []
    for stem, image in sorted(images.items()):
        mask = masks.get(stem + mask_suffix)
        if mask is None:
            problems.append((str(image), f"no mask named {stem + mask_suffix}.* in {mask_dir}"))
        else:
            pairs.append((image, mask))
    return pairs, problems


def _by_stem(files: list[Path], problems: list) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in files:
        if path.stem in found:
            problems.append((str(path), f"same name as {found[path.stem].name}; which one to use is ambiguous"))
        else:
            found[path.stem] = path
    return found


def _pairs_from_sequence(pairs):
    found, problems = [], []
    for image, mask in pairs:
        image, mask = Path(image), Path(mask)
        missing = [p for p in (image, mask) if not p.is_file()]
        problems += [(str(p), "does not exist") for p in missing]
        if not missing:
            found.append((image, mask))
    return found, problems


def _pairs_from_list(list_file: Path):
    try:
        lines = list_file.read_text().splitlines()
    except OSError as err:
        return [], [(str(list_file), f"cannot read list file: {err.strerror}")]
    except UnicodeDecodeError as err:
        return [], [(str(list_file), f"not a text list file of 'IMAGE MASK' lines (byte {err.start} is not "
                                     f"{err.encoding}); a binary file?")]
    pairs, problems = [], []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.replace(",", " ").split()
        if len(fields) != 2:
            problems.append((f"{list_file}:{number}", f"expected 'IMAGE MASK', got {line!r}"))
            continue
        image, mask = (list_file.parent / f for f in fields)
        missing = [str(p) for p in (image, mask) if not p.is_file()]
        for path in missing:
            problems.append((path, f"listed at {list_file}:{number} but does not exist"))
        if not missing:
            pairs.append((image, mask))
    return pairs, problems
