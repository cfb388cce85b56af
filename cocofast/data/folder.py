"""Real data: folders of images and masks paired by file stem, validated up front.

    data/images/case01.png   data/masks/case01.png      (PNG, JPEG or TIFF)

    ds = FolderDataset("data", mask_values={0: 0, 255: 1}, patch_size=1024)   # 2048² -> four 1024² patches

Every problem (unreadable or truncated file, missing mask, image/mask size mismatch, mask values outside
the mapping, empty folder) is collected at construction and raised as one ValueError that names each
file, instead of failing mid-epoch. Sizes come from header reads; mask values need a decode of each mask.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import joint_flip

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}


def tile_origins(length: int, patch: int, stride: int) -> list[int]:
    """Window starts covering [0, length): every `stride`, plus one flush with the end if needed."""
    if patch > length:
        raise ValueError(f"patch size {patch} is larger than the image side {length}")
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] + patch < length:
        starts.append(length - patch)
    return starts


def _open_checked(path: Path, problems: list[str]):
    try:
        with Image.open(path) as im:
            im.verify()  # reads the whole file without decoding pixels: catches truncation
        return Image.open(path)
    except Exception as err:  # PIL raises many types for corrupt files
        problems.append(f"{path}: unreadable or truncated ({type(err).__name__}: {err})")
        return None


class FolderDataset(Dataset):
    def __init__(self, root: str | Path | None = None, *, pairs: Sequence[tuple] | None = None,
                 list_file: str | Path | None = None, mask_values: dict[int, int] | None = None,
                 num_classes: int = 2, in_channels: int = 3, patch_size: int | None = None,
                 stride: int | None = None, resize: int | None = None, flips: bool = False, seed: int = 0):
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels}")
        self.mask_values = mask_values or {k: k for k in range(num_classes)}
        bad_classes = [v for v in self.mask_values.values() if not 0 <= v < num_classes]
        if bad_classes:
            raise ValueError(f"mask_values maps to classes {bad_classes} outside [0, {num_classes})")
        self.in_channels, self.resize, self.flips, self.seed, self.epoch = in_channels, resize, flips, seed, 0
        self.pairs = self._find_pairs(root, pairs, list_file)
        problems: list[str] = []
        sizes = []
        for img_path, mask_path in self.pairs:
            sizes.append(self._check_pair(img_path, mask_path, problems))
        if problems:
            raise ValueError(f"{len(problems)} problem(s) in the data set:\n  " + "\n  ".join(problems))
        self.index: list[tuple[int, int, int, int, int]] = []  # (pair, y, x, h, w)
        for i, (w, h) in enumerate(sizes):
            if patch_size is None:
                self.index.append((i, 0, 0, h, w))
                continue
            step = stride or patch_size
            for y in tile_origins(h, patch_size, step):
                for x in tile_origins(w, patch_size, step):
                    self.index.append((i, y, x, patch_size, patch_size))

    @staticmethod
    def _find_pairs(root, pairs, list_file) -> list[tuple[Path, Path]]:
        if pairs is not None:
            found = [(Path(a), Path(b)) for a, b in pairs]
        elif list_file is not None:
            base = Path(list_file).parent
            found = []
            for n, line in enumerate(Path(list_file).read_text().splitlines(), 1):
                if not line.strip() or line.startswith("#"):
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(f"{list_file}:{n}: expected 'IMAGE MASK', got {line!r}")
                found.append((base / parts[0], base / parts[1]))
        elif root is not None:
            root = Path(root)
            img_dir, mask_dir = root / "images", root / "masks"
            if not img_dir.is_dir():
                raise ValueError(f"{img_dir}: no such folder (expected {root}/images and {root}/masks)")
            masks = {p.stem: p for p in mask_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES} \
                if mask_dir.is_dir() else {}
            images = sorted(p for p in img_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            missing = [str(p) for p in images if p.stem not in masks]
            if missing:
                raise ValueError(f"{len(missing)} image(s) without a mask of the same stem in {mask_dir}:\n  "
                                 + "\n  ".join(missing))
            found = [(p, masks[p.stem]) for p in images]
        else:
            raise ValueError("FolderDataset needs a root folder, `pairs` or `list_file`")
        if not found:
            raise ValueError(f"no images found ({root or list_file or 'pairs'}); suffixes: {sorted(IMAGE_SUFFIXES)}")
        return found

    def _check_pair(self, img_path: Path, mask_path: Path, problems: list[str]):
        for p in (img_path, mask_path):
            if not p.exists():
                problems.append(f"{p}: missing")
                return (0, 0)
        img, mask = _open_checked(img_path, problems), _open_checked(mask_path, problems)
        if img is None or mask is None:
            return (0, 0)
        if img.size != mask.size:
            problems.append(f"{img_path}: size {img.size[0]}×{img.size[1]} but its mask {mask_path} is "
                            f"{mask.size[0]}×{mask.size[1]}")
            return img.size
        try:
            values = np.unique(np.asarray(mask))
        except Exception as err:
            problems.append(f"{mask_path}: cannot decode ({err})")
            return img.size
        unknown = sorted(set(values.tolist()) - set(self.mask_values))
        if unknown:
            problems.append(f"{mask_path}: mask values {unknown[:8]} are not in mask_values {sorted(self.mask_values)}")
        return img.size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        pair, y, x, h, w = self.index[i]
        img_path, mask_path = self.pairs[pair]
        box = (x, y, x + w, y + h)
        with Image.open(img_path) as im:
            im = im.convert("L" if self.in_channels == 1 else "RGB").crop(box)
            if self.resize:
                im = im.resize((self.resize, self.resize), Image.BILINEAR)
            image = np.asarray(im, dtype=np.float32) / 255.0
        with Image.open(mask_path) as mk:
            mk = mk.crop(box)
            if self.resize:
                mk = mk.resize((self.resize, self.resize), Image.NEAREST)
            raw = np.asarray(mk)
        lut = np.zeros(max(self.mask_values) + 1, dtype=np.int64)
        for value, cls in self.mask_values.items():
            lut[value] = cls
        mask = lut[raw]
        image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
        if self.flips:
            image, mask = joint_flip(image, mask, np.random.default_rng([self.seed, self.epoch, i, 1]))
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(mask))
