"""What every op shares, and the ops themselves, one folder each.

- similarity/:     CoCo's CMSS and cross-layer correlation (dispatch, the plain-torch Gram, the naive reference,
                   the `auto` decision); kernels in cocofast.kernels.gram and .tiled.
- pixel_relation/: CPKD's pixel-relation KL (dispatch, the plain-torch row blocks, the naive reference);
                   kernels in cocofast.kernels.pixel_relation.
- checks.py:   argument checks with messages naming the argument and its shape, the host memory probe, and
               the guard that stops a naive backend before it allocates N×N matrices.
- backends.py: each op family's backend table and `check_backend`, the one validator of a backend name.
- selfcheck.py: the fused kernels' first-batch check against the float64 gram path, per kernel class.
Measuring the ops (traffic counts, the compile guard, roofline reports) is dev tooling in cocofast.perf.
"""
