"""SKD's pairwise similarity distillation (Liu et al. 2019), "SS" in CoCo DistillNet's ablation.

Both deep taps are max-pooled (kernel 2, stride 2, as SKD pools before pairing, which also cuts N by 4), then
compared through `cocofast.similarity_distance`: mean_b ‖M_T − M_S‖²_F / N², where M is the N×N cosine
similarity of the pixels' plain (unmixed) feature vectors. Channel counts may differ; N must match.
"""
from __future__ import annotations

import torch.nn.functional as F

from cocofast.losses.base import DistillLoss, Reads
from cocofast.losses.registry import register_loss
from cocofast.ops.backends import check_backend
from cocofast.ops.similarity import similarity_distance


@register_loss("skd_pairwise")
class SKDPairwiseLoss(DistillLoss):
    reads = Reads("deep", teacher="paraphrased")
    default_weight = 0.5
    aliases = {"pool": "pool_kernel"}
    op_family = "similarity"
    channel_mix = False

    def __init__(self, weight: float | None = None, pool_kernel: int = 2, backend: str = "auto"):
        super().__init__(weight)
        if isinstance(pool_kernel, bool) or not isinstance(pool_kernel, (int, float)) or \
                not float(pool_kernel).is_integer() or pool_kernel < 1:
            raise ValueError(f"{type(self).__name__}: pool_kernel must be an integer >= 1 (1 = no pooling), "
                             f"got {pool_kernel!r}")
        self.pool_kernel = int(pool_kernel)
        self.backend = check_backend(self.op_family, backend, where=type(self).__name__)

    def pool(self, feat):
        if self.pool_kernel == 1:
            return feat
        # ceil_mode keeps the last row/column of an odd-sized map instead of dropping it.
        return F.max_pool2d(feat, self.pool_kernel, self.pool_kernel, ceil_mode=True)

    def distill(self, student, teacher, labels):
        return similarity_distance(self.pool(teacher[0]), self.pool(student[0]),
                                   channel_mix=self.channel_mix, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pool_kernel={self.pool_kernel}, backend={self.backend!r}"
