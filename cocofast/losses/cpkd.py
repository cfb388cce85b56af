"""CPKD (Xiong & Yu 2024): channel-wise and pixel-wise relation distillation on the deep tap.

Only the paper's abstract is public, so this is our reading of it. For one network's deep tap F (B, C, h, w),
N = h·w:

    channel relations   F̂_c = (F_c − mean F_c) / ‖F_c − mean F_c‖   (each channel's N pixels; mean over them)
                        G = F̂ F̂ᵀ  (B, C, C): the Pearson correlation of every pair of channels, in [−1, 1]
    pixel relations     P = row-softmax(Â Âᵀ / τ)  (B, N, N), Â the L2-normalised pixel vectors
                        (`cocofast.ops.pixel_relation.pixel_relation_kl`)

    loss = channel_weight · mean_{b,i,j} (G_S − G_T)²_{bij} + pixel_weight · mean_{b,i} KL(P_T[b, i] ‖ P_S[b, i])

G is C×C, so the channel term needs the networks' channel counts to agree: the teacher's taps are replaced by
the paraphraser encodings, which have the student's channels (as for FSP); otherwise a
ValueError names the shapes. The pixel term compares N×N matrices and needs equal h·w only.

Why the deep tap: its channels are the network's most semantic responses (which structures co-occur, which
pixels belong together), the relations the abstract describes; the shallow tap's channels are closer to
edge and texture filters. Both taps sit at H/4, so the deep one costs no more, and one tap keeps the N×N
pixel term, the expensive part, to one pass per step.

The paper's loss weights and temperature are not public: channel_weight = pixel_weight = τ = 1 are our
defaults: at τ = 1 every relation logit lies in [−1, 1], so both terms are O(1) and neither swamps the other.
With pixel_weight = 0 the N×N term is skipped altogether (and h·w may then differ between the networks).

A channel constant over the pixels has no correlation with anything: its row and column of G are zero (the
centred vector is exactly zero because each channel is first shifted by its own first pixel, and the norm is
clamped at `eps`, so no NaN appears in values or gradients).
"""
from __future__ import annotations


import torch

from cocofast.losses.base import DistillLoss, Reads, check_non_negative, check_positive, shape_str
from cocofast.losses.registry import register_loss
from cocofast.ops.backends import check_backend
from cocofast.ops.pixel_relation import pixel_relation_kl


def channel_relation(feat: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, C) channel correlation matrix G = F̂ F̂ᵀ, in feat's dtype."""
    x = feat.flatten(2)
    # Subtracting one pixel first changes nothing mathematically, but makes a constant channel exactly zero
    # after centring; its mean alone could be off by an ulp and the rounding noise would then be normalised
    # to a unit vector.
    x = x - x[:, :, :1]
    x = x - x.mean(dim=2, keepdim=True)
    x = x / torch.linalg.vector_norm(x, dim=2, keepdim=True).clamp_min(eps)
    return torch.bmm(x, x.transpose(1, 2))


@register_loss("cpkd")
class CPKDLoss(DistillLoss):
    reads = Reads("deep", teacher="paraphrased", matched_channels=True)
    default_weight = 1.0
    op_family = "pixel_relation"

    def __init__(self, weight: float | None = None, channel_weight: float = 1.0, pixel_weight: float = 1.0,
                 tau: float = 1.0, backend: str = "auto"):
        super().__init__(weight)
        name = type(self).__name__
        self.channel_weight = check_non_negative(name, "channel_weight", channel_weight)
        self.pixel_weight = check_non_negative(name, "pixel_weight", pixel_weight)
        self.tau = check_positive(name, "tau", tau)
        self.backend = check_backend(self.op_family, backend, where=name)

    def distill(self, student, teacher, labels):
        (s,), (t,) = student, teacher
        if s.shape[1] != t.shape[1]:
            raise ValueError(
                f"{type(self).__name__}: the channel relations need the teacher's deep tap to have the student's "
                f"{s.shape[1]} channels, got teacher {shape_str(t)} vs student {shape_str(s)}; give it "
                "the paraphraser encoding of the teacher's deep tap (k = the student's channels)")
        loss = self.channel_weight * (channel_relation(s) - channel_relation(t)).square().mean()
        if self.pixel_weight > 0:  # the N×N term is the expensive one: skip it when it is switched off
            loss = loss + self.pixel_weight * pixel_relation_kl(t, s, tau=self.tau, backend=self.backend)
        return loss

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, channel_weight={self.channel_weight:g}, pixel_weight={self.pixel_weight:g}, "
                f"tau={self.tau:g}, backend={self.backend!r}")
