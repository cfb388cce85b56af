"""cocofast's networks, behind one flat registry.

    model = create_model("mobile_unet", in_channels=3, num_classes=2, width=1.0)
    out = model(x)                       # SegOutput(logits, shallow, deep), taps at H/4
    model.tap_channels, model.input_divisor, model.tap_paths

Segmentation networks: fanet (teacher), mobile_unet, erfnet, enet (students); all take
(in_channels=3, num_classes=2, width=1.0), where width scales every channel count (1.0 is the paper's
network; e.g. 0.125 gives a teacher small enough to train on a CPU). Distillation helpers:
`create_model("paraphraser", in_channels=C, k=k)` and `create_model("discriminator", in_channels=K + C_image)`.

`create_model` records `model_name` and `model_kwargs` on the instance, the two fields a checkpoint needs to
rebuild it: `create_model(model.model_name, **model.model_kwargs).load_state_dict(state_dict)`.
"""
from __future__ import annotations

import difflib

from torch import nn

from .base import SegmentationNet, SegOutput, count_macs, count_parameters, logits_of, scale_channels
# Each network registers itself where it is defined; the import order is the registry's (and the listing's).
from .fanet import FANet
from .mobile_unet import MobileUNet
from .erfnet import ERFNet
from .enet import ENet
from .paraphraser import Paraphraser
from .discriminator import Discriminator
from .registry import MODELS, SEGMENTATION_MODELS, list_models, register_model
from .taps import FeatureTaps, TapNotFoundError, TappedModel, get_submodule, unwrap_model
from .user import NetworkError, ScriptedNetwork, UserNetwork, build_user_network, is_import_path, probe


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a network by registered name or import path ('package.module:factory', cocofast/models/user.py);
    unknown names and arguments are errors that say what exists.

    `taps=[shallow, deep]` and `chain=[...]` (dotted module paths) tap any network, a built-in one too;
    `input_divisor` says what a user network's H and W must be divisible by. All three are cocofast's, not
    the factory's, and are recorded in `model_kwargs` with the rest.
    """
    taps, chain = kwargs.pop("taps", None), kwargs.pop("chain", None)
    divisor = kwargs.pop("input_divisor", None)
    recorded = {**kwargs, **({"taps": list(taps)} if taps else {}), **({"chain": list(chain)} if chain else {}),
                **({"input_divisor": int(divisor)} if divisor else {})}
    if is_import_path(name):
        model = build_user_network(name, kwargs, taps, chain, divisor or 1)
        model.model_name, model.model_kwargs = name, recorded
        return model
    if divisor and name in MODELS:
        raise ValueError(f"create_model({name!r}): input_divisor is for networks given by import path; a built-in "
                         f"network knows its own")
    if name not in MODELS:
        near = difflib.get_close_matches(name, list(MODELS), n=3)
        hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else ""
        raise ValueError(f"unknown model {name!r}{hint}; registered: {', '.join(MODELS)}")
    try:
        model = MODELS[name](**kwargs)
    except TypeError as error:
        if "unexpected keyword argument" in str(error):
            raise TypeError(f"create_model({name!r}): {error}") from None
        raise
    if taps or chain:
        model = UserNetwork(model, taps or model.tap_paths, chain or getattr(model, "graph_tap_paths", None))
    model.model_name = name
    model.model_kwargs = recorded
    return model


__all__ = [
    "NetworkError",
    "ScriptedNetwork",
    "UserNetwork",
    "is_import_path",
    "probe",
    "count_macs",
    "logits_of",
    "create_model",
    "list_models",
    "register_model",
    "SEGMENTATION_MODELS",
    "SegOutput",
    "SegmentationNet",
    "count_parameters",
    "scale_channels",
    "FeatureTaps",
    "TappedModel",
    "TapNotFoundError",
    "get_submodule",
    "unwrap_model",
    "FANet",
    "MobileUNet",
    "ERFNet",
    "ENet",
    "Paraphraser",
    "Discriminator",
]
