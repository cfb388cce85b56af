"""Joint augmentations: the same spatial change to an image (C, H, W) and its mask (H, W)."""
from __future__ import annotations

import numpy as np


def joint_flip(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
    """Random horizontal and vertical flips, each with probability 1/2, applied to both arrays."""
    if rng.random() < 0.5:
        image, mask = image[..., :, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        image, mask = image[..., ::-1, :], mask[::-1, :]
    return image, mask
