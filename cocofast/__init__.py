"""cocofast: fast, memory-lean knowledge distillation for pathology image segmentation."""
from cocofast.ops.similarity import (
    BACKENDS,
    NaiveTooLargeError,
    cmss,
    coco_loss,
    cross_layer_correlation,
    similarity_distance,
)

from cocofast.models import SegOutput, create_model, list_models
from cocofast.losses import LOSSES, DistillLoss, get_loss, list_losses
from cocofast.ops.pixel_relation import pixel_relation_kl
from cocofast.data import FolderDataset, SyntheticPathology
from cocofast.metrics import ConfusionMatrix, hd95

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ConfusionMatrix",
    "FolderDataset",
    "DistillLoss",
    "LOSSES",
    "NaiveTooLargeError",
    "SegOutput",
    "SyntheticPathology",
    "cmss",
    "coco_loss",
    "create_model",
    "cross_layer_correlation",
    "get_loss",
    "hd95",
    "list_losses",
    "list_models",
    "pixel_relation_kl",
    "similarity_distance",
]
