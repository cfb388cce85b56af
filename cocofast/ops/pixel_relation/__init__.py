"""CPKD's pixel-relation KL: the public function and its backend dispatch (functional.py), the plain-torch
row-block path (chunked_torch.py) and the N×N reference (naive.py); the Triton kernels it calls live in
cocofast.kernels.pixel_relation."""
from cocofast.ops.pixel_relation.functional import BACKENDS, NaiveTooLargeError, pixel_relation_kl
from cocofast.ops.pixel_relation.naive import NAIVE_MATRICES, naive_rows

__all__ = ["BACKENDS", "NAIVE_MATRICES", "NaiveTooLargeError", "naive_rows", "pixel_relation_kl"]
