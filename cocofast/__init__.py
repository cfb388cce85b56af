"""cocofast: fast, memory-lean knowledge distillation for pathology image segmentation."""
from cocofast.similarity import (
    BACKENDS,
    NaiveTooLargeError,
    cmss,
    coco_loss,
    cross_layer_correlation,
    similarity_distance,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "NaiveTooLargeError",
    "cmss",
    "coco_loss",
    "cross_layer_correlation",
    "similarity_distance",
]
