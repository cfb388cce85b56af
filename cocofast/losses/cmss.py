"""Channel-mixed spatial similarity distillation, "CMSS" in CoCo DistillNet's ablation (§III-B eq. 1-2 and Table I).

The same as SS (`skd_pairwise`: deep tap, max-pool kernel 2, weight 0.5) except that each pixel's feature is
weighted by softmax(global max pool) over channels before normalising, so the SS-versus-CMSS comparison
isolates the channel mixing. Set pool_kernel=1 to compare the full-resolution maps.
"""
from __future__ import annotations

from cocofast.losses.skd_pairwise import SKDPairwiseLoss
from cocofast.losses.registry import register_loss


@register_loss("cmss")
class CMSSLoss(SKDPairwiseLoss):
    channel_mix = True
