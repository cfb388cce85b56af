"""The built-in data set: synthetic H&E-like pathology patches with cancerous regions.

This is SYNTHETIC tissue, drawn procedurally; it stands in for real slides in `make demo` and the tests,
because no real data can be downloaded at run time. Every patch is a pure function of (seed, index).

What is drawn, in optical-density space (Beer-Lambert: rgb = exp(−Σ stain·amount)):
- eosin-stained stroma with a fibrous low-frequency texture;
- normal tissue: round glands (pale lumens) rimmed by small, regular, evenly spaced nuclei, and sparse
  stromal nuclei;
- cancer (mask = 1): irregular blob-shaped regions where glands are small, distorted or missing and nuclei
  are crowded, larger, darker and irregular in size (the cues pathologists use: nuclear pleomorphism and
  loss of gland architecture). The contrast is deliberately subtle, so that capacity matters.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from torch.utils.data import Dataset

# Optical densities of the stains per RGB channel (hematoxylin: purple-blue, eosin: pink).
HEMATOXYLIN = np.array([0.65, 0.70, 0.29], dtype=np.float32)
EOSIN = np.array([0.07, 0.99, 0.11], dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bicubic upsampling of a (cells × cells) random grid to (size × size), values in [0, 1]."""
    grid = rng.random((cells, cells), dtype=np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC)).clip(0, 1)


def _disks(rng, size: int, centers: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Union of filled disks (nuclei or lumens) as a float mask, drawn into per-disk bounding boxes."""
    out = np.zeros((size, size), dtype=np.float32)
    for (cy, cx), r in zip(centers, radii):
        y0, y1 = max(int(cy - r - 1), 0), min(int(cy + r + 2), size)
        x0, x1 = max(int(cx - r - 1), 0), min(int(cx + r + 2), size)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        out[y0:y1, x0:x1] = np.maximum(out[y0:y1, x0:x1], ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r))
    return out


def make_patch(seed: int, index: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) float32 RGB patch in [0, 1] and its (H, W) int64 mask (0 normal, 1 cancer)."""
    rng = np.random.default_rng([seed, index])
    scale = size / 256
    # Cancer region: a thresholded smooth field; about a quarter of patches have none.
    field = _smooth_noise(rng, size, 4) * 0.7 + _smooth_noise(rng, size, 9) * 0.3
    level = rng.uniform(0.45, 0.75) if rng.random() > 0.25 else 2.0
    cancer = field > level

    # Glands: normal ones round and regular; inside cancer small, irregular, often missing.
    n_glands = int(rng.integers(3, 7) * scale * scale) + 1
    centers = rng.uniform(0, size, (n_glands, 2))
    in_cancer = cancer[centers[:, 0].astype(int).clip(0, size - 1), centers[:, 1].astype(int).clip(0, size - 1)]
    keep = ~in_cancer | (rng.random(n_glands) < 0.4)
    centers = centers[keep]
    radii = np.where(in_cancer[keep], rng.uniform(5, 10, len(centers)), rng.uniform(12, 22, len(centers))) * scale
    lumen = _disks(rng, size, centers, radii)

    # Rim nuclei around every gland, evenly spaced.
    rim = []
    for (cy, cx), r in zip(centers, radii):
        k = max(int(2 * np.pi * r / (5 * scale)), 6)
        ang = np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(0, 1)
        rr = r + 2.5 * scale + rng.normal(0, 0.5, k)
        rim.append(np.stack([cy + rr * np.sin(ang), cx + rr * np.cos(ang)], 1))
    rim = np.concatenate(rim) if rim else np.zeros((0, 2))
    # Stromal nuclei: sparse in normal tissue, crowded in cancer.
    n_stroma = int(180 * scale * scale)
    pts = rng.uniform(0, size, (n_stroma * 3, 2))
    inside = cancer[pts[:, 0].astype(int), pts[:, 1].astype(int)]
    take = np.where(inside, rng.random(len(pts)) < 0.85, rng.random(len(pts)) < 0.25)
    pts, inside = pts[take], inside[take]
    nuc_r = np.where(inside, rng.uniform(2.2, 4.2, len(pts)), rng.uniform(1.5, 2.4, len(pts))) * scale
    rim_in = cancer[rim[:, 0].astype(int).clip(0, size - 1), rim[:, 1].astype(int).clip(0, size - 1)]
    rim_r = np.where(rim_in, rng.uniform(2.0, 3.8, len(rim)), rng.uniform(1.6, 2.2, len(rim))) * scale
    nuclei = _disks(rng, size, np.concatenate([pts, rim]), np.concatenate([nuc_r, rim_r]))
    nuclei = gaussian_filter(nuclei, 0.7 * scale)
    # Darker, more variable chromatin in cancer.
    chromatin = np.where(cancer, 1.25 + 0.35 * _smooth_noise(rng, size, 32), 0.95 + 0.1 * _smooth_noise(rng, size, 32))

    fibres = gaussian_filter(rng.random((size, size), dtype=np.float32), (0.6, 3.0) if rng.random() < 0.5 else (3.0, 0.6))
    eosin = (0.35 + 0.25 * _smooth_noise(rng, size, 6) + 0.8 * (fibres - 0.5)) * (1 - 0.85 * lumen)
    hema = 0.08 + 1.1 * nuclei * chromatin + 0.05 * _smooth_noise(rng, size, 12)
    od = eosin[..., None] * EOSIN + hema[..., None] * HEMATOXYLIN
    rgb = np.exp(-od) + rng.normal(0, 0.015, (size, size, 3)).astype(np.float32)
    return np.clip(rgb, 0, 1).astype(np.float32), cancer.astype(np.int64)


class SyntheticPathology(Dataset):
    """`length` synthetic patches (see the module docstring); deterministic by (seed, index).

    Returns (image float32 (C, H, W) in [0, 1], mask int64 (H, W)). in_channels=1 gives grayscale (the
    authors' setting). flips=True applies joint random horizontal/vertical flips, seeded by
    (seed, epoch, index); call `set_epoch` each epoch for fresh flips.
    """

    def __init__(self, length: int, size: int = 256, seed: int = 0, in_channels: int = 3, flips: bool = False):
        if length < 1 or size < 16:
            raise ValueError(f"SyntheticPathology needs length >= 1 and size >= 16, got {length} and {size}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels}")
        self.length, self.size, self.seed, self.in_channels, self.flips = length, size, seed, in_channels, flips
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} patches")
        rgb, mask = make_patch(self.seed, index, self.size)
        if self.in_channels == 1:
            image = (rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[None]
        else:
            image = rgb.transpose(2, 0, 1)
        if self.flips:
            from .transforms import joint_flip

            image, mask = joint_flip(image, mask, np.random.default_rng([self.seed, self.epoch, index, 1]))
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(mask))
