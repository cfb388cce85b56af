"""A user's own network for tests/test_own_networks.py: a plain three-level U-Net that returns logits only."""
import torch
from torch import nn
import torch.nn.functional as F


def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """A plain three-level U-Net returning logits only."""

    def __init__(self, in_channels=3, num_classes=2, base=8):
        super().__init__()
        self.inc = block(in_channels, base)
        self.down1 = block(base, 2 * base)
        self.down2 = block(2 * base, 4 * base)
        self.bottom = block(4 * base, 4 * base)
        self.up1 = block(8 * base, 4 * base)
        self.up2 = block(6 * base, 2 * base)
        self.up3 = block(3 * base, base)
        self.head = nn.Conv2d(base, num_classes, 1)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(F.max_pool2d(x1, 2))
        x3 = self.down2(F.max_pool2d(x2, 2))
        x4 = self.bottom(F.max_pool2d(x3, 2))
        y = self.up1(torch.cat([F.interpolate(x4, scale_factor=2.0), x3], 1))
        y = self.up2(torch.cat([F.interpolate(y, scale_factor=2.0), x2], 1))
        y = self.up3(torch.cat([F.interpolate(y, scale_factor=2.0), x1], 1))
        return self.head(y)


class UNetWithTaps(UNet):
    """The same network returning (logits, shallow, deep) itself: how a TorchScript teacher hands over taps
    (TorchScript runs forward in C++, where no Python hook can catch a submodule's output)."""

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(F.max_pool2d(x1, 2))
        x3 = self.down2(F.max_pool2d(x2, 2))
        x4 = self.bottom(F.max_pool2d(x3, 2))
        y1 = self.up1(torch.cat([F.interpolate(x4, scale_factor=2.0), x3], 1))
        y = self.up2(torch.cat([F.interpolate(y1, scale_factor=2.0), x2], 1))
        y = self.up3(torch.cat([F.interpolate(y, scale_factor=2.0), x1], 1))
        return self.head(y), x3, y1
