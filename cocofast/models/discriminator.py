"""The adversarial-distillation critic: a SAGAN-style discriminator (Zhang et al. 2019) with spectral norm.

Four spectrally normalised 4x4 stride-2 convs (64, 128, 256, 512 channels, LeakyReLU 0.1) with self-attention
after the third and the fourth, then a plain 4x4 conv to one channel. The score map is averaged, giving one
Wasserstein score per image.

Its input is the concatenation [class probabilities, image] (the paper), so in_channels = K + image channels;
pass in_channels = K and feed logits or probabilities alone for the authors' code variant.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from .base import scale_channels
from .registry import register_model


class SelfAttention(nn.Module):
    """SAGAN self-attention: out = gamma * softmax(QᵀK) V + x, with gamma starting at 0 (identity).

    Written with explicit bmm + softmax rather than scaled_dot_product_attention because the WGAN gradient
    penalty differentiates the critic twice, and the fused attention kernels have no double backward.
    The N x N attention map is built: at 512x512 inputs it is (H/8·W/8)² = 4096² per image here.
    """

    def __init__(self, channels: int):
        super().__init__()
        inner = max(1, channels // 8)
        self.query_conv = nn.Conv2d(channels, inner, 1)
        self.key_conv = nn.Conv2d(channels, inner, 1)
        self.value_conv = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        query = self.query_conv(x).flatten(2).transpose(1, 2)  # (B, N, C/8)
        key = self.key_conv(x).flatten(2)  # (B, C/8, N)
        attention = torch.bmm(query, key).softmax(dim=-1)  # (B, N, N), rows sum to 1 over keys
        value = self.value_conv(x).flatten(2)  # (B, C, N)
        out = torch.bmm(value, attention.transpose(1, 2)).view(b, c, h, w)
        return self.gamma * out + x


@register_model("discriminator", segmentation=False)
class Discriminator(nn.Module):
    """Critic D([Y, X]) -> (B,) scores. Inputs must be at least 64x64 with sides divisible by 16."""

    input_divisor = 16
    min_size = 64

    def __init__(self, in_channels: int = 5, width: float = 1.0):
        super().__init__()
        c1, c2, c3, c4 = (scale_channels(c, width, multiple=8) for c in (64, 128, 256, 512))
        self.in_channels = in_channels

        def down(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(spectral_norm(nn.Conv2d(cin, cout, 4, 2, 1)), nn.LeakyReLU(0.1))

        # l1..l4, attn1/2 and last are the SAGAN reference's names.
        self.l1 = down(in_channels, c1)
        self.l2 = down(c1, c2)
        self.l3 = down(c2, c3)
        self.attn1 = SelfAttention(c3)
        self.l4 = down(c3, c4)
        self.attn2 = SelfAttention(c4)
        self.last = nn.Sequential(nn.Conv2d(c4, 1, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"Discriminator was built for in_channels={self.in_channels} (probabilities + image, or logits "
                f"alone), got input shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h < self.min_size or w < self.min_size or h % self.input_divisor or w % self.input_divisor:
            raise ValueError(
                f"Discriminator needs height and width >= {self.min_size} and divisible by {self.input_divisor}, "
                f"got {h}x{w}"
            )
        x = self.attn1(self.l3(self.l2(self.l1(x))))
        x = self.attn2(self.l4(x))
        return self.last(x).mean(dim=(1, 2, 3))
