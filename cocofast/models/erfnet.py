"""ERFNet, a student (Romera et al. 2017): factorised 3x1/1x3 residual blocks with dilations, as in the
reference implementation and the authors' copy of it.

Module names follow the reference (`encoder.layers.N`, `decoder.layers.N`). Left out: the encoder's
1x1 `output_conv` (128·K+K parameters), which only the reference's encoder-pretraining mode uses; a
parameter without gradient breaks DistributedDataParallel unless find_unused_parameters=True.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import SegmentationNet, SegOutput, scale_channels
from .registry import register_model


class DownsamplerBlock(nn.Module):
    """Stride-2 3x3 conv to (cout - cin) channels, concatenated with a 2x2 max pool of the input."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        if cout <= cin:
            raise ValueError(f"ERFNet downsampler needs more output than input channels, got {cin} -> {cout}")
        self.conv = nn.Conv2d(cin, cout - cin, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(torch.cat([self.conv(x), self.pool(x)], dim=1)))


class NonBottleneck1d(nn.Module):
    """Residual block of two factorised 3x3 convs (3x1 then 1x3); the second pair is dilated."""

    def __init__(self, channels: int, dropout: float, dilation: int):
        super().__init__()
        c, d = channels, dilation
        self.conv3x1_1 = nn.Conv2d(c, c, (3, 1), padding=(1, 0))
        self.conv1x3_1 = nn.Conv2d(c, c, (1, 3), padding=(0, 1))
        self.bn1 = nn.BatchNorm2d(c, eps=1e-3)
        self.conv3x1_2 = nn.Conv2d(c, c, (3, 1), padding=(d, 0), dilation=(d, 1))
        self.conv1x3_2 = nn.Conv2d(c, c, (1, 3), padding=(0, d), dilation=(1, d))
        self.bn2 = nn.BatchNorm2d(c, eps=1e-3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1x3_1(F.relu(self.conv3x1_1(x)))))
        out = self.bn2(self.conv1x3_2(F.relu(self.conv3x1_2(out))))
        return F.relu(self.dropout(out) + x)


class UpsamplerBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class ERFEncoder(nn.Module):
    def __init__(self, in_channels: int, c16: int, c64: int, c128: int):
        super().__init__()
        self.initial_block = DownsamplerBlock(in_channels, c16)
        # Dropout 0.1 throughout, as in the authors' copy (the original ERFNet uses 0.03 at the 64-channel stage).
        layers: list[nn.Module] = [DownsamplerBlock(c16, c64)]
        layers += [NonBottleneck1d(c64, 0.1, 1) for _ in range(5)]
        layers.append(DownsamplerBlock(c64, c128))
        for _ in range(2):
            layers += [NonBottleneck1d(c128, 0.1, d) for d in (2, 4, 8, 16)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.initial_block(x)
        shallow = None
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 0:
                shallow = x
        return shallow, x


class ERFDecoder(nn.Module):
    def __init__(self, num_classes: int, c16: int, c64: int, c128: int):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                UpsamplerBlock(c128, c64),
                NonBottleneck1d(c64, 0.0, 1),
                NonBottleneck1d(c64, 0.0, 1),
                UpsamplerBlock(c64, c16),
                NonBottleneck1d(c16, 0.0, 1),
                NonBottleneck1d(c16, 0.0, 1),
            ]
        )
        self.output_conv = nn.ConvTranspose2d(c16, num_classes, 2, stride=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        deep = None
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 2:
                deep = x
        return deep, self.output_conv(x)


@register_model("erfnet")
class ERFNet(SegmentationNet):
    """ERFNet. Taps: encoder layer 0 (the 16->64 downsampler) and decoder layer 2 (the second 64-channel
    residual block), both 64 channels at H/4 for width=1."""

    tap_paths = ("encoder.layers.0", "decoder.layers.2")
    graph_tap_paths = ("encoder.layers.0", "encoder.layers.5", "decoder.layers.0", "decoder.layers.2")

    def __init__(self, in_channels: int = 3, num_classes: int = 2, width: float = 1.0):
        super().__init__()
        c16, c64, c128 = (scale_channels(c, width) for c in (16, 64, 128))
        if in_channels >= c16:
            raise ValueError(
                f"ERFNet's initial block concatenates a max pool of the input, so in_channels must be below "
                f"its {c16} output channels (16*width); got in_channels={in_channels}, width={width}"
            )
        self.in_channels, self.num_classes = in_channels, num_classes
        self.tap_channels = (c64, c64)
        self.input_divisor = 8
        self.encoder = ERFEncoder(in_channels, c16, c64, c128)
        self.decoder = ERFDecoder(num_classes, c16, c64, c128)

    def forward(self, x: torch.Tensor) -> SegOutput:
        self.check_input(x)
        shallow, encoded = self.encoder(x)
        deep, logits = self.decoder(encoded)
        return SegOutput(logits, shallow, deep)
