"""CPU `gram` path against its floor: φ forward + backward ÷ the bare GEMMs the Gram identity needs.

The floor is the 7 matrix products of the identity ⟨ÂÂᵀ, Â'Â'ᵀ⟩ = ‖ÂᵀÂ'‖² per image, on ready-made contiguous
operands: 3 in the forward (Â₁ᵀÂ₁, Â₂ᵀÂ₂, Â₁ᵀÂ₂, each N·C² multiply-adds) and 4 in the backward (C×C by C×N),
i.e. 14·B·N·C² FLOPs. It is timed three ways, image by image channel-major (the maps' own layout), batched
(torch.bmm over B) and pixel-major (N×C operands), and the ratio is taken against the fastest, so a layout
trick inside `gram` cannot flatter it. Everything is timed side by side in one process, one thread, as the
median of interleaved repetitions of thread CPU time (time spent descheduled on a busy machine would land on
whichever call was running). The `gram` step is the public call, input checks included, and it pays for
first-touching its fresh gradient buffers (page faults), which the floor, reusing its tensors, does not.

    python bench/bench_gram_cpu.py [--repeats 5] [--quick]     # COCOFAST_BENCH_CHANNELS=24,64 for a subset
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import environment, write_csv

N_PIX, BATCH = 65_536, 8
CHANNELS = tuple(int(c) for c in os.environ.get("COCOFAST_BENCH_CHANNELS", "24,64,256").split(","))


def floor_calls(batch: int, n_pix: int, c: int):
    """{layout: zero-argument callable running the 7 bare GEMMs of one forward + backward}."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a1, a2 = (torch.randn(batch, c, n_pix, generator=gen) for _ in range(2))
    m = torch.randn(batch, c, c, generator=gen)
    p1, p2 = a1.transpose(1, 2).contiguous(), a2.transpose(1, 2).contiguous()

    def per_image():
        for b in range(batch):
            x1, x2, mb = a1[b], a2[b], m[b]
            x1 @ x1.t(), x2 @ x2.t(), x1 @ x2.t()
            mb @ x1, mb @ x2, mb @ x1, mb @ x2

    def batched():
        t1, t2 = a1.transpose(1, 2), a2.transpose(1, 2)
        torch.bmm(a1, t1), torch.bmm(a2, t2), torch.bmm(a1, t2)
        torch.bmm(m, a1), torch.bmm(m, a2), torch.bmm(m, a1), torch.bmm(m, a2)

    def pixel_major():
        for b in range(batch):
            x1, x2, mb = p1[b], p2[b], m[b]
            x1.t() @ x1, x2.t() @ x2, x1.t() @ x2
            x1 @ mb, x2 @ mb, x1 @ mb, x2 @ mb

    return {"channel-major per image": per_image, "channel-major bmm": batched, "pixel-major per image": pixel_major}


def gram_call(batch: int, n_pix: int, c: int):
    import torch

    import cocofast

    gen = torch.Generator().manual_seed(1)
    side = int(n_pix ** 0.5)
    f1 = torch.randn(batch, c, side, n_pix // side, generator=gen).relu_().requires_grad_(True)
    f2 = torch.randn(batch, c, side, n_pix // side, generator=gen).relu_().requires_grad_(True)

    def step():
        f1.grad = f2.grad = None
        cocofast.cross_layer_correlation(f1, f2, backend="gram").sum().backward()

    return step


def interleaved_medians(calls: dict, repeats: int, clock=time.thread_time) -> dict:
    """Median seconds per call. The default clock is this thread's CPU time: on a shared machine, time spent
    descheduled would otherwise land on whichever call was running."""
    for fn in calls.values():
        fn()  # warm-up: allocator and MKL state
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> list[dict]:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="N = 4,096 (a smoke run)")
    args, _ = ap.parse_known_args(argv)
    torch.set_num_threads(1)
    env = environment()  # the commit and load as the measurement starts (others may commit meanwhile)
    n_pix = 4096 if args.quick else N_PIX
    rows = []
    for c in CHANNELS:
        calls = {"gram": gram_call(BATCH, n_pix, c), **floor_calls(BATCH, n_pix, c)}
        med = interleaved_medians(calls, args.repeats)
        floor_name = min((k for k in med if k != "gram"), key=med.get)
        row = {"N": n_pix, "batch": BATCH, "channels": c, "repeats": args.repeats,
               "gram_ms": round(med["gram"] * 1e3, 1)}
        row.update({f"floor_{k.replace(' ', '_').replace('-', '_')}_ms": round(v * 1e3, 1)
                    for k, v in med.items() if k != "gram"})
        row["fastest_floor"] = floor_name
        row["gram_over_floor"] = round(med["gram"] / med[floor_name], 2)
        row["gram_over_channel_major_mm"] = round(med["gram"] / med["channel-major per image"], 2)
        row["floor_GFLOP"] = round(14 * BATCH * n_pix * c * c / 1e9, 2)
        rows.append(row)
        print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    write_csv(HERE / "results" / "gram_cpu_floor.csv", rows, env)
    return rows


if __name__ == "__main__":
    main()
