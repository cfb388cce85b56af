"""ENet, a student (Paszke et al. 2016), as in the widely used PyTorch reference and the authors' copy of it:
PReLU in the encoder, ReLU in the decoder, max-unpooling with the encoder's indices.

Module names follow the reference (`initial_block`, `downsample1_0`, `regular1_4`, ...), so the tap paths
are the paper code's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import SegmentationNet, SegOutput, scale_channels
from .registry import register_model


def _activation(relu: bool) -> nn.Module:
    return nn.ReLU() if relu else nn.PReLU()


def _conv_bn_act(cin: int, cout: int, kernel, *, relu: bool, stride=1, padding=0, dilation=1) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False)
    return [conv, nn.BatchNorm2d(cout), _activation(relu)]


class InitialBlock(nn.Module):
    """Stride-2 3x3 conv to (cout - cin) channels, concatenated with a 3x3 stride-2 max pool of the input."""

    def __init__(self, cin: int, cout: int, relu: bool):
        super().__init__()
        self.main_branch = nn.Conv2d(cin, cout - cin, 3, stride=2, padding=1, bias=False)
        self.ext_branch = nn.MaxPool2d(3, stride=2, padding=1)
        self.batch_norm = nn.BatchNorm2d(cout)
        self.out_activation = _activation(relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_activation(self.batch_norm(torch.cat([self.main_branch(x), self.ext_branch(x)], dim=1)))


class RegularBottleneck(nn.Module):
    """Residual bottleneck: 1x1 down by 4, a 3x3 (plain, dilated) or 5x1+1x5 (asymmetric) conv, 1x1 up."""

    def __init__(self, channels: int, *, dilation: int = 1, asymmetric: bool = False, dropout: float, relu: bool):
        super().__init__()
        inner = channels // 4
        self.ext_conv1 = nn.Sequential(*_conv_bn_act(channels, inner, 1, relu=relu))
        if asymmetric:
            middle = _conv_bn_act(inner, inner, (5, 1), padding=(2, 0), relu=relu)
            middle += _conv_bn_act(inner, inner, (1, 5), padding=(0, 2), relu=relu)
        else:
            middle = _conv_bn_act(inner, inner, 3, padding=dilation, dilation=dilation, relu=relu)
        self.ext_conv2 = nn.Sequential(*middle)
        self.ext_conv3 = nn.Sequential(*_conv_bn_act(inner, channels, 1, relu=relu))
        self.ext_regul = nn.Dropout2d(dropout)
        self.out_activation = _activation(relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ext = self.ext_regul(self.ext_conv3(self.ext_conv2(self.ext_conv1(x))))
        return self.out_activation(x + ext)


class DownsamplingBottleneck(nn.Module):
    """Halves the resolution: 2x2 max pool (indices kept for the decoder) zero-padded to cout channels,
    plus a 2x2-stride-2 / 3x3 / 1x1 bottleneck branch."""

    def __init__(self, cin: int, cout: int, *, dropout: float, relu: bool):
        super().__init__()
        inner = cin // 4
        self.main_max1 = nn.MaxPool2d(2, stride=2, return_indices=True)
        self.ext_conv1 = nn.Sequential(*_conv_bn_act(cin, inner, 2, stride=2, relu=relu))
        self.ext_conv2 = nn.Sequential(*_conv_bn_act(inner, inner, 3, padding=1, relu=relu))
        self.ext_conv3 = nn.Sequential(*_conv_bn_act(inner, cout, 1, relu=relu))
        self.ext_regul = nn.Dropout2d(dropout)
        self.out_activation = _activation(relu)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        main, indices = self.main_max1(x)
        ext = self.ext_regul(self.ext_conv3(self.ext_conv2(self.ext_conv1(x))))
        main = F.pad(main, (0, 0, 0, 0, 0, ext.shape[1] - main.shape[1]))  # zero channels up to cout
        return self.out_activation(main + ext), indices


class UpsamplingBottleneck(nn.Module):
    """Doubles the resolution: 1x1 conv + max-unpool with the encoder's indices, plus a 1x1 / 2x2 transposed
    conv / 1x1 bottleneck branch."""

    def __init__(self, cin: int, cout: int, *, dropout: float, relu: bool):
        super().__init__()
        inner = cin // 4
        self.main_conv1 = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.main_unpool1 = nn.MaxUnpool2d(2)
        self.ext_conv1 = nn.Sequential(*_conv_bn_act(cin, inner, 1, relu=relu))
        self.ext_tconv1 = nn.ConvTranspose2d(inner, inner, 2, stride=2, bias=False)
        self.ext_tconv1_bnorm = nn.BatchNorm2d(inner)
        self.ext_tconv1_activation = _activation(relu)
        self.ext_conv2 = nn.Sequential(nn.Conv2d(inner, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.ext_regul = nn.Dropout2d(dropout)
        self.out_activation = _activation(relu)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, output_size) -> torch.Tensor:
        main = self.main_unpool1(self.main_conv1(x), indices, output_size=output_size)
        ext = self.ext_tconv1(self.ext_conv1(x), output_size=output_size)
        ext = self.ext_regul(self.ext_conv2(self.ext_tconv1_activation(self.ext_tconv1_bnorm(ext))))
        return self.out_activation(main + ext)


@register_model("enet")
class ENet(SegmentationNet):
    """ENet. Taps: `regular1_4` (end of stage 1) and `regular4_2` (end of decoder stage 4), both 64 channels
    at H/4 for width=1."""

    tap_paths = ("regular1_4", "regular4_2")
    graph_tap_paths = ("regular1_1", "regular1_4", "upsample4_0", "regular4_2")

    def __init__(self, in_channels: int = 3, num_classes: int = 2, width: float = 1.0):
        super().__init__()
        c16, c64, c128 = (scale_channels(c, width) for c in (16, 64, 128))
        if in_channels >= c16:
            raise ValueError(
                f"ENet's initial block concatenates a max pool of the input, so in_channels must be below "
                f"its {c16} output channels (16*width); got in_channels={in_channels}, width={width}"
            )
        self.in_channels, self.num_classes = in_channels, num_classes
        self.tap_channels = (c64, c64)
        self.input_divisor = 8
        enc = dict(relu=False)  # PReLU in the encoder, ReLU in the decoder
        dec = dict(relu=True)
        self.initial_block = InitialBlock(in_channels, c16, **enc)
        self.downsample1_0 = DownsamplingBottleneck(c16, c64, dropout=0.01, **enc)
        self.regular1_1 = RegularBottleneck(c64, dropout=0.01, **enc)
        self.regular1_2 = RegularBottleneck(c64, dropout=0.01, **enc)
        self.regular1_3 = RegularBottleneck(c64, dropout=0.01, **enc)
        self.regular1_4 = RegularBottleneck(c64, dropout=0.01, **enc)
        self.downsample2_0 = DownsamplingBottleneck(c64, c128, dropout=0.1, **enc)
        # Stages 2 and 3 share one pattern; stage 2 names its blocks 2_1..2_8, stage 3 names them 3_0..3_7.
        pattern = (("regular", {}), ("dilated", dict(dilation=2)), ("asymmetric", dict(asymmetric=True)),
                   ("dilated", dict(dilation=4)), ("regular", {}), ("dilated", dict(dilation=8)),
                   ("asymmetric", dict(asymmetric=True)), ("dilated", dict(dilation=16)))
        self.bottleneck_names: list[str] = []
        for stage, first in ((2, 1), (3, 0)):
            for i, (kind, kwargs) in enumerate(pattern):
                name = f"{kind}{stage}_{first + i}"
                setattr(self, name, RegularBottleneck(c128, dropout=0.1, **kwargs, **enc))
                self.bottleneck_names.append(name)
        self.upsample4_0 = UpsamplingBottleneck(c128, c64, dropout=0.1, **dec)
        self.regular4_1 = RegularBottleneck(c64, dropout=0.1, **dec)
        self.regular4_2 = RegularBottleneck(c64, dropout=0.1, **dec)
        self.upsample5_0 = UpsamplingBottleneck(c64, c16, dropout=0.1, **dec)
        self.regular5_1 = RegularBottleneck(c16, dropout=0.1, **dec)
        self.transposed_conv = nn.ConvTranspose2d(c16, num_classes, 3, stride=2, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> SegOutput:
        self.check_input(x)
        input_size = x.shape[-2:]
        x = self.initial_block(x)
        stage1_size = x.shape[-2:]
        x, indices1 = self.downsample1_0(x)
        shallow = self.regular1_4(self.regular1_3(self.regular1_2(self.regular1_1(x))))
        stage2_size = shallow.shape[-2:]
        x, indices2 = self.downsample2_0(shallow)
        for name in self.bottleneck_names:
            x = getattr(self, name)(x)
        x = self.upsample4_0(x, indices2, output_size=stage2_size)
        deep = self.regular4_2(self.regular4_1(x))
        x = self.regular5_1(self.upsample5_0(deep, indices1, output_size=stage1_size))
        return SegOutput(self.transposed_conv(x, output_size=input_size), shallow, deep)
