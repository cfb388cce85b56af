"""CPKD pixel-relation KL, forward+backward, up to 1024×1024 patches: naive (N×N), row blocks, flash kernel.

One case = (teacher/student channels, N, batch, backend): the loss of two random maps, then the backward to
the student. Each case runs in its own subprocess so that peak memory is clean: on CPU the VmHWM delta over
the inputs; on CUDA max_memory_allocated minus the input bytes. Cases that cannot fit (naive at large N) or
would take longer than the budget (the Triton CPU interpreter) are not run: the table says what they would
need, estimated from the largest case of the same backend and pair run so far on this machine (at first, a
small probe run).

    python bench/bench_pixel_relation.py [--budget-s 120] [--interpreter-budget-s 60] [--repeats 3] [--quick]
                                         [--sizes 4096,65536] [--batches 1,8] [--out bench/results/...csv]
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import case_arguments, environment, free_bytes, has_cuda, run_child, vm_hwm, write_csv

from cocofast.ops.pixel_relation import NAIVE_MATRICES

# (teacher channels, student channels): FANet's taps against each student's, as the authors' networks have them.
PAIRS = {"FANet 256 → Mobile U-Net 24": (256, 24), "FANet 256 → ENet/ERFNet 64": (256, 64)}
SIZES = {"256² input (N=4,096)": 64, "512² input (N=16,384)": 128, "1024² input (N=65,536)": 256}
BACKENDS = ("naive", "chunked", "triton")
PROBE_SIDE = 32     # N = 1,024: four 256-pixel interpreter tiles a side, so tiles are full as at large N


def flops(backend: str, batch: int, n: int, c_t: int, c_s: int) -> float:
    """2 × multiply-adds of the forward+backward, by each backend's own algorithm (exps not counted)."""
    relations = 2 * batch * n * n * (c_t + c_s)           # R_T and R_S once
    grad_products = 2 * (2 * batch * n * n * c_s)          # dÂ_S = (G + Gᵀ)Â_S as two N×N×C_S products
    if backend == "naive":
        return relations + grad_products
    if backend == "chunked":                               # the backward rebuilds each block's relations
        return relations * 2 + grad_products
    # Flash: the backward rebuilds both relation tiles (once per 64-channel block of the student on a GPU).
    return relations * 2 + 2 * batch * n * n * c_s


