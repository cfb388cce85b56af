"""The backend table of each op family, and the one validator of a backend name.

A config (train/config.py) or a loss validates a user's choice with `check_backend(family, name)` before any
work starts; the ops themselves dispatch on the same tables, so a name valid here is valid there.
"""
from __future__ import annotations

# CoCo's similarity ops (cross_layer_correlation, coco_loss, similarity_distance): see cocofast.ops.similarity.
SIMILARITY_BACKENDS = ("naive", "gram", "triton", "tiled", "auto")
# CPKD's pixel-relation KL: see cocofast.ops.pixel_relation.
PIXEL_RELATION_BACKENDS = ("naive", "chunked", "triton", "auto")

BACKEND_TABLES = {"similarity": SIMILARITY_BACKENDS, "pixel_relation": PIXEL_RELATION_BACKENDS}


def check_backend(op_family: str, name, where: str | None = None) -> str:
    """`name` if it is a backend of `op_family` ("similarity" or "pixel_relation"); else a ValueError that
    lists the valid names, prefixed by `where` (the loss or config key that took the name) when given."""
    table = BACKEND_TABLES.get(op_family)
    if table is None:
        raise ValueError(f"op_family must be one of {', '.join(BACKEND_TABLES)}; got {op_family!r}")
    if name not in table:
        subject = f"{where}: backend" if where else f"{op_family} backend"
        raise ValueError(f"{subject} must be one of {', '.join(table)}; got {name!r}")
    return name


__all__ = ["BACKEND_TABLES", "PIXEL_RELATION_BACKENDS", "SIMILARITY_BACKENDS", "check_backend"]
