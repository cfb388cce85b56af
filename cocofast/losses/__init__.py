"""Distillation losses behind one flat registry, all with one call signature.

    loss = get_loss("kd", temperature=2.0)              # or get_loss("ifvd", weight=100)
    value = loss([s_logits], [t_logits])                # scalar fp32, weight applied
    loss.reads                                          # Reads('logits', teacher='raw', labels=False)

Each loss takes two sequences of tensors, the student's and the teacher's, in the order its `reads` declares
(see cocofast/losses/base.py), and labels (B, H, W) where it reads them. Every loss computes in fp32 with
autocast off and treats the teacher as a constant. Default weights are the papers' (listed below).

    kd            Hinton logit KD per pixel, T = 4                                   logits
    at            attention transfer on both taps, weight 1000                       shallow, deep (raw)
    fsp           FSP matrices of (shallow, deep), weight 1                          shallow, deep (paraphrased)
    skd_pairwise  SKD pairwise similarity ("SS"), max-pooled deep tap, weight 0.5     deep (paraphrased)
    skd_pixel     SKD pixel-wise KD, T = 1, weight 10                                logits
    cmss          channel-mixed pairwise similarity (CMSS), as skd_pairwise otherwise deep (paraphrased)
    ifvd          IFVD class-prototype cosine maps on the deep tap, weight 200        logits, deep (raw), labels
    coco          CoCo cross-layer correlation loss, weight 1 (λ)                     shallow, deep (paraphrased)
    emkd          EMKD: pixel KD (T = 4), importance maps (F⁴), region affinity       logits, taps (raw), labels
    graph_flow    Graph Flow: CMSS vertices and φ edges over a chain of taps          chain (raw)
    cpkd          CPKD: C×C channel correlations + pixel-relation KL                  deep (paraphrased)

`--losses` text (the training config's key) names losses with optional weights and hyper-parameters:
`parse_losses("kd:1:T=2,coco,cpkd:tau=0.5")`. Adding a loss: one module with a DistillLoss subclass decorated
`@register_loss("name")` (cocofast/losses/registry.py); a built-in one is also imported below, a user's is
named by the training config's `loss_modules`.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field

import yaml

from cocofast.losses.at import ATLoss
from cocofast.losses.base import FEATURES, IGNORE_INDEX, DistillLoss, LossOutputError, Reads
from cocofast.losses.cmss import CMSSLoss
from cocofast.losses.coco import CoCoLoss
from cocofast.losses.cpkd import CPKDLoss
from cocofast.losses.emkd import EMKDLoss
from cocofast.losses.fsp import FSPLoss
from cocofast.losses.graph_flow import GraphFlowLoss
from cocofast.losses.ifvd import IFVDLoss
from cocofast.losses.kd import KDLoss
from cocofast.losses.registry import LOSSES, register_loss
from cocofast.losses.skd_pairwise import SKDPairwiseLoss
from cocofast.losses.skd_pixel import SKDPixelLoss


def list_losses() -> list[str]:
    return sorted(LOSSES)


def loss_parameters(name: str) -> list[str]:
    """The hyper-parameters the loss registered as `name` accepts (its constructor's arguments)."""
    return [p for p in inspect.signature(LOSSES[name]).parameters if p != "self"]


def resolve_aliases(name: str, kwargs: dict) -> dict:
    """Short names (e.g. T) replaced by the constructor's (temperature); a parameter given twice is an error."""
    aliases = LOSSES[name].aliases
    resolved: dict = {}
    for key, value in kwargs.items():
        full = aliases.get(key, key)
        if full in resolved:
            raise ValueError(f"loss {name!r} got {full!r} twice (as {key!r} and as its other name); give it once")
        resolved[full] = value
    return resolved


def get_loss(name: str, **kwargs) -> DistillLoss:
    """Build the loss registered as `name` with its hyper-parameters (unknown names or keys are errors)."""
    if name not in LOSSES:
        near = difflib.get_close_matches(name, list_losses(), n=2)
        raise ValueError(f"unknown distillation loss {name!r}" + (f" (did you mean {', '.join(near)}?)" if near
                                                                   else "")
                         + f"; known losses: {', '.join(list_losses())}")
    cls = LOSSES[name]
    kwargs = resolve_aliases(name, kwargs)
    accepted = loss_parameters(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        short = "".join(f", {a} (= {full})" for a, full in cls.aliases.items())
        raise ValueError(f"loss {name!r} got unknown hyper-parameter(s) {', '.join(unknown)}; "
                         f"it accepts: {', '.join(accepted)}{short}")
    return cls(**kwargs)


@dataclass(frozen=True)
class LossSpec:
    """One entry of a `--losses` text: the registered name, its weight (None: default) and hyper-parameters."""
    name: str
    weight: float | None = None
    params: dict = field(default_factory=dict)

    def build(self, **defaults) -> DistillLoss:
        """The loss, with `defaults` (e.g. a backend) for any constructor argument the spec does not set."""
        accepted = loss_parameters(self.name)
        kwargs = {k: v for k, v in defaults.items() if k in accepted}
        kwargs.update(resolve_aliases(self.name, self.params))
        if self.weight is not None:
            kwargs["weight"] = self.weight
        return get_loss(self.name, **kwargs)


def parse_losses(text: str) -> list[LossSpec]:
    """'name[:weight][:key=value]...' items, comma-separated, e.g. 'kd:1:T=2,coco'; '' or 'none' is no loss.

    Values are read as YAML scalars (2 -> int, 0.5 -> float, true -> bool, tiled -> str), and any word Python's
    float reads (1e1, 5e-1) as a float. Every name and key is checked against the registry here, and every value
    by the loss's constructor, so a typo, a key given twice or a value of the wrong type fails before any
    training, naming the loss.
    """
    text = text.strip()
    if text.lower() in ("", "none"):
        return []
    specs: list[LossSpec] = []
    for item in text.split(","):
        name, *parts = [p.strip() for p in item.split(":")]
        if name not in LOSSES:
            get_loss(name)  # raises, naming the near matches
        if any(name == seen.name for seen in specs):
            raise ValueError(f"{name!r} is listed twice in {text!r}")
        weight, params = None, {}
        for part in parts:
            key, eq, value = part.partition("=")
            if eq:
                key = key.strip()
                if key in params:
                    raise ValueError(f"{name}: {key!r} is given twice in {item.strip()!r}; give it once")
                params[key] = hyper_parameter(name, key, value.strip())
            elif weight is None:
                try:
                    weight = float(part)
                except ValueError:
                    raise ValueError(f"weight of {name!r} must be a number, got {part!r} (write "
                                     f"'name:weight:key=value', e.g. 'kd:0.5:T=2')") from None
            else:
                raise ValueError(f"{name!r} has two weights in {item.strip()!r}; hyper-parameters are key=value")
        spec = LossSpec(name, weight, params)
        try:
            spec.build()  # unknown keys and bad values fail now, naming the loss
        except ValueError:
            raise
        except Exception as err:  # a constructor's TypeError on a list or a word (a user's loss, too)
            shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise ValueError(f"{name}: cannot build it with {shown or 'its defaults'} "
                             f"({type(err).__name__}: {err})") from None
        specs.append(spec)
    return specs


def hyper_parameter(loss: str, key: str, text: str):
    """One `key=value` value: a YAML scalar (2 -> int, true -> bool, tiled -> str), and any text Python's
    float reads as a float (YAML 1.1 reads 1e1 and 1e-3, without a dot, as strings), as the config keys do."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ValueError(f"{loss}: value of {key!r} is not a number, true/false or a word: {text!r}") from None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


__all__ = ["ATLoss", "CMSSLoss", "CoCoLoss", "CPKDLoss", "DistillLoss", "EMKDLoss", "FEATURES", "FSPLoss",
           "GraphFlowLoss", "IFVDLoss", "IGNORE_INDEX", "KDLoss", "LOSSES", "LossOutputError", "LossSpec", "Reads",
           "SKDPairwiseLoss", "SKDPixelLoss", "get_loss", "list_losses", "loss_parameters", "parse_losses",
           "register_loss"]
