"""The loss registry: name -> DistillLoss subclass, filled where each loss is defined.

    @register_loss("my_loss")
    class MyLoss(DistillLoss):
        reads = Reads("taps", teacher="raw")
        ...

A module's losses are registered when it is imported: cocofast.losses imports the built-in ones, and the
training config's `loss_modules` imports a user's.
"""
from __future__ import annotations

from cocofast.losses.base import DistillLoss, Reads

LOSSES: dict[str, type[DistillLoss]] = {}


def register_loss(name: str, cls: type[DistillLoss] | None = None):
    """Add a loss under `name` (usable as a decorator, `@register_loss("name")`); returns the class."""

    def add(cls: type[DistillLoss]) -> type[DistillLoss]:
        if not (isinstance(cls, type) and issubclass(cls, DistillLoss)) or not isinstance(
                getattr(cls, "reads", None), Reads):
            raise TypeError(f"register_loss({name!r}): expected a DistillLoss subclass with a `reads = Reads(...)` "
                            f"declaration, got {cls!r}")
        if name in LOSSES and LOSSES[name] is not cls:
            raise ValueError(f"register_loss: the name {name!r} is taken by {LOSSES[name].__name__}")
        LOSSES[name] = cls
        return cls

    return add(cls) if cls is not None else add
