#!/usr/bin/env bash
# The GPU checks, on a CUDA machine (torch 2.11 + triton 3.6), in under 8 minutes:
#   1. the tests marked `gpu`, and the kernel tests run on the GPU itself (no Triton interpreter);
#   2. the similarity and pixel-relation benches at N = 4,096 and 65,536, batch 8: time, peak memory,
#      GB/s, TFLOP/s, and the fused kernels' time over the eager torch path;
#   3. the roofline model beside them (bench_roofline.py; the interpreter counts are left to `make bench`).
# Results: bench/results/gpu_similarity.csv, gpu_pixel_relation.csv, gpu_roofline.csv, and each step's
# log as bench/results/gpu_<step>.log.
#
#   bench/gpu.sh             # on the GPU machine; exits 2 at once without CUDA
#   bench/gpu.sh --dry-run   # here, on CPU: the same Python steps at smoke size, results to a temp folder
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1

if [ "$DRY" = 0 ]; then
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "bench/gpu.sh: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine," \
             "or use --dry-run to try its Python steps on CPU" >&2
        exit 2
    fi
    unset TRITON_INTERPRET  # the kernels must run as GPU code, not in the interpreter
    OUT=bench/results
    BENCH_ARGS=(--sizes 4096,65536 --batches 8 --repeats 3 --budget-s 8)
    # 60 + 140 + 100 + 90 + 60 = 450 s of deadlines: with start-up, the script stays under 8 minutes.
    TEST_SECONDS=140 SIM_SECONDS=100 PIX_SECONDS=90 MODEL_SECONDS=60
else
    export TRITON_INTERPRET=1
    OUT=$(mktemp -d)
    BENCH_ARGS=(--quick --batches 1 --repeats 1 --budget-s 2 --interpreter-budget-s 2)
    TEST_SECONDS=60 SIM_SECONDS=300 PIX_SECONDS=300 MODEL_SECONDS=300
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a CPU machine here is shared
fi
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
status=0
step() {  # step NAME SECONDS COMMAND...: run with a deadline and a log, note a failure, go on with the rest
    local name=$1 seconds=$2; shift 2
    local log="$OUT/gpu_${name// /_}.log" start=$SECONDS rc
    echo "=== $name (at most ${seconds}s, log $log)"
    set +e
    timeout "$seconds" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    if [ "$rc" = 124 ]; then echo "=== $name: ran out of its ${seconds}s" >&2; fi
    if [ "$rc" != 0 ]; then status=1; fi
}

KERNEL_TESTS=(tests/test_similarity.py tests/test_pixel_relation.py tests/test_gpu_compile.py -k "triton or tiled or compile")
if [ "$DRY" = 0 ]; then
    # The tests that need CUDA, then the kernel tests on the device itself (conftest sets the interpreter only
    # where there is no GPU).
    step "gpu tests" 60 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
    step "kernel tests" "$TEST_SECONDS" "$PY" -m pytest -q -p no:cacheprovider "${KERNEL_TESTS[@]}"
else
    step "gpu test selection" 60 "$PY" -m pytest -q --collect-only -p no:cacheprovider -m gpu tests
    step "kernel test selection" "$TEST_SECONDS" "$PY" -m pytest -q --collect-only -p no:cacheprovider \
        "${KERNEL_TESTS[@]}"
fi
step "similarity bench" "$SIM_SECONDS" "$PY" bench/bench_similarity.py "${BENCH_ARGS[@]}" \
    --out "$OUT/gpu_similarity.csv"
step "pixel relation bench" "$PIX_SECONDS" "$PY" bench/bench_pixel_relation.py "${BENCH_ARGS[@]}" \
    --out "$OUT/gpu_pixel_relation.csv"
step "roofline model" "$MODEL_SECONDS" "$PY" bench/bench_roofline.py --quick --no-count --out "$OUT/gpu_roofline.csv"
echo "results in $OUT"
exit $status
