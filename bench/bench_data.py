"""Data-loader throughput of the built-in set, and the peak memory of segmenting an 8192×8192 image.

    python bench/bench_data.py [--side 8192]
Writes bench/results/data.csv. The segmentation runs in a subprocess so its peak RSS (VmHWM) is its own;
it is reported beside the bytes of the image itself and of the model.
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


def loader_rate(workers: int, n: int = 96) -> float:
    import torch

    from cocofast.data import SyntheticPathology

    loader = torch.utils.data.DataLoader(SyntheticPathology(n, size=256), batch_size=8, num_workers=workers)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return n / (time.perf_counter() - t0)


def _vm(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def segment_child(path: str, window: int) -> dict:
    import torch

    from cocofast.models import create_model
    from cocofast.segment import read_image, sliding_window_segment

    torch.set_num_threads(2)
    model = create_model("enet", in_channels=3, num_classes=2, width=0.25).eval()
    base = _vm("VmRSS:")
    image = read_image(path, 3)
    t0 = time.perf_counter()
    labels = sliding_window_segment(lambda x: model(x).logits, image, window=window, overlap=0.25, batch_size=2)
    return {"seconds": time.perf_counter() - t0, "peak_beyond_model_MiB": (_vm("VmHWM:") - base) / 2**20,
            "image_MiB": image.nbytes / 2**20, "labels_MiB": labels.nbytes / 2**20}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args(argv)
    rows = []
    for workers in (0, 2):
        rate = loader_rate(workers)
        rows.append({"measure": f"synthetic 256² patches/s, {workers} loader workers", "value": round(rate, 1)})
        print(rows[-1], flush=True)
    import numpy as np
    import tifffile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.tif"
        rng = np.random.default_rng(0)
        tile = rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
        tifffile.imwrite(path, np.tile(tile, (args.side // 1024, args.side // 1024, 1)))  # uncompressed
        code = ("import json, sys; sys.path.insert(0, %r); from bench_data import segment_child; "
                "print(json.dumps(segment_child(%r, %d)))" % (str(HERE), str(path), args.window))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
    side = f"{args.side}×{args.side}"
    rows.append({"measure": f"segment {side} TIFF: seconds (ENet w=0.25, window {args.window}, CPU)",
                 "value": round(res["seconds"], 1)})
    rows.append({"measure": f"segment {side} TIFF: peak RSS beyond the model, MiB", "value": round(res["peak_beyond_model_MiB"])})
    rows.append({"measure": f"  of which the memory-mapped image, MiB", "value": round(res["image_MiB"])})
    rows.append({"measure": f"  of which the label image, MiB", "value": round(res["labels_MiB"])})
    for r in rows[2:]:
        print(r)
    write_csv(HERE / "results" / "data.csv", rows, environment())
    return rows


if __name__ == "__main__":
    main()
