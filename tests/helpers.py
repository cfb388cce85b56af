"""Small things several test files build the same way."""
from pathlib import Path

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
