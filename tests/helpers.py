"""Small things several test files build the same way."""
from pathlib import Path

import numpy as np
import torch

from cocofast.io import atomic_save
from cocofast.models import create_model


def save_enet_checkpoint(path: Path, roles=("student",)):
    """A width-0.25 ENet (3 channels, 2 classes, seed 0) saved under `roles` of a cocofast checkpoint at
    `path` (no training config: tools fall back to their defaults); returns (path, the network in eval mode)."""
    torch.manual_seed(0)
    kwargs = {"in_channels": 3, "num_classes": 2, "width": 0.25}
    model = create_model("enet", **kwargs).eval()
    entry = {"model_name": "enet", "model_kwargs": kwargs, "state_dict": model.state_dict()}
    atomic_save({"models": {role: entry for role in roles}}, path)
    return path, model


def write_folder_dataset(root: Path, side: int, counts=(("train", 8), ("val", 4))) -> Path:
    """A small folder data set (root/SPLIT/images, root/SPLIT/masks as 0/255 PNGs): one bright rectangle of
    class 1 per image on dark noise, the same in every image, so a short run can learn it."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in counts:
        for kind in ("images", "masks"):
            (root / split / kind).mkdir(parents=True)
        for i in range(count):
            mask = np.zeros((side, side), np.uint8)
            mask[side // 8: side * 5 // 8, side // 4: side * 7 // 8] = 255
            image = rng.integers(0, 120, (side, side, 3), dtype=np.uint8)
            image[mask > 0] += 100
            Image.fromarray(image).save(root / split / "images" / f"p{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"p{i}.png")
    return root
