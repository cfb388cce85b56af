"""CoCo DistillNet's similarity op: the public functions and their backend dispatch (functional.py), the
plain-torch Gram path (gram_torch.py), the N×N reference (naive.py) and the `auto` decision (auto.py); the
Triton kernels it calls live in cocofast.kernels (gram.py, tiled.py)."""
from cocofast.ops.similarity.functional import (BACKENDS, NaiveTooLargeError, cmss, coco_loss,
                                                cross_layer_correlation, similarity_distance)

__all__ = ["BACKENDS", "NaiveTooLargeError", "cmss", "coco_loss", "cross_layer_correlation",
           "similarity_distance"]
