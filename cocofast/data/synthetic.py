"""SyntheticPathology: procedurally drawn H&E-like tissue with cancer masks, generated on the fly.

This data set is synthetic. No patient tissue is involved: every patch is drawn from random numbers,
deterministically from (seed, index), in 10-20 ms per 256x256 patch on one CPU core. It exists so that
the demo and the tests run anywhere without downloads; numbers measured on it say nothing about
clinical accuracy.

What is drawn, as optical densities of two stains (Beer-Lambert) then turned into RGB:
- eosin (pink): wavy collagen bundles of stroma, the cytoplasm of gland epithelium;
- hematoxylin (purple): nuclei; elongated fibroblasts in stroma, scattered lymphocytes and the odd
  dense lymphoid aggregate, and one tidy row of small basal nuclei around each normal gland;
- glands: pale lumens surrounded by a rim of epithelium.
Cancer (mask value 1) fills irregular regions. Inside them glands are smaller, angular, fused or solid,
and their nuclei are crowded, enlarged, pleomorphic, hyperchromatic, stratified and randomly oriented,
with prominent nucleoli; the stroma between them is denser in fibroblasts. How far a tumour departs
from normal (its grade) varies from patch to patch, and stain colour varies per patch, so colour alone
does not separate the classes; lymphoid aggregates (dense dark small nuclei in normal tissue) are the
deliberate look-alike.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy import ndimage as ndi
from torch.utils.data import Dataset

from .normalise import luma
from .transforms import Augmentation, EpochDraws, augment_pair

# Optical-density directions of hematoxylin and eosin (Macenko's reference H&E stain matrix).
HEMATOXYLIN = np.array([0.5626, 0.7201, 0.4062], dtype=np.float32)
EOSIN = np.array([0.2159, 0.8012, 0.5581], dtype=np.float32)
MIN_SIZE = 32  # the smallest patch side drawn (training config checks refuse a smaller image_size)


class SyntheticPathology(EpochDraws, Dataset):
    """`length` synthetic H&E patches: (image float32 (C, size, size) in [0, 1], mask int64 (size, size)).

    Mask 0 = normal tissue, 1 = cancer. Sample i is the same for a given seed on every machine and in
    every process; with flips=True (or an `augment`), call set_epoch(e) to redraw the augmentation each
    epoch (deterministically, from (seed, augment_seed, epoch, index)).
    """

    MEMO_BYTES = 256 * 2**20

    def __init__(self, length: int, size: int = 256, seed: int = 0, in_channels: int = 3,
                 flips: bool = False, augment: Augmentation | None = None, augment_seed: int = 0):
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        if size < MIN_SIZE:
            raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels}")
        self.length, self.size, self.seed = length, size, seed
        self.augment_seed = augment_seed  # the training seed: augmentation varies with it, the patches do not
        self.in_channels = in_channels
        self.augment = augment if augment is not None else Augmentation(flips=flips)
        self.augment.check_channels(in_channels)
        self.init_epoch()
        # Drawing a patch is ~2.6 ms at 64x64, redone every epoch; a short run spent a fifth of its time here.
        # Keep the drawn patches when they all fit in MEMO_BYTES (per process: each DataLoader worker has its own).
        per_sample = size * size * (4 * in_channels + 1)  # float32 image + uint8 mask
        self._drawn: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = (
            {} if length * per_sample <= self.MEMO_BYTES else None)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        index %= self.length
        image, mask = self.drawn(index)
        if self.augment.active:
            rng = np.random.default_rng((self.seed, self.augment_seed, self.epoch, index, 1))
            image, mask = augment_pair(image, mask, rng, self.augment)
        return image, mask

    def drawn(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch `index` before augmentation; a fresh copy each call, so callers may change it in place."""
        if self._drawn is not None and index in self._drawn:
            image, mask = self._drawn[index]
            return image.clone(), mask.long()
        rgb, mask = render_patch(self.size, np.random.default_rng((self.seed, index)))
        image = luma(rgb) if self.in_channels == 1 else rgb
        image = torch.from_numpy(np.ascontiguousarray(
            image[None] if image.ndim == 2 else image.transpose(2, 0, 1)))
        if self._drawn is not None:
            self._drawn[index] = (image.clone(), torch.from_numpy(mask.astype(np.uint8)))
        return image, torch.from_numpy(mask.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# drawing. Everything is whole-image numpy arithmetic (no per-object Python loops over pixels), and
# nothing calls BLAS: a threaded BLAS on a busy machine turns a 0.02 ms product into 15 ms.

@functools.lru_cache(maxsize=32)
def _bspline_matrix(size: int, cells: float) -> np.ndarray:
    """(size, ceil(cells) + 3) weights that turn a coarse random grid into a C2-smooth field (cubic B-splines)."""
    t = (np.arange(size) + 0.5) / size * cells
    x = np.abs(t[:, None] - (np.arange(math.ceil(cells) + 3) - 1)[None, :])
    w = np.where(x < 1, (4 - 6 * x**2 + 3 * x**3) / 6, np.where(x < 2, (2 - x) ** 3 / 6, 0.0))
    return (w / np.sqrt((w**2).sum(1, keepdims=True))).astype(np.float32)  # unit variance everywhere


def smooth_noise(rng: np.random.Generator, size: int, period: float) -> np.ndarray:
    """Smooth random field, roughly standard normal, whose blobs are about `period` pixels apart.

    Features keep their size in pixels whatever the patch size: a 64-pixel patch shows a piece of the
    same tissue a 256-pixel patch shows, at the same magnification.
    """
    cells = size / period
    m = _bspline_matrix(size, cells)
    n = m.shape[1]
    grid = rng.standard_normal((n, n), dtype=np.float32)
    return np.einsum("jl,il->ij", m, np.einsum("ik,kl->il", m, grid))


@functools.lru_cache(maxsize=4)
def _coords(size: int):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _sample_points(rng, density: np.ndarray, per_pixel: float) -> np.ndarray:
    """Points (n, 2) of a Poisson process with intensity density * per_pixel (density in [0, 1])."""
    size = density.shape[0]
    n = rng.poisson(per_pixel * size * size)
    pts = rng.random((n, 2), dtype=np.float32) * size
    keep = rng.random(n, dtype=np.float32) < density[pts[:, 0].astype(int), pts[:, 1].astype(int)]
    return pts[keep]


def _grid_points(rng, size: int, spacing: float, jitter: float) -> np.ndarray:
    """A jittered square grid of points (n, 2) covering the patch and a margin around it."""
    ticks = np.arange(-0.5, size / spacing + 0.5) * spacing
    pts = np.stack(np.meshgrid(ticks, ticks, indexing="ij"), -1).reshape(-1, 2).astype(np.float32)
    pts += rng.uniform(-jitter, jitter, pts.shape).astype(np.float32) * spacing
    return pts


def _owner(size: int, points: np.ndarray) -> np.ndarray:
    """For every pixel, the index of the nearest of `points` (all inside the patch): a Voronoi partition.

    Points sharing a pixel collapse to the last one; the others own no pixels, which is harmless.
    """
    marker = np.zeros((size, size), np.int32)
    marker[points[:, 0].astype(int), points[:, 1].astype(int)] = np.arange(1, len(points) + 1)
    near = ndi.distance_transform_edt(marker == 0, return_distances=False, return_indices=True)
    return marker[near[0], near[1]] - 1


def _lookup(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Values of `image` at `points`, clamped to the border."""
    size = image.shape[0]
    return image[np.clip(points[:, 0], 0, size - 1).astype(int), np.clip(points[:, 1], 0, size - 1).astype(int)]


def _in_patch(points: np.ndarray, size: int) -> np.ndarray:
    return (points[:, 0] >= 0) & (points[:, 0] < size) & (points[:, 1] >= 0) & (points[:, 1] < size)


class _Nuclei:
    """Nuclei collected as ellipses (centre, semi-axes, angle, darkness, vesicular) and rendered at once."""

    def __init__(self):
        self.parts = []

    def add(self, centres, a, b, angle, dark, vesicular):
        n = len(centres)
        if n:
            full = lambda v: np.broadcast_to(np.asarray(v, np.float32), (n,))  # noqa: E731
            self.parts.append(np.column_stack([centres, full(a), full(b), full(angle), full(dark),
                                               full(vesicular)]).astype(np.float32))

    def render(self, size: int, rng) -> tuple[np.ndarray, np.ndarray]:
        """Hematoxylin amount of all nuclei, and the fraction of each pixel covered by a nucleus."""
        zero = np.zeros((size, size), np.float32)
        if not self.parts:
            return zero, zero
        p = np.concatenate(self.parts)
        p = p[_in_patch(p, size)]
        if not len(p):
            return zero, zero
        # Each pixel belongs to its nearest nucleus centre, so crowded nuclei mould against each other.
        label = _owner(size, p)
        r2 = _elliptic_radius(size, p[:, :2], label, p[:, 2], p[:, 3], p[:, 4]) ** 2
        r = np.sqrt(r2)
        inside = np.clip((1.0 - r) * 3.0, 0.0, 1.0)  # soft edge about a pixel wide
        texture = 1.0 + 0.25 * rng.standard_normal((size, size), dtype=np.float32)
        # Vesicular nuclei: pale chromatin, a darker membrane and a dark central nucleolus.
        vesicular = p[label, 6]
        profile = 1.0 - vesicular * (0.45 - 0.5 * r2 - 0.9 * (r < 0.22))
        return inside * p[label, 5] * texture * profile, inside


def _elliptic_radius(size, centres, label, a, b, angle):
    """Per pixel, the elliptical radius (1 on the rim) in the frame of the owning object."""
    yy, xx = _coords(size)
    dy, dx = yy - centres[label, 0], xx - centres[label, 1]
    c, s = np.cos(angle)[label], np.sin(angle)[label]
    return np.sqrt(((dx * c + dy * s) / a[label]) ** 2 + ((dy * c - dx * s) / b[label]) ** 2)


def render_patch(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic H&E patch: RGB float32 (size, size, 3) in [0, 1] and mask uint8 (size, size)."""
    yy, xx = _coords(size)

    # Where the cancer is: a smooth field with ragged borders, thresholded.
    field = smooth_noise(rng, size, 80.0) + 0.3 * smooth_noise(rng, size, 16.0)
    kind = rng.random()
    if kind < 0.3:
        cancer = np.zeros((size, size), bool)
    elif kind < 0.4:
        cancer = np.ones((size, size), bool)
    else:
        cancer = field > np.quantile(field[::4, ::4], rng.uniform(0.25, 0.8))
    grade = np.float32(rng.uniform(0.15, 1.0))  # how far the tumour departs from normal
    tumour = cancer.astype(np.float32)

    # Glands. Normal: a loose jittered grid of round glands. Cancer: a denser grid of smaller,
    # irregular, back-to-back glands; a Voronoi partition gives every pixel its gland.
    normal_c = _grid_points(rng, size, rng.uniform(46, 58), 0.3)
    cancer_c = _grid_points(rng, size, rng.uniform(26, 34), 0.35)
    normal_c = normal_c[~_lookup(cancer, normal_c) & (rng.random(len(normal_c)) < 0.85)]
    cancer_c = cancer_c[_lookup(cancer, cancer_c) & (rng.random(len(cancer_c)) < 0.8)]
    centres = np.concatenate([normal_c, cancer_c])
    malignant = np.r_[np.zeros(len(normal_c), bool), np.ones(len(cancer_c), bool)]
    inside = _in_patch(centres, size)
    centres, mal = centres[inside], malignant[inside]
    epithelium = np.zeros((size, size), np.float32)
    lumen = np.zeros((size, size), np.float32)
    nuclei = _Nuclei()
    wobble = smooth_noise(rng, size, 12.0)
    if len(centres):
        owner = _owner(size, centres)
        n = len(centres)
        a = np.where(mal, rng.uniform(12, 20, n) * (1.1 - 0.25 * grade), rng.uniform(15, 25, n)).astype(np.float32)
        # Normal glands are cut at any angle, so some are elongated too; tumour glands more often.
        b = (a * np.where(mal, rng.uniform(0.45, 0.95, n), rng.uniform(0.55, 0.95, n))).astype(np.float32)
        angle = rng.uniform(0, np.pi, n).astype(np.float32)
        r = _elliptic_radius(size, centres, owner, a, b, angle)
        mal_px = mal[owner]
        r = r * (1.0 + np.where(mal_px, 0.12 + 0.3 * grade, 0.04) * wobble)  # angular outlines in cancer
        # Lumens: open and central in normal glands (unless the cut misses them), small or absent in tumour.
        lumen_frac = np.where(mal, rng.uniform(0.0, 0.45, n) * (1.2 - grade),
                              rng.uniform(0.25, 0.45, n) * (rng.random(n) > 0.1))
        epithelium = (r < 1.0).astype(np.float32)
        lumen = (r < lumen_frac[owner]).astype(np.float32)
        # Cribriform: extra punched-out lumens inside malignant epithelium.
        holes = (smooth_noise(rng, size, 16.0) > 2.0 - 0.6 * grade) & mal_px & (r < 0.8)
        lumen = np.maximum(lumen, holes.astype(np.float32))
        epithelium *= 1.0 - lumen
        _normal_rim_nuclei(rng, nuclei, centres[~mal], a[~mal], b[~mal], angle[~mal])
        crowd = epithelium * mal_px
        pts = _sample_points(rng, crowd, (1.0 / 85) * (1.0 + grade))
        _atypical_nuclei(rng, nuclei, pts, grade)

    stroma = np.clip(1.0 - epithelium - lumen, 0.0, 1.0)

    # Stroma: wavy collagen, fibroblasts along it, lymphocytes and plasma cells in normal lamina
    # propria; infiltrating tumour cells and more fibroblasts (desmoplasia) inside the cancer.
    theta = rng.uniform(0, np.pi)
    warp = 2.5 * smooth_noise(rng, size, 64.0)
    across = (-xx * np.sin(theta) + yy * np.cos(theta)) / rng.uniform(2.0, 3.0)
    fibres = (0.5 + 0.5 * np.sin(across + 4.0 * warp)) ** 2 * (0.5 + 0.5 * np.tanh(wobble))
    pts = _sample_points(rng, stroma * (0.5 + tumour), 1.0 / 700)
    local_theta = theta + 0.6 * warp[pts[:, 0].astype(int), pts[:, 1].astype(int)]
    nuclei.add(pts, rng.uniform(4.0, 6.0, len(pts)), rng.uniform(1.1, 1.6, len(pts)), local_theta,
               rng.uniform(0.8, 1.0, len(pts)), 0.0)
    inflamed = np.clip(0.6 + 0.5 * smooth_noise(rng, size, 80.0), 0.1, 1.0)
    pts = _sample_points(rng, stroma * inflamed * (1.0 - 0.7 * tumour), 1.0 / 200)
    nuclei.add(pts, *rng.uniform(2.1, 2.7, (2, len(pts))), 0.0, rng.uniform(1.2, 1.5, len(pts)), 0.0)
    pts = _sample_points(rng, stroma * tumour, grade / 400)
    _atypical_nuclei(rng, nuclei, pts, grade)
    if rng.random() < 0.35:  # a lymphoid aggregate in normal tissue: dense dark nuclei that are not cancer
        centre = rng.uniform(0, size, 2)
        radius = rng.uniform(16, 36)
        blob = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * radius**2)) * (1.0 - tumour)
        pts = _sample_points(rng, blob, 1.0 / 30)
        nuclei.add(pts, *rng.uniform(2.2, 2.9, (2, len(pts))), 0.0, rng.uniform(1.3, 1.6, len(pts)), 0.0)
        aggregate = blob
    else:
        aggregate = 0.0

    h_nuclei, occupied = nuclei.render(size, rng)

    # Stain amounts, lightly blurred (optics), then Beer-Lambert to RGB with per-patch stain variation.
    grain = rng.standard_normal((size, size), dtype=np.float32)
    mucin = epithelium * (1.0 - tumour)
    eosin = (stroma * (0.34 + 0.3 * fibres) * (1.0 - 0.25 * tumour * grade) * (1.0 - 0.5 * aggregate)
             + mucin * 0.26 + epithelium * tumour * (0.36 + 0.1 * grade) + lumen * 0.04)
    eosin = eosin * (1.0 - 0.6 * occupied) + 0.03 * grain
    hema = (1.5 * h_nuclei + mucin * 0.16 + epithelium * tumour * (0.14 + 0.08 * grade) + 0.04
            + 0.015 * grain)
    eosin, hema = _soften(eosin), _soften(hema)
    e_amount, h_amount = rng.uniform(0.8, 1.3), rng.uniform(0.8, 1.2)
    h_vec = HEMATOXYLIN + rng.normal(0, 0.05, 3).astype(np.float32)
    e_vec = EOSIN + rng.normal(0, 0.05, 3).astype(np.float32)
    light = rng.uniform(0.9, 1.0)
    rgb = np.empty((size, size, 3), np.float32)
    for ch in range(3):
        rgb[..., ch] = np.exp(-np.maximum(hema * (h_amount * h_vec[ch]) + eosin * (e_amount * e_vec[ch]), 0.0))
    rgb *= light
    return np.clip(rgb, 0.0, 1.0, out=rgb), cancer.astype(np.uint8)


