"""FANet, the teacher: a 3-pool U-Net whose convolutions are selective-kernel blocks, with strip pooling
in the decoder (Li et al., "fully attention-based networks", JBHI 2020; `UnetSKA2` in the authors' code).

Module names follow the authors' code so that tap paths read the same and their checkpoints map onto ours.
Two things of theirs are left out because no output depends on them: a second, discarded Dropout+1x1 head
(`conv11`, 64·K+K parameters) and one unused `gamma` scalar per strip-pooling block. Parameters that never
receive a gradient break DistributedDataParallel unless find_unused_parameters=True.

Training needs at least 2 images per batch (per GPU): the selective-kernel blocks batch-normalise a globally
pooled 1x1 map, which has a single value per channel when B = 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import SegmentationNet, SegOutput, scale_channels
from .registry import register_model


def _conv_bn(cin: int, cout: int, kernel, padding, *, bias: bool = False, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=padding, bias=bias), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SKConv(nn.Module):
    """Selective kernel: a 5x5 and a 3x3 branch, mixed per channel by a softmax over the two branches."""

    def __init__(self, channels: int, reduction: int = 2):
        super().__init__()
        squeezed = max(1, channels // reduction)
        self.conv1 = _conv_bn(channels, channels, 5, 2, bias=True)  # 5x5 branch
        self.conv2 = _conv_bn(channels, channels, 3, 1, bias=True)  # 3x3 branch
        self.conv_se = _conv_bn(channels, squeezed, 1, 0, bias=True)
        self.conv_ex1 = nn.Sequential(nn.Conv2d(squeezed, channels, 1))
        self.conv_ex2 = nn.Sequential(nn.Conv2d(squeezed, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = torch.stack([self.conv1(x), self.conv2(x)], dim=1)  # (B, 2, C, H, W)
        summary = self.conv_se(branches.sum(dim=1).mean(dim=(2, 3), keepdim=True))
        weights = torch.stack([self.conv_ex1(summary), self.conv_ex2(summary)], dim=1).softmax(dim=1)
        return (branches * weights).sum(dim=1)


class SKBlock(nn.Module):
    """Bottleneck residual block: 1x1 -> SK conv -> 1x1, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 1, 0)
        self.conv2 = nn.Sequential(SKConv(cout), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.conv3 = _conv_bn(cout, cout, 1, 0, relu=False)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + shortcut)


class DoubleConv(nn.Module):
    """FANet's stand-in for the U-Net double 3x3 conv: two SK blocks, the first projecting cin -> cout."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        projection = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.conv = nn.Sequential(SKBlock(cin, cout, downsample=projection), SKBlock(cout, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class StripPooling(nn.Module):
    """Strip pooling (Hou et al. 2020): context from two square adaptive pools and from 1xW / Hx1 strips.

    `mixed=True` is the authors' second variant (after the last decoder stage): the square-pool branches
    are half-width and concatenated instead of summed, and the strip branch gates the input multiplicatively.
    """

    def __init__(self, channels: int, pool_sizes: tuple[int, int], *, mixed: bool = False):
        super().__init__()
        c, half = channels, max(1, channels // 2)
        self.mixed = mixed
        self.pool_sizes = pool_sizes
        self.conv1_1 = _conv_bn(c, c, 1, 0)
        self.conv1_2 = _conv_bn(c, c, 1, 0)
        self.conv2_0 = _conv_bn(c, c, 3, 1, relu=False)
        self.conv2_1 = _conv_bn(c, half if mixed else c, 3, 1, relu=False)
        self.conv2_2 = _conv_bn(c, half if mixed else c, 3, 1, relu=False)
        self.conv2_3 = _conv_bn(c, c, (1, 3), (0, 1), relu=False)
        self.conv2_4 = _conv_bn(c, c, (3, 1), (1, 0), relu=False)
        self.conv2_5 = _conv_bn(c + 2 * half if mixed else c, c, 3, 1)
        self.conv2_6 = _conv_bn(c, c, 3, 1)
        self.conv3 = _conv_bn(2 * c, c, 1, 0, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        a, b = self.conv1_1(x), self.conv1_2(x)
        local = self.conv2_0(a)
        pooled1 = F.interpolate(self.conv2_1(F.adaptive_avg_pool2d(a, self.pool_sizes[0])), size)
        pooled2 = F.interpolate(self.conv2_2(F.adaptive_avg_pool2d(a, self.pool_sizes[1])), size)
        rows = F.interpolate(self.conv2_3(F.adaptive_avg_pool2d(b, (1, size[1]))), size)
        cols = F.interpolate(self.conv2_4(F.adaptive_avg_pool2d(b, (size[0], 1))), size)
        if self.mixed:
            square = self.conv2_5(F.relu(torch.cat([local, pooled1, pooled2], dim=1)))
            strip = x * self.conv2_6(F.relu(rows + cols))
        else:
            square = self.conv2_5(F.relu(local + pooled1 + pooled2))
            strip = self.conv2_6(F.relu(rows + cols))
        return F.relu(x + self.conv3(torch.cat([square, strip], dim=1)))


@register_model("fanet")
class FANet(SegmentationNet):
    """The teacher. Taps: encoder level-3 output `conv3` (c3) and the first decoder up-conv `up7` (up_7),
    both 256 channels at H/4 for width=1."""

    tap_paths = ("conv3", "up7")
    graph_tap_paths = ("conv3.conv.0", "conv3", "up7", "pam1")

    def __init__(self, in_channels: int = 3, num_classes: int = 2, width: float = 1.0):
        super().__init__()
        c1, c2, c3, c4 = (scale_channels(c, width) for c in (64, 128, 256, 512))
        self.in_channels, self.num_classes = in_channels, num_classes
        self.tap_channels = (c3, c3)
        self.input_divisor = 8
        self.conv1 = DoubleConv(in_channels, c1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = DoubleConv(c1, c2)
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = DoubleConv(c2, c3)
        self.pool3 = nn.MaxPool2d(2)
        self.conv4 = DoubleConv(c3, c4)
        self.up7 = nn.ConvTranspose2d(c4, c3, 2, stride=2)
        self.conv7 = DoubleConv(2 * c3, c3)
        self.up8 = nn.ConvTranspose2d(c3, c2, 2, stride=2)
        self.conv8 = DoubleConv(2 * c2, c2)
        self.up9 = nn.ConvTranspose2d(c2, c1, 2, stride=2)
        self.conv9 = DoubleConv(2 * c1, c1)
        self.pam1 = StripPooling(c3, (3, 6))
        self.pam2 = StripPooling(c2, (12, 18))
        self.pam3 = StripPooling(c1, (3, 6), mixed=True)
        self.conv10 = nn.Sequential(nn.Dropout2d(0.5), nn.Conv2d(c1, num_classes, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # the authors' Xavier init; transposed convs keep torch's default
                nn.init.xavier_uniform_(m.weight)

    def forward(self, x: torch.Tensor) -> SegOutput:
        self.check_input(x)
        c1 = self.conv1(x)
        c2 = self.conv2(self.pool1(c1))
        c3 = self.conv3(self.pool2(c2))
        c4 = self.conv4(self.pool3(c3))
        up_7 = self.up7(c4)
        c7 = self.pam1(self.conv7(torch.cat([up_7, c3], dim=1)))
        c8 = self.pam2(self.conv8(torch.cat([self.up8(c7), c2], dim=1)))
        c9 = self.pam3(self.conv9(torch.cat([self.up9(c8), c1], dim=1)))
        return SegOutput(self.conv10(c9), c3, up_7)
