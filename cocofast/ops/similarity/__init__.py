"""CoCo DistillNet's similarity op: the public functions and their backend dispatch (functional.py), the
plain-torch Gram path (gram_torch.py); the Triton kernels it calls live in cocofast.kernels (gram, tiled)."""
from cocofast.ops.similarity.functional import (BACKENDS, NaiveTooLargeError, cmss, coco_loss,
                                                cross_layer_correlation, similarity_distance)

__all__ = ["BACKENDS", "NaiveTooLargeError", "cmss", "coco_loss", "cross_layer_correlation",
           "similarity_distance"]
