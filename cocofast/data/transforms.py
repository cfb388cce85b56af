"""Joint image/mask transforms and the one augmentation pipeline every data set uses.

Geometry moves image and mask together (flips); colour touches the image only (stain jitter in HED
space, brightness and contrast) and works on [0, 1] RGB before any mean/std standardisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Ruifrok & Johnston (2001) H&E-DAB optical densities, the matrix scikit-image's rgb2hed inverts.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
# scikit-image's floor on intensities before the logarithm.
LOG_FLOOR = 1e-6


class EpochDraws:
    """For data sets whose random draws depend on (seed, epoch, index): the epoch counter and set_epoch.

    The counter lives in shared memory, so set_epoch reaches DataLoader workers that are already running
    (like DistributedSampler.set_epoch, which only the sampler in the main process would see).
    """

    def init_epoch(self) -> None:
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch whose draws __getitem__ returns."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())


@dataclass(frozen=True)
class Augmentation:
    """What to draw per sample; all off by default.

    flips: horizontal and vertical, each with probability 1/2.
    hed: stain jitter of Tellez et al. 2018 ("Whole-slide mitosis detection in H&E breast histology using PHH3
        as a reference"): each of the H, E, D stain concentrations becomes s * a + b with a ~ U(1 - hed, 1 + hed)
        and b ~ U(-hed, hed); 0.05 is their light setting. RGB images only.
    brightness, contrast: factors drawn from U(1 - x, 1 + x), applied as torchvision's ColorJitter does
        (brightness multiplies; contrast blends with the mean gray level).
    """

    flips: bool = False
    hed: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self):
        for name in ("hed", "brightness", "contrast"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"augmentation {name} must be in [0, 1), got {value}")

    @property
    def active(self) -> bool:
        return self.flips or self.hed > 0 or self.brightness > 0 or self.contrast > 0

    def check_channels(self, channels: int) -> None:
        if self.hed > 0 and channels != 3:
            raise ValueError(f"HED stain jitter needs RGB images; the data have {channels} channel(s)")


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


def hed_jitter(image: torch.Tensor, scale: np.ndarray, shift: np.ndarray) -> torch.Tensor:
    """RGB (3, H, W) in [0, 1] with stain concentrations s -> s * scale + shift (scikit-image's rgb2hed and
    hed2rgb conventions, computed in float32)."""
    to_hed, to_rgb = HED_FROM_RGB.to(image.device, torch.float32), RGB_FROM_HED.to(image.device, torch.float32)
    log_floor = float(np.log(LOG_FLOOR))
    rgb = image.clamp(min=LOG_FLOOR).permute(1, 2, 0)
    stains = ((rgb.log() / log_floor) @ to_hed).clamp_(min=0)
    stains = stains * torch.as_tensor(scale, dtype=torch.float32, device=image.device) \
        + torch.as_tensor(shift, dtype=torch.float32, device=image.device)
    out = torch.exp((stains * log_floor) @ to_rgb)
    return out.clamp_(0.0, 1.0).permute(2, 0, 1).contiguous()


def brightness_contrast(image: torch.Tensor, brightness: float, contrast: float) -> torch.Tensor:
    """torchvision ColorJitter's order and formulas for its brightness and contrast factors."""
    image = (image * brightness).clamp_(0.0, 1.0)
    gray = image.mean() if image.shape[0] == 1 else (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).mean()
    return (contrast * image + (1.0 - contrast) * gray).clamp_(0.0, 1.0)


def augment_pair(image: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator, aug: Augmentation):
    """Image (C, H, W) in [0, 1] and mask (H, W) with `aug`'s draws from `rng`, in a fixed order (flips, HED,
    brightness/contrast), so a sample's augmentation depends on its generator alone."""
    if aug.flips:
        image, mask = random_joint_flip(image, mask, rng)
    if aug.hed > 0:
        scale, shift = rng.uniform(1 - aug.hed, 1 + aug.hed, 3), rng.uniform(-aug.hed, aug.hed, 3)
        image = hed_jitter(image, scale, shift)
    if aug.brightness > 0 or aug.contrast > 0:
        b = rng.uniform(1 - aug.brightness, 1 + aug.brightness) if aug.brightness > 0 else 1.0
        c = rng.uniform(1 - aug.contrast, 1 + aug.contrast) if aug.contrast > 0 else 1.0
        image = brightness_contrast(image, float(b), float(c))
    return image.contiguous(), mask.contiguous()


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
