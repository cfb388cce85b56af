"""The Paraphraser (Kim et al. 2018, "Paraphrasing Complex Network"), as the CoCo DistillNet authors build it.

An auto-encoder over one teacher feature map: the encoder (3x3 convs C->C, C->k, k->k) compresses the map
to k channels, the decoder (3x3 transposed convs k->k, k->C, C->C) rebuilds it. It is trained first, on
the frozen teacher, to reconstruct (`forward`); distillation then uses only `encode`. All layers keep the
spatial size (stride 1, padding 1), carry a bias and are followed by LeakyReLU(0.1); there is no BatchNorm.
k is the student's channel count at the matching tap.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


@register_model("paraphraser", segmentation=False)
class Paraphraser(nn.Module):
    negative_slope = 0.1

    def __init__(self, in_channels: int, k: int):
        super().__init__()
        if in_channels < 1 or k < 1:
            raise ValueError(f"Paraphraser needs in_channels >= 1 and k >= 1, got in_channels={in_channels}, k={k}")
        self.in_channels, self.k = in_channels, k
        # Names follow the authors' code (conv0..2, deconv0..2) so their checkpoints map onto ours.
        self.conv0 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv1 = nn.Conv2d(in_channels, k, 3, padding=1)
        self.conv2 = nn.Conv2d(k, k, 3, padding=1)
        self.deconv0 = nn.ConvTranspose2d(k, k, 3, padding=1)
        self.deconv1 = nn.ConvTranspose2d(k, in_channels, 3, padding=1)
        self.deconv2 = nn.ConvTranspose2d(in_channels, in_channels, 3, padding=1)
        # He initialisation for LeakyReLU keeps the signal's scale through the six un-normalised layers; torch's
        # default shrinks it some 50× by the output, and on a zero-mean tap (FANet's up_7) SGD then stalls at
        # the trivial all-zero reconstruction. A transposed conv's weight is (in, out, kh, kw), so its true
        # fan-in is what torch calls fan_out.
        for layer in (self.conv0, self.conv1, self.conv2, self.deconv0, self.deconv1, self.deconv2):
            mode = "fan_out" if isinstance(layer, nn.ConvTranspose2d) else "fan_in"
            nn.init.kaiming_normal_(layer.weight, a=self.negative_slope, mode=mode, nonlinearity="leaky_relu")
            nn.init.zeros_(layer.bias)
        # The last layer starts at zero, so the reconstruction starts at the all-zero output (error = the tap's
        # mean square) and only falls from there. Left at He scale it adds a random map as large as the tap,
        # doubling the starting error, and the first steps on it were steep enough to diverge.
        nn.init.zeros_(self.deconv2.weight)

    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(
                f"Paraphraser.{what} expects (B, {channels}, H, W), got shape {tuple(x.shape)} "
                f"(built with in_channels={self.in_channels}, k={self.k})"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher feature (B, C, h, w) -> factor (B, k, h, w), the map distillation uses."""
        self._check(x, self.in_channels, "encode")
        for conv in (self.conv0, self.conv1, self.conv2):
            x = F.leaky_relu(conv(x), self.negative_slope)
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Factor (B, k, h, w) -> reconstruction (B, C, h, w)."""
        self._check(z, self.k, "decode")
        for deconv in (self.deconv0, self.deconv1, self.deconv2):
            z = F.leaky_relu(deconv(z), self.negative_slope)
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of x, for the paraphraser's own training (L_rec = mean ||x - P(x)||^2)."""
        return self.decode(self.encode(x))
