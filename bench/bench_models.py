"""Training-step cost of each network alone: forward + backward time and peak memory per batch.

One row per (network, precision): median milliseconds for forward + cross-entropy + backward, images per second,
and on CUDA the peak memory of the step. Parameters and multiply-adds come from the same code as
`python -m cocofast.models`.

    python bench/bench_models.py                          # CPU, 1 thread: students at paper width, FANet at 0.25
    python bench/bench_models.py --size 512 --batch 8 --teacher_width 1      # the paper's setting, on a GPU
Writes bench/results/models.csv and prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cocofast.models import SEGMENTATION_MODELS, count_parameters, create_model
from cocofast.models import count_macs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_csv  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "models.csv"


def step_ms(model, x, target, device, precision: str, warmup: int, steps: int) -> tuple[float, float]:
    """Median ms of one forward + CE + backward, and peak MiB (CUDA; NaN on CPU)."""
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).logits.float(), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> list[dict]:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512 if cuda else 128)
    parser.add_argument("--batch", type=int, default=8 if cuda else 2)
    parser.add_argument("--in_channels", type=int, default=1)
    parser.add_argument("--teacher_width", type=float, default=1.0 if cuda else 0.25)
    parser.add_argument("--student_width", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=10 if cuda else 3)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 1)
    # On a shared CPU a second OpenMP thread mostly spin-waits (10x slower steps seen here); pass 0 for torch's default.
    parser.add_argument("--threads", type=int, default=0 if cuda else 1)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    precisions = ("fp32", "bf16")
    info = environment()
    info["threads"] = torch.get_num_threads()
    rows = []
    for name in SEGMENTATION_MODELS:
        width = args.teacher_width if name == "fanet" else args.student_width
        torch.manual_seed(0)
        model = create_model(name, in_channels=args.in_channels, num_classes=2, width=width).to(device).train()
        x = torch.rand(args.batch, args.in_channels, args.size, args.size, device=device)
        target = torch.randint(0, 2, (args.batch, args.size, args.size), device=device)
        with torch.device("meta"):
            macs = count_macs(create_model(name, in_channels=args.in_channels, width=width).eval(),
                              torch.empty(1, args.in_channels, args.size, args.size))
        for precision in precisions:
            ms, peak = step_ms(model, x, target, device, precision, args.warmup, args.steps)
            rows.append({"network": name, "width": width, "size": args.size, "batch": args.batch,
                         "precision": precision, "params": count_parameters(model),
                         "gmacs_fwd_per_image": round(macs / 1e9, 3), "ms_per_step": round(ms, 2),
                         "images_per_s": round(args.batch / ms * 1e3, 1), "peak_mib": round(peak, 1)})
        del model
    write_csv(RESULTS, rows, info)
    print(f"{info['machine']} / {info['device']} / {info['threads']} threads, torch {info['torch']}, "
          f"triton {info['triton']}, commit {info['commit']}")
    print(f"forward + CE + backward, batch {args.batch}, {args.size}x{args.size}, in_channels={args.in_channels}\n")
    cols = ["network", "width", "precision", "params", "gmacs_fwd_per_image", "ms_per_step", "images_per_s",
            "peak_mib"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return rows


if __name__ == "__main__":
    main()