def _soften(x: np.ndarray) -> np.ndarray:
    """A 2x2 box blur that keeps the shape (edge-replicated): cheap stand-in for the microscope's optics."""
    y = x.copy()
    y[1:] += x[:-1]
    y[0] += x[0]
    z = y.copy()
    z[:, 1:] += y[:, :-1]
    z[:, 0] += y[:, 0]
    return z * 0.25


def _normal_rim_nuclei(rng, nuclei, centres, a, b, angle):
    """One tidy row of small basal nuclei around each normal gland, long axis towards the lumen."""
    if not len(centres):
        return
    perimeter = np.pi * (a + b) * 0.8
    count = np.maximum((perimeter / rng.uniform(6.0, 7.0)).astype(int), 6)
    gland = np.repeat(np.arange(len(centres)), count)
    step = np.repeat(2 * np.pi / count, count)
    first = np.cumsum(count) - count
    k = np.arange(count.sum()) - np.repeat(first, count)
    t = np.repeat(rng.uniform(0, 2 * np.pi, len(centres)), count) + k * step + rng.normal(0, 0.04, len(k))
    ex, ey = 0.82 * a[gland] * np.cos(t), 0.82 * b[gland] * np.sin(t)
    c, s = np.cos(angle[gland]), np.sin(angle[gland])
    pts = np.column_stack([centres[gland, 0] + ex * s + ey * c, centres[gland, 1] + ex * c - ey * s])
    radial = np.arctan2(pts[:, 0] - centres[gland, 0], pts[:, 1] - centres[gland, 1])
    n = len(pts)
    nuclei.add(pts, rng.uniform(3.0, 3.6, n), rng.uniform(1.8, 2.2, n), radial, rng.uniform(0.85, 1.0, n), 0.0)


def _atypical_nuclei(rng, nuclei, pts, grade):
    """Enlarged, pleomorphic, hyperchromatic, randomly oriented nuclei, many with a nucleolus."""
    n = len(pts)
    a = 3.2 * (1.0 + 0.5 * grade) * rng.lognormal(0, 0.1 + 0.15 * grade, n)
    b = a * rng.uniform(0.55, 0.95, n)
    nuclei.add(pts, a, b, rng.uniform(0, np.pi, n), rng.uniform(0.95, 1.0 + 0.3 * grade, n),
               (rng.random(n) < 0.25 + 0.5 * grade).astype(np.float32))
