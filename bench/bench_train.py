"""Training-step time: student alone vs student + CoCo + AdvD, with and without the teacher's forward pass,
and the share of the step spent in the CoCo loss.

It times cocofast.train.student.StudentStep, built by train/stages.py's build_student_step, the exact code the student stage runs (critic step + student
step), on synthetic patches. "cached teacher" replays the teacher's features from a real teacher cache
(train/teacher_cache.py, what --teacher_cache=true runs: memory-mapped files, looked up by each sample's
key). The CoCo share is the CoCo loss's forward + backward alone on tensors of the tap
shapes, divided by the full step.

    python bench/bench_train.py                     # CPU: reduced widths at 128x128
    python bench/bench_train.py --size 512 --teacher_width 1 --student_width 1     # the paper's nets
Writes bench/results/train.csv and prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import tempfile

import torch

from cocofast.data import SyntheticPathology
from cocofast.models import create_model
from cocofast.ops.similarity import coco_loss
from cocofast.train.config import TrainConfig
from cocofast.train.runtime import Runtime, amp_dtype
from cocofast.train.features import needs_paraphrasers
from cocofast.train.networks import frozen, paraphraser_kwargs, seg_kwargs
from cocofast.train.stages import build_student_step
from cocofast.train.student import StudentStep, build_losses
from cocofast.train.teacher_cache import KeyedSamples, TeacherCache, cache_identity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_csv  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "train.csv"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, steps: int) -> float:
    """Median milliseconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def build_step(cfg: TrainConfig, rt: Runtime, teacher, paraphrasers) -> StudentStep:
    """The student stage's own builder (train/stages.py), so the bench times exactly what training runs."""
    losses = build_losses(cfg)
    step, *_ = build_student_step(cfg, rt, 10**6, losses, teacher=teacher if losses or cfg.adversarial else None,
                                  paraphrasers=paraphrasers if needs_paraphrasers(losses, cfg.use_paraphraser)
                                  else None)
    return step


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--size", type=int, default=512 if cuda else 128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--teacher_width", type=float, default=1.0 if cuda else 0.25)
    parser.add_argument("--student_width", type=float, default=1.0 if cuda else 0.5)
    parser.add_argument("--disc_width", type=float, default=1.0 if cuda else 0.25)
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    parser.add_argument("--steps", type=int, default=10 if cuda else 4)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 1)
    args = parser.parse_args(argv)

    info = environment()  # the commit and load as the measurement starts (others may commit meanwhile)
    device = torch.device("cuda" if cuda else "cpu")
    rt = Runtime(0, 1, 0, device, amp_dtype(args.amp, device))
    cfg = TrainConfig(image_size=args.size, batch_size=args.batch, teacher_width=args.teacher_width,
                      student_width=args.student_width, disc_width=args.disc_width, amp=args.amp,
                      losses="coco", adversarial=True, use_paraphraser=True)
    torch.manual_seed(0)
    teacher = frozen(create_model(cfg.teacher_model, **seg_kwargs(cfg, "teacher")).to(device))
    paraphrasers = frozen(torch.nn.ModuleList(
        create_model("paraphraser", **kw) for kw in paraphraser_kwargs(cfg, teacher)).to(device))
    data = SyntheticPathology(args.batch, size=args.size, seed=0, in_channels=cfg.in_channels)
    images, masks, keys = (torch.stack(t) for t in zip(*(KeyedSamples(data)[i] for i in range(args.batch))))
    images, masks = images.to(device), masks.to(device)

    alone = build_step(replace(cfg, losses="none", adversarial=False), rt, teacher, paraphrasers)
    coco = build_step(cfg, rt, teacher, paraphrasers)
    cache_dir = tempfile.TemporaryDirectory()
    identity = {**cache_identity(replace(cfg, flips=False), coco, teacher, paraphrasers, device), "variants": 1}
    coco.cache = TeacherCache.build(Path(cache_dir.name) / "cache", identity, data, args.batch,
                                    coco.teacher_features, device)
    cached = coco.teacher_features(images)
    with torch.no_grad(), rt.autocast():
        out_s = coco.student(images)
    taps_s = [t.float().detach().requires_grad_(True) for t in (out_s.shallow, out_s.deep)]

    def coco_only():
        coco_loss([cached.paraphrased], [tuple(taps_s)], backend=cfg.similarity_backend).backward()

    runs = [
        ("student alone (CE)", lambda: alone(images, masks)),
        ("student + CoCo + AdvD, teacher forward", lambda: coco(images, masks)),
        ("student + CoCo + AdvD, cached teacher", lambda: coco(images, masks, keys=keys)),
        ("CoCo loss forward + backward only", coco_only),
    ]
    ms = {name: timed(fn, device, args.warmup, args.steps) for name, fn in runs}
    cache_dir.cleanup()
    full = ms["student + CoCo + AdvD, teacher forward"]
    setting = (f"{cfg.teacher_model} x{cfg.teacher_width:g} -> {cfg.student_model} x{cfg.student_width:g}, "
               f"batch {args.batch}, {args.size}x{args.size}, amp {args.amp}, {torch.get_num_threads()} threads")
    rows = [{"setting": setting, "step": name, "ms_per_step": round(value, 2),
             "share_of_full_step": round(value / full, 4)} for name, value in ms.items()]
    write_csv(RESULTS, rows, info)
    print(f"training step ({setting}; {info['device']}; torch {info['torch']}, triton {info['triton']}, "
          f"commit {info['commit']})\n")
    print("| step | ms / step | share of full CoCo + AdvD step |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row['step']} | {row['ms_per_step']:.1f} | {row['share_of_full_step']:.1%} |")
    return rows


if __name__ == "__main__":
    main()
