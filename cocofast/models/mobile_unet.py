"""Mobile U-Net, a student: a MobileNetV2 encoder (Sandler et al. 2018) with a four-step U-Net decoder of
transposed convolutions and inverted residuals (the authors' `MobileNetV2_unet`).

MobileNetV2 is built here (no torchvision dependency) without its ImageNet classifier, which the
segmentation path never uses. Module names follow the authors' code (`backbone.features.N`, `dconvN`,
`invresN`) so tap paths read the same.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import SegmentationNet, SegOutput, scale_channels
from .registry import register_model

# MobileNetV2 stages: (expansion t, output channels c, repeats n, first stride s).
MOBILENET_V2_STAGES = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)
)


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True)
    )


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t=1) -> 3x3 depthwise -> 1x1 linear projection; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = round(cin * expand_ratio)
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2Features(nn.Module):
    """The 19 feature blocks of MobileNetV2 as `features` (stem conv, 17 inverted residuals, 1x1 to 1280)."""

    def __init__(self, in_channels: int, width: float = 1.0):
        super().__init__()
        cin = scale_channels(32, width)
        blocks: list[nn.Module] = [_conv_bn_relu6(in_channels, cin, 3, stride=2)]
        for t, c, n, s in MOBILENET_V2_STAGES:
            cout = scale_channels(c, width)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        self.out_channels = scale_channels(1280, width)
        blocks.append(_conv_bn_relu6(cin, self.out_channels, 1))
        self.features = nn.Sequential(*blocks)


@register_model("mobile_unet")
class MobileUNet(SegmentationNet):
    """Mobile U-Net. Taps: MobileNetV2 `features[0:4]` output (x2) and decoder `invres3` (up3), both 24
    channels at H/4 for width=1. Logits come out at H/2 and are bilinearly upsampled x2, as in the authors'
    code."""

    tap_paths = ("backbone.features.3", "invres3")
    graph_tap_paths = ("backbone.features.2", "backbone.features.3", "dconv3", "invres3")

    def __init__(self, in_channels: int = 3, num_classes: int = 2, width: float = 1.0):
        super().__init__()
        c16, c24, c32, c96 = (scale_channels(c, width) for c in (16, 24, 32, 96))
        self.in_channels, self.num_classes = in_channels, num_classes
        self.tap_channels = (c24, c24)
        self.input_divisor = 32
        self.backbone = MobileNetV2Features(in_channels, width)
        self.dconv1 = nn.ConvTranspose2d(self.backbone.out_channels, c96, 4, stride=2, padding=1)
        self.invres1 = InvertedResidual(2 * c96, c96, 1, 6)
        self.dconv2 = nn.ConvTranspose2d(c96, c32, 4, stride=2, padding=1)
        self.invres2 = InvertedResidual(2 * c32, c32, 1, 6)
        self.dconv3 = nn.ConvTranspose2d(c32, c24, 4, stride=2, padding=1)
        self.invres3 = InvertedResidual(2 * c24, c24, 1, 6)
        self.dconv4 = nn.ConvTranspose2d(c24, c16, 4, stride=2, padding=1)
        self.invres4 = InvertedResidual(2 * c16, c16, 1, 6)
        self.conv_last = nn.Conv2d(c16, 3, 1)
        self.conv_score = nn.Conv2d(3, num_classes, 1)
        for m in self.modules():  # MobileNetV2's He-style init, fan-out over kernel area and outputs
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> SegOutput:
        self.check_input(x)
        features = self.backbone.features
        skips = []
        for start, stop in ((0, 2), (2, 4), (4, 7), (7, 14), (14, 19)):
            for i in range(start, stop):
                x = features[i](x)
            skips.append(x)
        x1, x2, x3, x4, x5 = skips  # H/2 .. H/32
        up1 = self.invres1(torch.cat([x4, self.dconv1(x5)], dim=1))
        up2 = self.invres2(torch.cat([x3, self.dconv2(up1)], dim=1))
        up3 = self.invres3(torch.cat([x2, self.dconv3(up2)], dim=1))
        up4 = self.invres4(torch.cat([x1, self.dconv4(up3)], dim=1))
        logits = self.conv_score(self.conv_last(up4))
        logits = F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=False)
        return SegOutput(logits, x2, up3)
