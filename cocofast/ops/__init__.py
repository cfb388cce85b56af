"""What every similarity-style op shares: input checks, the memory probe, and the backend tables.

- checks.py:   argument checks with messages naming the argument and its shape, the host memory probe, and
               the guard that stops a naive backend before it allocates N×N matrices.
- backends.py: each op family's backend table and `check_backend`, the one validator of a backend name.
- roofline.py: modelled GPU time, max(bytes / bandwidth, FLOPs / peak), and the `auto` decision built on it.
- torch_traffic.py: a dispatch-level counter of the bytes eager torch ops move (checks roofline's inputs).
- selfcheck.py: the fused kernels' first-batch check against the float64 gram path, per kernel class.
"""
