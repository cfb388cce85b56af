"""Dev-only measurement of cocofast's ops, imported by tests and bench, never by runtime code.

- traffic.py:     the memory traffic counter, one set of rules for Triton kernels (run in the CPU
                  interpreter) and eager torch ops; `python -m cocofast.perf.traffic` prints the table.
- gpu_compile.py: the sm_80 / sm_90 compile guard: every production launch compiled with ptxas, read for
                  spills, stack and tensor-core dots; `python -m cocofast.perf.gpu_compile`.
- roofline.py:    reports of where a path's modelled GPU time goes (the model is cocofast.ops.similarity.auto).
"""
