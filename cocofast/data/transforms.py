"""Joint image/mask transforms: whatever moves a pixel of the image moves the same pixel of the mask."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def joint_flip(image: torch.Tensor, mask: torch.Tensor, horizontal: bool, vertical: bool):
    """Flip an image (C, H, W) and its mask (H, W) together."""
    if horizontal:
        image, mask = image.flip(-1), mask.flip(-1)
    if vertical:
        image, mask = image.flip(-2), mask.flip(-2)
    return image, mask


def random_joint_flip(image: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator):
    """Horizontal and vertical flips, each with probability 1/2, drawn from `rng`."""
    horizontal, vertical = rng.random(2) < 0.5
    return joint_flip(image, mask, bool(horizontal), bool(vertical))


def resize_pair(image: torch.Tensor, mask: torch.Tensor, size: int | tuple[int, int]):
    """Resize an image (C, H, W) bilinearly (antialiased when shrinking) and its mask (H, W) by nearest.

    Nearest-exact keeps mask values a subset of the original labels and samples pixel centres, so a
    2x downscale picks one of each 2x2 block instead of drifting by half a pixel.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if image.shape[-2:] == (height, width):
        return image, mask
    image = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False,
                          antialias=True)[0].clamp_(0.0, 1.0)
    mask = F.interpolate(mask[None, None].to(torch.float32), size=(height, width),
                         mode="nearest-exact")[0, 0].to(mask.dtype)
    return image, mask
