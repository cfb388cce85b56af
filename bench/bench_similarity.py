"""CoCo loss forward+backward at 1024×1024 patches: time and peak memory for every backend.

One case = (channel pair, N, batch, backend): φ of two random maps, then the backward to both. Each case
runs in its own subprocess so that peak memory is clean: on CPU the VmHWM delta over the inputs; on CUDA
max_memory_allocated minus the input bytes. Cases a backend cannot fit (naive at large N) or would take
longer than the budget (the Triton interpreter on CPU) are not run: the table says what they would need.

    python bench/bench_similarity.py [--budget-s 120] [--repeats 3] [--quick] [--sizes 4096,65536]
                                     [--batches 1,8] [--out bench/results/similarity.csv]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import case_arguments, environment, free_bytes, has_cuda, run_child, vm_hwm, write_csv

PAIRS = {"FANet teacher 256/256": 256, "ENet/ERFNet 64/64": 64, "Mobile U-Net 24/24": 24}
SIZES = {"256² input (N=4,096)": 64, "1024² at H/4 (N=65,536)": 256, "1024² at H/2 (N=262,144)": 512}
BACKENDS = ("naive", "gram", "triton", "tiled")
# Datasheet peaks (dense): HBM GB/s and TF32 tensor-core TFLOP/s, which tf32×3 dots run on.
DEVICE_PEAKS = {"H100": (3350.0, 495.0), "H200": (4800.0, 495.0), "A100": (2039.0, 156.0)}
# Triton's CPU interpreter, measured on small shapes, extrapolated by work (see estimate_s).
INTERPRETER_PROBE = dict(channels=24, side=32, batch=1)


def flops(backend: str, batch: int, n: int, c: int) -> float:
    """Multiply-adds × 2 of the forward+backward, by the backend's own algorithm."""
    if backend == "naive" or backend == "tiled":
        fwd = 2 * batch * 2 * n * n * c           # M₁ and M₂
        return fwd * (1 + 3 if backend == "tiled" else 1 + 2)  # tiled recomputes both tiles per grad
    fwd = 2 * batch * n * 3 * c * c              # S₁, S₂, K
    return fwd + 2 * (2 * batch * n * 2 * c * c) * 2   # dÂ from 2 small matmuls per map, both passes