def run_case(backend: str, batch: int, side: int, c_t: int, c_s: int, repeats: int) -> dict:
    """Runs inside the child process."""
    import torch

    from cocofast.ops.pixel_relation import pixel_relation_kl

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    ft = torch.randn(batch, c_t, side, side, device=dev, generator=gen).relu_()
    fs = torch.randn(batch, c_s, side, side, device=dev, generator=gen).relu_().requires_grad_(True)
    input_bytes = ft.numel() * ft.element_size() + fs.numel() * fs.element_size()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = vm_hwm()
    times, value = [], None
    for _ in range(repeats):
        fs.grad = None
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = pixel_relation_kl(ft, fs, backend=backend)
        loss.backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        value = loss.item()
    peak = (torch.cuda.max_memory_allocated() if dev == "cuda" else vm_hwm()) - base
    times.sort()
    return {"median_s": times[len(times) // 2], "peak_extra_bytes": peak, "input_bytes": input_bytes,
            "student_bytes": fs.numel() * fs.element_size(),
            "loss": value, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}


def child(args: dict, timeout: float) -> dict:
    return run_child("bench_pixel_relation", args, timeout, interpret=args["backend"] == "triton" and not has_cuda())


def main(argv=None) -> list[dict]:
    ap = case_arguments(__doc__.splitlines()[0], 60.0, HERE / "results" / "pixel_relation.csv")
    args, _ = ap.parse_known_args(argv)
    cuda = has_cuda()
    interpreted = not cuda
    env = environment()
    # Probes: how fast this machine runs each backend, per pair, to estimate the cases not run.
    rates = {}
    for pair, (c_t, c_s) in PAIRS.items():
        for backend in BACKENDS:
            res = child(dict(backend=backend, batch=1, side=PROBE_SIDE, c_t=c_t, c_s=c_s, repeats=2), timeout=300)
            if "median_s" in res:
                rates[pair, backend] = flops(backend, 1, PROBE_SIDE**2, c_t, c_s) / res["median_s"]
    rows = []
    sizes = list(SIZES.items())[:1] if args.quick else list(SIZES.items())
    if args.sizes:
        wanted = {int(n) for n in args.sizes.split(",")}
        sizes = [(name, side) for name, side in sizes if side * side in wanted]
    batches = [int(b) for b in args.batches.split(",")]
    for pair, (c_t, c_s) in PAIRS.items():
        for size_name, side in sizes:
            for batch in batches:
                n = side * side
                for backend in BACKENDS:
                    row = {"pair": pair, "size": size_name, "N": n, "batch": batch, "backend": backend,
                           "input_MiB": round(batch * (c_t + c_s) * n * 4 / 2**20, 1),
                           "GFLOP": round(flops(backend, batch, n, c_t, c_s) / 1e9, 1)}
                    rate = rates.get((pair, backend))
                    est = flops(backend, batch, n, c_t, c_s) / rate if rate else math.inf
                    need = NAIVE_MATRICES * batch * n * n * 4
                    budget = args.interpreter_budget_s if backend == "triton" and interpreted else args.budget_s
                    if backend == "naive" and need > free_bytes():
                        row["note"] = (f"not run: the N×N matrices need ≈{need / 2**30:,.0f} GiB "
                                       f"({free_bytes() / 2**30:,.0f} GiB free)")
                    elif est > budget:
                        where = " in the Triton CPU interpreter" if backend == "triton" and interpreted else ""
                        row["note"] = f"not run: ≈{_duration(est)} per step{where} (budget {budget:.0f} s)"
                    else:
                        repeats = args.repeats if est * args.repeats < budget else 1
                        res = child(dict(backend=backend, batch=batch, side=side, c_t=c_t, c_s=c_s,
                                         repeats=repeats), timeout=max(120, 4 * budget))
                        _fill(row, res, backend, interpreted)
                        if "median_s" in res:  # the largest case run so far predicts the next ones best
                            rates[pair, backend] = flops(backend, batch, n, c_t, c_s) / res["median_s"]
                    rows.append(row)
                    print(_line(row), flush=True)
    # The fused kernel against the eager row-block path, case by case, from this same run.
    for r in rows:
        eager = next((c for c in rows if c["backend"] == "chunked" and "median_ms" in c and
                      (c["pair"], c["N"], c["batch"]) == (r["pair"], r["N"], r["batch"])), None)
        if r["backend"] == "triton" and "median_ms" in r and eager and cuda:
            r["time_over_chunked"] = round(r["median_ms"] / eager["median_ms"], 3)
    write_csv(args.out, rows, env)
    print(markdown(rows))
    return rows


def _fill(row: dict, res: dict, backend: str, interpreted: bool) -> None:
    if "error" in res:
        row["note"] = res["error"]
        return
    row["median_ms"] = round(res["median_s"] * 1e3, 1)
    row["peak_extra_MiB"] = round(res["peak_extra_bytes"] / 2**20, 1)
    row["peak_extra_over_input"] = round(res["peak_extra_bytes"] / res["input_bytes"], 2)
    row["GFLOP_per_s"] = round(row["GFLOP"] / res["median_s"], 1)
    row["TFLOP_per_s"] = round(row["GFLOP"] / res["median_s"] / 1e3, 3)
    # Least traffic any algorithm needs: both maps read forward and backward, the student's gradient written.
    row["GB_per_s_min_traffic"] = round((2 * res["input_bytes"] + res["student_bytes"]) / res["median_s"] / 1e9, 1)
    row["loss"] = f"{res['loss']:.6e}"
    if backend == "triton" and interpreted:
        row["note"] = "Triton CPU interpreter (correctness path, not a speed figure)"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:,.0f} min"
    return f"{seconds / 3600:,.1f} h"


def _line(row: dict) -> str:
    return " | ".join(f"{k}={v}" for k, v in row.items())


def markdown(rows: list[dict]) -> str:
    cols = ["pair", "size", "batch", "backend", "GFLOP", "median_ms", "peak_extra_MiB", "peak_extra_over_input",
            "GFLOP_per_s", "GB_per_s_min_traffic", "time_over_chunked", "loss", "note"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
