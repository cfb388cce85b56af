"""Graph Flow distillation (Zou, Sun et al., IEEE TMI 2023; the CoCo DistillNet authors' extension).

Each network's taps F_1 .. F_L (shallow to deep, (B, C_i, h_i, w_i), L ≥ 2, equally many for teacher and
student) form a chain graph: vertex i is the CMSS structure M_i = Â_i Â_iᵀ of tap i (CoCo DistillNet §III-B eq. 1-2), edge (i, i+1)
is the cross-layer correlation φ(F_i, F_{i+1}) (eq. 3 there). The student is trained to match both:

    vertex = 1/L     Σ_i       mean_b ‖M_T,i − M_S,i‖²_F / N²       (cocofast.similarity_distance)
    edge   = 1/(L−1) Σ_i       mean_b (φ_T(i, i+1) − φ_S(i, i+1))²   (cocofast.coco_loss over consecutive pairs)
    loss   = vertex_weight · vertex + edge_weight · edge

One common grid. Before anything else every tap of both networks is average-pooled
(adaptive_avg_pool2d) to the smallest height and the smallest width found among all of them; taps already
that size are used as they are. φ needs equal N = h·w within each consecutive pair of one network, and the
vertex distance needs equal N between teacher and student at each vertex; one grid for everything meets
both at once, and keeps every edge and vertex on the same pixels, so the graph compares like with like.
The smallest grid because pooling only ever averages pixels together, it never invents them as upsampling
would, and the similarity work falls with N. The built-in networks declare `graph_tap_paths` all at H/4,
so between them nothing is pooled.

Never N×N: with the gram / triton backends both terms come from the C×C Gram identity
⟨ÂÂᵀ, B̂B̂ᵀ⟩_F = ‖ÂᵀB̂‖²_F (cocofast/ops/similarity/).

Scale. The authors' best table weights vertices by 1e-5 and edges by 1e-9, but those multiply their
unnormalised sums over all N² entries. Here the vertex term is divided by N² exactly like
similarity_distance, and φ is already a normalised correlation in [0, 1] as in coco_loss, so defaults of
1.0 put both terms on CoCo's scale (λ = 1). Graph Flow's logit KD and adversarial terms are the separate
`kd` and adversarial losses; its semi-supervised mode is a training-loop matter.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cocofast.losses.base import DistillLoss, Reads, check_non_negative
from cocofast.losses.registry import register_loss
from cocofast.ops.backends import check_backend
from cocofast.ops.similarity import coco_loss, similarity_distance


def common_grid(taps_a: Sequence[torch.Tensor], taps_b: Sequence[torch.Tensor]) -> tuple[list, list]:
    """Both tap lists average-pooled to (min h, min w) over all their maps; maps already that size unchanged."""
    every = [*taps_a, *taps_b]
    if not every:
        raise ValueError("common_grid: `taps_a` and `taps_b` are both empty")
    grid = (min(t.shape[-2] for t in every), min(t.shape[-1] for t in every))

    def to_grid(t: torch.Tensor) -> torch.Tensor:
        return t if tuple(t.shape[-2:]) == grid else F.adaptive_avg_pool2d(t, grid)

    return [to_grid(t) for t in taps_a], [to_grid(t) for t in taps_b]


def _check_chains(fn: str, teacher_taps, student_taps, min_len: int) -> None:
    for role, taps in (("teacher_taps", teacher_taps), ("student_taps", student_taps)):
        if not isinstance(taps, (tuple, list)) or len(taps) < min_len:
            got = f"{type(taps).__name__} of length {len(taps)}" if isinstance(taps, (tuple, list)) else \
                type(taps).__name__
            raise ValueError(f"{fn}: `{role}` must be a sequence of at least {min_len} (B, C, h, w) maps, got {got}")
    if len(teacher_taps) != len(student_taps):
        raise ValueError(f"{fn}: `teacher_taps` and `student_taps` must be equally long, got {len(teacher_taps)} "
                         f"and {len(student_taps)}")


def graph_vertex_loss(teacher_taps: Sequence[torch.Tensor], student_taps: Sequence[torch.Tensor], *,
                      backend: str = "auto") -> torch.Tensor:
    """Mean over taps of mean_b ‖M_T − M_S‖²_F / N² (CMSS) on the common grid; the teacher is constant."""
    _check_chains("graph_vertex_loss", teacher_taps, student_taps, 1)
    teacher_taps, student_taps = common_grid(teacher_taps, student_taps)
    return torch.stack([similarity_distance(t.detach(), s, channel_mix=True, backend=backend)
                        for t, s in zip(teacher_taps, student_taps)]).mean()


def graph_edge_loss(teacher_taps: Sequence[torch.Tensor], student_taps: Sequence[torch.Tensor], *,
                    backend: str = "auto") -> torch.Tensor:
    """Mean over consecutive taps (i, i+1) of mean_b (φ_T − φ_S)² on the common grid; the teacher is constant."""
    _check_chains("graph_edge_loss", teacher_taps, student_taps, 2)
    teacher_taps, student_taps = common_grid(teacher_taps, student_taps)
    consecutive = lambda taps: list(zip(taps[:-1], taps[1:]))  # noqa: E731
    return coco_loss(consecutive(teacher_taps), consecutive(student_taps), backend=backend)


@register_loss("graph_flow")
class GraphFlowLoss(DistillLoss):
    """Graph Flow on each network's chain of taps (e.g. its `graph_tap_paths`), weight 1 like CoCo."""

    reads = Reads("chain", teacher="raw")
    default_weight = 1.0
    op_family = "similarity"

    def __init__(self, weight: float | None = None, vertex_weight: float = 1.0, edge_weight: float = 1.0,
                 backend: str = "auto"):
        super().__init__(weight)
        name = type(self).__name__
        self.vertex_weight = check_non_negative(name, "vertex_weight", vertex_weight)
        self.edge_weight = check_non_negative(name, "edge_weight", edge_weight)
        if not (self.vertex_weight or self.edge_weight):
            raise ValueError(f"{name}: vertex_weight and edge_weight are both 0, so the loss would be a constant; "
                             "set at least one > 0 (or weight=0 to switch the whole loss off)")
        self.backend = check_backend(self.op_family, backend, where=name)

    def distill(self, student, teacher, labels):
        teacher_taps, student_taps = common_grid(teacher, student)
        total = student_taps[0].new_zeros(())
        # A zero weight skips its term's work entirely (at least one weight is > 0, so `total` keeps a graph).
        if self.vertex_weight:
            total = total + self.vertex_weight * graph_vertex_loss(teacher_taps, student_taps, backend=self.backend)
        if self.edge_weight:
            total = total + self.edge_weight * graph_edge_loss(teacher_taps, student_taps, backend=self.backend)
        return total

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, vertex_weight={self.vertex_weight:g}, edge_weight={self.edge_weight:g}, "
                f"backend={self.backend!r}")
