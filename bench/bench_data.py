"""Data-loader throughput of the built-in set, and the peak memory of segmenting an 8192x8192 slide.

    python bench/bench_data.py [--side 8192] [--window 512] [--patches 240]

1. SyntheticPathology 256x256 patches per second through a DataLoader with 0 (main process), 1 and 2
   workers (timed after the first batch, so worker start-up is excluded). One worker = one core.
2. `python -m cocofast.segment` on a tiled, zlib-compressed 8192x8192 RGB TIFF (192 MiB of pixels, built
   from synthetic tissue) with a small network, writing a PNG mask and a PNG overlay. Peak resident
   memory (VmHWM) of that process is compared with a process that only loads the same network and runs
   one batch of windows through it: the difference is what streaming costs beyond the model.
All torch work runs on one intra-op thread (see the note in main()).
Writes bench/results/data.csv and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import environment, write_csv  # noqa: E402

MODEL = {"model_name": "enet", "model_kwargs": {"in_channels": 3, "num_classes": 2, "width": 0.25}}


def loader_rate(workers: int, patches: int, batch: int = 8) -> float:
    import torch

    from cocofast.data import SyntheticPathology

    loader = torch.utils.data.DataLoader(SyntheticPathology(patches + batch, size=256), batch_size=batch,
                                         num_workers=workers)
    it = iter(loader)
    next(it)  # start-up (worker processes) is not throughput
    t0 = time.perf_counter()
    n = sum(len(images) for images, _ in it)
    return n / (time.perf_counter() - t0)


def write_slide(path: Path, side: int, tile: int = 512) -> None:
    """A tiled zlib TIFF made of synthetic tissue tiles, written tile by tile (never whole in memory)."""
    import numpy as np
    import tifffile

    from cocofast.data.synthetic import render_patch

    pool = [(render_patch(tile, np.random.default_rng((7, i)))[0] * 255).astype(np.uint8) for i in range(8)]
    tiles = (pool[(r * 7 + c) % len(pool)] for r in range(side // tile) for c in range(side // tile))
    tifffile.imwrite(path, data=tiles, shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile),
                     compression="zlib", photometric="rgb")


CHILD_BASELINE = """
import json, sys, torch
torch.set_num_threads(1)
from cocofast.segment import load_model
model, _ = load_model(sys.argv[1])
with torch.no_grad():
    model(torch.rand(int(sys.argv[3]), 3, int(sys.argv[2]), int(sys.argv[2])))
print(json.dumps({"hwm": [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0]}))
"""

CHILD_SEGMENT = """
import json, sys, time, torch
torch.set_num_threads(1)
from cocofast.segment import main
t0 = time.perf_counter()
code = main(sys.argv[1:])
seconds = time.perf_counter() - t0
print(json.dumps({"code": code, "seconds": seconds,
                  "hwm": [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0]}))
"""


def run_child(code: str, args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--patches", type=int, default=240)
    args = ap.parse_args(argv)
    import torch

    # One intra-op thread everywhere: on a machine whose cores are shared, two torch threads were measured
    # 30x slower than one (0.98 s vs 0.029 s per 512x512 ENet window).
    torch.set_num_threads(1)
    rows = []
    for workers in (0, 1, 2):
        rate = loader_rate(workers, args.patches)
        rows.append({"measure": f"SyntheticPathology 256x256 patches/s, DataLoader num_workers={workers}",
                     "value": round(rate, 1), "unit": "patches/s"})
        print(rows[-1], flush=True)

    from cocofast.io import atomic_save
    from cocofast.models import create_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        slide = tmp / "slide.tif"
        t0 = time.perf_counter()
        write_slide(slide, args.side)
        print(f"wrote {args.side}x{args.side} test slide in {time.perf_counter() - t0:.1f} s", flush=True)
        torch.manual_seed(0)
        model = create_model(MODEL["model_name"], **MODEL["model_kwargs"])
        params = sum(p.numel() for p in model.parameters())
        atomic_save({"models": {"student": {**MODEL, "state_dict": model.state_dict()}}}, tmp / "model.pt")
        base = run_child(CHILD_BASELINE, [str(tmp / "model.pt"), str(args.window), str(args.batch_size)])
        seg = run_child(CHILD_SEGMENT, [str(slide), "--checkpoint", str(tmp / "model.pt"), "--out",
                                        str(tmp / "mask.png"), "--overlay", str(tmp / "overlay.png"),
                                        "--window", str(args.window), "--batch-size", str(args.batch_size),
                                        "--quiet"])
        if seg["code"] != 0:
            raise RuntimeError("segmentation failed")
        sizes = {name: (tmp / name).stat().st_size / 2**20 for name in ("slide.tif", "mask.png", "overlay.png")}
    side = f"{args.side}x{args.side}"
    label = (f"segment {side} RGB TIFF, {MODEL['model_name']} width 0.25 ({params / 1e3:.0f}k params), "
             f"window {args.window}, overlap 0.25, batch {args.batch_size}, CPU, 1 torch thread")
    mib = lambda kib: round(kib / 1024)  # noqa: E731
    rows += [
        {"measure": f"{label}: wall time", "value": round(seg["seconds"], 1), "unit": "s"},
        {"measure": f"{label}: peak RSS (VmHWM), mask + overlay PNG written", "value": mib(seg["hwm"]),
         "unit": "MiB"},
        {"measure": "  same network loaded, one batch of windows run: peak RSS", "value": mib(base["hwm"]),
         "unit": "MiB"},
        {"measure": "  streaming cost beyond the model (difference)", "value": mib(seg["hwm"] - base["hwm"]),
         "unit": "MiB"},
        {"measure": "  for scale: decoded image / uint8 label image",
         "value": f"{3 * args.side**2 / 2**20:.0f} / {args.side**2 / 2**20:.0f}", "unit": "MiB"},
        {"measure": "  files: slide TIFF / mask PNG / overlay PNG",
         "value": " / ".join(f"{v:.1f}" for v in sizes.values()), "unit": "MiB"},
    ]
    env = environment()
    write_csv(HERE / "results" / "data.csv", rows, env)
    print(f"\n{env}\n\n| measure | value | unit |\n|---|---|---|")
    for row in rows:
        print(f"| {row['measure']} | {row['value']} | {row['unit']} |")
    return rows


if __name__ == "__main__":
    main()