def run_case(backend: str, batch: int, side: int, channels: int, repeats: int) -> dict:
    """Runs inside the child process."""
    import torch

    import cocofast

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    f1 = torch.randn(batch, channels, side, side, device=dev, generator=gen).relu_().requires_grad_(True)
    f2 = torch.randn(batch, channels, side, side, device=dev, generator=gen).relu_().requires_grad_(True)
    input_bytes = 2 * f1.numel() * f1.element_size()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = vm_hwm()
    times = []
    for _ in range(repeats):
        f1.grad = f2.grad = None
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        phi = cocofast.cross_layer_correlation(f1, f2, backend=backend)
        phi.sum().backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if dev == "cuda" else vm_hwm()) - base
    times.sort()
    return {"median_s": times[len(times) // 2], "peak_extra_bytes": peak, "input_bytes": input_bytes,
            "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}


def child(args: dict, timeout: float) -> dict:
    return run_child("bench_similarity", args, timeout, interpret=args["backend"] in ("triton", "tiled") and not has_cuda())


def main(argv=None) -> list[dict]:
    ap = case_arguments(__doc__.splitlines()[0], 30.0, HERE / "results" / "similarity.csv")
    args, _ = ap.parse_known_args(argv)
    cuda = has_cuda()
    interp_budget = min(args.interpreter_budget_s, args.budget_s)
    env = environment()
    rows = []
    # Throughput probes: how fast this machine runs each algorithm, to estimate the cases we skip.
    rates = {}
    for backend in BACKENDS:
        probe = dict(backend=backend, batch=1, side=32 if backend != "naive" else 64, channels=64, repeats=2)
        res = child(probe, timeout=300)
        if "median_s" in res:
            rates[backend] = flops(backend, 1, probe["side"] ** 2, 64) / res["median_s"]
    sizes = list(SIZES.items())[:1] if args.quick else list(SIZES.items())
    if args.sizes:
        wanted = {int(n) for n in args.sizes.split(",")}
        sizes = [(name, side) for name, side in sizes if side * side in wanted]
    batches = [int(b) for b in args.batches.split(",")]
    for pair, channels in PAIRS.items():
        for size_name, side in sizes:
            for batch in batches:
                n = side * side
                for backend in BACKENDS:
                    row = {"pair": pair, "size": size_name, "batch": batch, "backend": backend,
                           "input_MiB": round(2 * batch * channels * n * 4 / 2**20, 1)}
                    work = flops(backend, batch, n, channels)
                    est = work / rates[backend] if backend in rates else float("inf")
                    need = 6 * batch * n * n * 4
                    if backend == "naive" and need > free_bytes():
                        row["note"] = f"not run: needs ≈{need / 2**30:,.0f} GiB for the N×N matrices"
                    elif est > (budget := interp_budget if backend in ("triton", "tiled") and not cuda
                                else args.budget_s):
                        interp = " in the Triton CPU interpreter" if budget == interp_budget else ""
                        row["note"] = f"not run: ≈{est:,.0f} s per step{interp} (budget {budget:.0f} s)"
                    else:
                        res = child(dict(backend=backend, batch=batch, side=side, channels=channels,
                                         repeats=args.repeats), timeout=max(60, 4 * args.budget_s))
                        if "error" in res:
                            row["note"] = res["error"]
                        else:
                            row["median_ms"] = round(res["median_s"] * 1e3, 2)
                            row["peak_extra_MiB"] = round(res["peak_extra_bytes"] / 2**20, 1)
                            row["peak_extra_over_input"] = round(res["peak_extra_bytes"] / res["input_bytes"], 2)
                            row["GFLOP_per_s"] = round(work / res["median_s"] / 1e9, 1)
                            # Least traffic any algorithm needs: read both maps forward and backward,
                            # write both gradients.
                            gbps = 5 * res["input_bytes"] / res["median_s"] / 1e9
                            row["GB_per_s_min_traffic"] = round(gbps, 1)
                            peak = next((v for k, v in DEVICE_PEAKS.items() if k in res["device"]), None)
                            row["TFLOP_per_s"] = round(work / res["median_s"] / 1e12, 3)
                            if cuda and peak:
                                row["of_peak_GB_per_s"] = f"{gbps / peak[0]:.1%}"
                                row["of_peak_TF32_TFLOP_per_s"] = f"{work / res['median_s'] / 1e12 / peak[1]:.1%}"
                            if backend in ("triton", "tiled") and not cuda:
                                row["note"] = "Triton CPU interpreter (correctness path, not a speed figure)"
                    rows.append(row)
                    print(_line(row), flush=True)
    # Fused kernels against the eager path, case by case, from this same run.
    for r in rows:
        gram = next((g for g in rows if g["backend"] == "gram" and "median_ms" in g and
                     (g["pair"], g["size"], g["batch"]) == (r["pair"], r["size"], r["batch"])), None)
        if r["backend"] in ("triton", "tiled") and "median_ms" in r and gram and cuda:
            r["time_over_gram"] = round(r["median_ms"] / gram["median_ms"], 3)
    # The side-by-side ratio at N = 4,096, from this same run.
    for pair in PAIRS:
        for batch in batches:
            got = {r["backend"]: r for r in rows if r["pair"] == pair and r["batch"] == batch
                   and r["size"].startswith("256²") and "median_ms" in r}
            if "naive" in got and "gram" in got:
                ratio = got["naive"]["median_ms"] / got["gram"]["median_ms"]
                print(f"naive/gram time ratio, {pair}, N=4,096, batch {batch}: {ratio:.1f}×")
                got["gram"]["naive_over_gram"] = round(ratio, 1)
    write_csv(args.out, rows, env)
    print(markdown(rows))
    return rows


def _line(row: dict) -> str:
    return " | ".join(f"{k}={v}" for k, v in row.items())


def markdown(rows: list[dict]) -> str:
    cols = ["pair", "size", "batch", "backend", "median_ms", "peak_extra_MiB", "peak_extra_over_input",
            "GFLOP_per_s", "GB_per_s_min_traffic", "note"]
    if any("of_peak_GB_per_s" in r for r in rows):
        cols[-1:-1] = ["of_peak_GB_per_s", "of_peak_TF32_TFLOP_per_s", "time_over_gram"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
