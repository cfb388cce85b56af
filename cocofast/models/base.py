"""What every cocofast segmentation network shares: its output tuple, its tap declaration, its input checks."""
from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, NamedTuple

import torch
from torch import nn


class SegOutput(NamedTuple):
    """What a segmentation network hands to distillation.

    logits:  (B, K, H, W) at input resolution.
    shallow: (B, C_shallow, H/4, W/4), the early tap.
    deep:    (B, C_deep, H/4, W/4), the late tap (both taps share h·w so φ can pair them).
    """

    logits: torch.Tensor
    shallow: torch.Tensor
    deep: torch.Tensor


def scale_channels(channels: int, width: float, multiple: int = 4) -> int:
    """Channel count `channels * width`, rounded to a multiple of `multiple` and never below it.

    The paper's counts are all multiples of 4, so width=1.0 returns them unchanged; the floor keeps thin
    demo networks valid (SK reduction by 2, ENet's bottleneck ratio 4, attention's C/8).
    """
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    scaled = int(channels * width / multiple + 0.5) * multiple
    return max(multiple, scaled)


class SegmentationNet(nn.Module):
    """Base class for the built-in networks.

    Subclasses set `tap_paths` (dotted module paths whose outputs are the shallow and deep taps; the same
    strings work with `cocofast.models.taps.FeatureTaps`), and in __init__ set `in_channels`, `num_classes`,
    `tap_channels` and `input_divisor`. Their forward calls `self.check_input(x)` first and returns SegOutput.
    """

    tap_paths: ClassVar[tuple[str, str]]
    # Graph Flow's chain of taps, shallow to deep; built-in nets keep all at H/4 so their graphs never pool.
    graph_tap_paths: ClassVar[tuple[str, ...]]
    input_divisor: int
    in_channels: int
    num_classes: int
    tap_channels: tuple[int, int]

    def check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if x.dim() != 4:
            raise ValueError(f"{name} expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{name} was built for {self.in_channels} input channels, got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        height, width = x.shape[-2], x.shape[-1]
        d = self.input_divisor
        if height % d or width % d:
            raise ValueError(
                f"{name} needs height and width divisible by {d}, got {height}x{width}; "
                f"pad or resize the input to a multiple of {d}"
            )


def count_parameters(model: nn.Module, *, include_batchnorm: bool = True) -> int:
    """Number of parameter elements; with include_batchnorm=False the BatchNorm affine terms are left out,
    as the papers' tables count them."""
    skip: set[int] = set()
    if not include_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                skip.update(id(p) for p in module.parameters(recurse=False))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of one forward pass in eval mode, from torch's FlopCounterMode (2 FLOPs per multiply-add).

    It counts matmuls and convolutions only (no BN or activations), so it sits a little under ptflops-style
    figures. `x` may live on the meta device (with a model built there): shapes only, no compute.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def logits_of(output) -> torch.Tensor:
    """The logits in a segmentation network's output: a tensor, a SegOutput, a dict with 'out' (torchvision),
    or a tuple whose first element is the logits."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, SegOutput):
        return output.logits
    if isinstance(output, Mapping) and isinstance(output.get("out"), torch.Tensor):
        return output["out"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}: expected a tensor, a dict with "
        f"'out', or a tuple whose first element is the logits"
    )
