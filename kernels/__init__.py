"""cocofast's Triton kernels (installed as `cocofast.kernels`).

- gram.py:      fused Gram-identity kernels, O(N·C²) work, C×C memory: one forward launch for all three
                Grams of a map pair, one backward launch that reads each map once and writes its gradient once.
- tiled.py:     flash-style kernels that walk the N×N similarity matrices in tiles, forward and backward.
- pixel_relation.py: flash-style KL between row-softmaxed pixel relations (CPKD), two online softmaxes.
- cmss_rows.py: the per-pixel parts (the channel max with the input check's extrema, row norms, the backward
                through normalisation and the softmax-of-max-pool channel weights, the max-pool scatter).
- launcher.py:  launch recording and the per-shape tile / warp configs (with the reasons).
The compile guard and the traffic counter that measure them are dev tools in cocofast.perf.
Each takes (B, C, H, W) maps of any layout and dtype and returns float64 per-image statistics.
"""
from .gram import GramStats, gram_stats
from .tiled import TiledStats, tiled_stats

__all__ = ["GramStats", "TiledStats", "gram_stats", "tiled_stats"]
