"""Users' own networks: an import path instead of a registered name, taps by module path, TorchScript files.

    create_model("my_pkg.unet:UNet", base=16, taps=["down2", "up1"], chain=["down1", "down2", "up1"])
    load_torchscript("teacher.ts")                      # returns logits, or (logits, shallow, deep)
    probe(model, in_channels=3, size=256)               # one dry forward: channels and grid of every tap

`factory` is `package.module:callable` (a class or a function returning an nn.Module); its output may be the
logits, a dict with 'out', or a tuple whose first element is the logits. `taps` names the two submodules
(dotted paths from `named_modules()`) whose outputs are the shallow and deep taps; `chain` the submodules of a
longer chain for Graph Flow. Both are recorded with the other arguments in `model_kwargs`, so
`create_model(model.model_name, **model.model_kwargs)` rebuilds the network in any process that can import
the factory: segment, export and predict read it from the checkpoint.

TorchScript runs a module's forward in C++, where Python forward hooks never fire, so a TorchScript network
cannot be tapped by path: it must return its taps itself.
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .base import SegOutput, logits_of
from .taps import FeatureTaps, TappedModel


class NetworkError(ValueError):
    """A user network that cannot be built, imported, loaded or tapped; the message names it."""


def is_import_path(name: str) -> bool:
    return ":" in name


def import_factory(path: str):
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise NetworkError(f"network {path!r}: an import path is 'package.module:factory', e.g. "
                           f"'my_pkg.unet:UNet'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's module: name it and the real reason
        raise NetworkError(f"network {path!r}: cannot import {module_name!r}: {type(err).__name__}: {err} "
                           f"(is its folder on PYTHONPATH?)") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            public = sorted(n for n in dir(module) if not n.startswith("_"))
            raise NetworkError(f"network {path!r}: module {module_name!r} has no {attr!r}; it defines: "
                               f"{', '.join(public[:20])}")
    if not callable(factory):
        raise NetworkError(f"network {path!r}: {attr!r} is a {type(factory).__name__}, not a class or function")
    return factory


class UserNetwork(TappedModel):
    """A user's network returning SegOutput(logits, shallow, deep); logits alone (taps None) without taps."""

    def __init__(self, model: nn.Module, taps: Sequence[str] | None, chain: Sequence[str] | None,
                 input_divisor: int = 1):
        if taps is not None and len(taps) != 2:
            raise NetworkError(f"taps: expected two module paths (shallow, deep), got {list(taps)}")
        if taps is None:
            nn.Module.__init__(self)
            self.model, self.tap_paths, self.input_divisor, self._tap_channels = model, None, input_divisor, None
            self._taps = None
        else:
            super().__init__(model, *taps, input_divisor=input_divisor)
        if chain is not None:
            if len(chain) < 2:
                raise NetworkError(f"chain: expected at least two module paths, got {list(chain)}")
            FeatureTaps(model, chain).remove()  # every path must exist: fail now, naming the nearest names
        # Paths as FeatureTaps sees them from this wrapper (its one child is `model`).
        self.graph_tap_paths = tuple(f"model.{p}" for p in chain) if chain else ()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> SegOutput:
        if self._taps is None:
            return SegOutput(logits_of(self.model(x, *args, **kwargs)), None, None)
        return super().forward(x, *args, **kwargs)


def build_user_network(factory_path: str, kwargs: dict, taps=None, chain=None, input_divisor: int = 1) -> nn.Module:
    factory = import_factory(factory_path)
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise NetworkError(f"network {factory_path!r}: calling it with {kwargs} failed: {err}") from None
    except Exception as err:  # the user's code raised: name it, the arguments and the real reason
        raise NetworkError(f"network {factory_path!r}: calling it with {kwargs} raised "
                           f"{type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise NetworkError(f"network {factory_path!r}: returned a {type(model).__name__}, not an nn.Module")
    for attr in ("in_channels", "num_classes"):  # what cocofast's tools read, when the factory was told it
        if attr in kwargs and not hasattr(model, attr):
            setattr(model, attr, kwargs[attr])
    network = UserNetwork(model, taps, chain, input_divisor)
    for attr in ("in_channels", "num_classes"):
        if hasattr(model, attr):
            setattr(network, attr, getattr(model, attr))
    return network


class ScriptedNetwork(nn.Module):
    """A TorchScript file as a segmentation network: its output (logits or (logits, shallow, deep)) as SegOutput."""

    def __init__(self, path: str):
        super().__init__()
        self.path = str(path)
        try:
            self.script = torch.jit.load(self.path, map_location="cpu")
        except Exception as err:
            raise NetworkError(f"{path}: not a loadable TorchScript file: {type(err).__name__}: {err}") from None
        self.input_divisor = 1
        self.graph_tap_paths = ()
        self.model_name, self.model_kwargs = "torchscript", {"path": self.path}

    def forward(self, x: torch.Tensor) -> SegOutput:
        out = self.script(x)
        if isinstance(out, (tuple, list)) and len(out) == 3 and all(isinstance(t, torch.Tensor) for t in out):
            return SegOutput(*out)
        return SegOutput(logits_of(out), None, None)


def is_torchscript(path) -> bool:
    """TorchScript archives hold `constants.pkl` (torch.save archives never do)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


class TapShapes(NamedTuple):
    logits: tuple[int, ...]
    shallow: tuple[int, ...] | None
    deep: tuple[int, ...] | None
    logits_dtype: torch.dtype | None = None  # integer logits have no gradient: nothing would train


@torch.no_grad()
def probe(model: nn.Module, in_channels: int, size: int) -> TapShapes:
    """One forward of a (1, in_channels, size, size) batch in eval mode: the shapes of logits and taps.

    Runs on the model's own device (a meta-device model costs no compute). Errors name the network and the
    input it was given.
    """
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        out = model(torch.zeros(1, in_channels, size, size, device=device))
    except Exception as err:
        name = getattr(model, "model_name", type(model).__name__)
        raise NetworkError(f"network {name!r}: a dry forward of a (1, {in_channels}, {size}, {size}) input "
                           f"failed: {type(err).__name__}: {err}") from None
    finally:
        model.train(was_training)
    shape = lambda t: None if t is None else tuple(t.shape)  # noqa: E731
    return TapShapes(shape(out.logits), shape(out.shallow), shape(out.deep), out.logits.dtype)
