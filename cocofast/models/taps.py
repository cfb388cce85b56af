"""Feature taps by dotted module path, for any nn.Module.

A tap is the output of a submodule, named the way `model.named_modules()` names it ("encoder.layers.0",
"decoder.blocks.2.conv1"). Taps are forward hooks on the underlying module, found through the wrappers that
training adds: DistributedDataParallel / DataParallel (`.module`) and torch.compile (`._orig_mod`). Paths
may be written with or without those wrappers' prefixes.

    with FeatureTaps(model, ["encoder.layer2", "decoder.up3"]) as taps:
        logits = model(x)
        shallow, deep = taps["encoder.layer2"], taps["decoder.up3"]

`TappedModel` turns any segmentation network into one that returns `SegOutput(logits, shallow, deep)`,
the form the built-in networks have, so user models plug into distillation unchanged.

With torch.compile, register taps before the compiled model's first call: hooks added after tracing are
not seen by the compiled graph (TappedModel raises if a tap did not fire).
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .base import SegOutput, logits_of

_WRAPPER_ATTRS = ("module", "_orig_mod")  # DDP/DataParallel, torch.compile's OptimizedModule


class TapNotFoundError(LookupError):
    """A tap path names no submodule of the model."""


def _is_wrapper(model: nn.Module) -> bool:
    """DDP, DataParallel, torch.compile's OptimizedModule, or any module whose only child is `.module` /
    `._orig_mod` (the convention those wrappers follow)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return True
    children = [name for name, _ in model.named_children()]
    return len(children) == 1 and children[0] in _WRAPPER_ATTRS


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside any stack of DDP / DataParallel / torch.compile wrappers."""
    while _is_wrapper(model):
        inner = getattr(model, "_orig_mod", None)
        model = inner if isinstance(inner, nn.Module) else model.module
    return model


def _strip_wrapper_prefixes(path: str) -> str:
    parts = path.split(".")
    while len(parts) > 1 and parts[0] in _WRAPPER_ATTRS:
        parts = parts[1:]
    return ".".join(parts)


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path, looking through wrappers; raises TapNotFoundError naming the path and
    the nearest existing module names."""
    inner = unwrap_model(model)
    names = dict(inner.named_modules())
    for candidate in (path, _strip_wrapper_prefixes(path)):
        if candidate in names and candidate != "":
            return names[candidate]
    available = [n for n in names if n]
    nearest = difflib.get_close_matches(path, available, n=5, cutoff=0.5)
    if not nearest:  # nothing alike: show where the path stops matching
        prefix = path.rsplit(".", 1)[0] if "." in path else ""
        nearest = [n for n in available if prefix and n.startswith(prefix + ".")][:5]
        nearest = nearest or [n for n in available if "." not in n][:8]
    hint = ", ".join(repr(n) for n in nearest) if nearest else "(the model has no submodules)"
    raise TapNotFoundError(
        f"no submodule {path!r} in {type(inner).__name__}; nearest existing names: {hint}. "
        f"Paths are the names from model.named_modules()."
    )


class FeatureTaps:
    """Forward hooks that keep the latest output of each tapped submodule.

    `paths` is a sequence of dotted paths (keys are the paths) or a mapping key -> path. If a module runs
    more than once per forward, the last output wins. Outputs are kept (with their autograd graph) until
    `clear()`, `pop()` or `remove()`; read them, then clear, to avoid holding activations.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str] | Mapping[str, str]):
        mapping = dict(paths) if isinstance(paths, Mapping) else {p: p for p in paths}
        if not mapping:
            raise ValueError("FeatureTaps needs at least one path")
        self.paths = mapping
        self.outputs: dict[str, object] = {}
        self._handles = []
        modules = {key: get_submodule(model, path) for key, path in mapping.items()}  # all resolve or none hook
        for key, module in modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(key)))

    def _make_hook(self, key: str):
        def hook(module, inputs, output):
            self.outputs[key] = output

        return hook

    def __getitem__(self, key: str):
        try:
            return self.outputs[key]
        except KeyError:
            raise KeyError(
                f"tap {key!r} ({self.paths.get(key, '?')}) has no output yet: the module did not run in the last "
                f"forward (or, under torch.compile, the taps were added after the model was traced)"
            ) from None

    def clear(self) -> None:
        self.outputs.clear()

    def pop(self) -> dict[str, object]:
        """The captured outputs, leaving none behind."""
        outputs, self.outputs = self.outputs, {}
        return outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.outputs.clear()

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class TappedModel(nn.Module):
    """Wraps any segmentation network so that forward returns SegOutput(logits, shallow, deep).

    shallow / deep: dotted paths of the submodules whose outputs are the two taps (for CoCo both must have
    the same spatial size). input_divisor: what H and W must be divisible by (checked, with a clear error).
    tap_channels may be given, else it is read from the first forward.
    """

    def __init__(
        self,
        model: nn.Module,
        shallow: str,
        deep: str,
        *,
        input_divisor: int = 1,
        tap_channels: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.model = model
        self.tap_paths = (shallow, deep)
        self.input_divisor = int(input_divisor)
        self._tap_channels = tuple(tap_channels) if tap_channels is not None else None
        self._taps = FeatureTaps(model, {"shallow": shallow, "deep": deep})

    @property
    def known_tap_channels(self) -> tuple[int, int] | None:
        """tap_channels, or None before the first forward pass when they were not given."""
        return self._tap_channels

    @property
    def tap_channels(self) -> tuple[int, int]:
        if self._tap_channels is None:
            raise RuntimeError("tap_channels is known after one forward pass, or pass tap_channels= to TappedModel")
        return self._tap_channels

    def forward(self, x: torch.Tensor, *args, **kwargs) -> SegOutput:
        h, w = x.shape[-2:]
        d = self.input_divisor
        if h % d or w % d:
            name = type(unwrap_model(self.model)).__name__
            raise ValueError(f"{name} needs height and width divisible by {d}, got {h}x{w}")
        self._taps.clear()
        logits = logits_of(self.model(x, *args, **kwargs))
        outputs = self._taps.pop()
        taps = []
        for key, path in zip(("shallow", "deep"), self.tap_paths):
            if key not in outputs:
                raise RuntimeError(
                    f"tap {path!r} did not fire: the module did not run, or the model was compiled before the "
                    f"tap was registered (create TappedModel before calling the compiled model)"
                )
            out = outputs[key]
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"tap {path!r} returned {type(out).__name__}, expected a tensor")
            taps.append(out)
        if self._tap_channels is None:
            self._tap_channels = (taps[0].shape[1], taps[1].shape[1])
        return SegOutput(logits, taps[0], taps[1])
