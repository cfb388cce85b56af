"""The network registry: name -> factory, filled where each network is defined (as timm's @register_model).

    @register_model("my_unet")                        # a segmentation network: training accepts the name
    class MyUNet(nn.Module): ...
    register_model("my_helper", factory, segmentation=False)   # a part, not a network to train as such

A module that registers networks registers them when it is imported; cocofast.models imports its own.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}
PARTS: set[str] = set()  # registered with segmentation=False


def register_model(name: str, factory: Callable[..., nn.Module] | None = None, *, segmentation: bool = True):
    """Add a network to the registry (usable as a decorator). Names are unique. `segmentation=False` marks a
    part (a paraphraser, a critic) that is built by name but is not a teacher or student network."""

    def add(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"a model named {name!r} is already registered")
        MODELS[name] = f
        if not segmentation:
            PARTS.add(name)
        return f

    return add(factory) if factory is not None else add


def list_models() -> list[str]:
    """Registered model names, in registration order."""
    return list(MODELS)


class SegmentationNames(Sequence):
    """The registered segmentation networks, read live: a network registered later is in it too."""

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in MODELS if n not in PARTS)

    def __getitem__(self, index):
        return self.names()[index]

    def __len__(self) -> int:
        return len(self.names())

    def __eq__(self, other) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (Sequence, SegmentationNames)) else other)

    __hash__ = None

    def __repr__(self) -> str:
        return repr(self.names())


SEGMENTATION_MODELS = SegmentationNames()
