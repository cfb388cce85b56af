"""Training-step time: student alone vs student + CoCo + AdvD, with and without the teacher's forward pass,
the CoCo loss's and the critic's parts, and the floor the critic sets.

It times cocofast.train.student.StudentStep, built by train/stages.py's build_student_step, the exact code the
student stage runs (critic step + student step), on synthetic patches. "cached teacher" replays the teacher's
features from a real teacher cache (train/teacher_cache.py, what --teacher_cache=true runs: memory-mapped files,
looked up by each sample's key). The parts are timed alone on tensors of the step's shapes: the CoCo loss's
forward + backward, the critic's WGAN-GP step, and the student's adversarial term (the critic's forward and
backward to the logits). The floor is the student alone plus those two critic parts: the cached step's work
beyond it is the CoCo loss and the glue. A last row runs the cached step with the penalty on one critic step in
four (gp_every=4, lazy regularisation: not the paper's schedule, a config key away), timed four steps a call.
All runs are timed in turn (interleaved), median of --steps.

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

from cocofast.cpu_memory import keep_freed_memory
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
LAZY = 4
LAZY_ROW = f"student + CoCo + AdvD, cached teacher, penalty every {LAZY} critic steps (gp_every={LAZY}, not the paper's)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(runs, device, warmup: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each run, taken in turn: on a shared machine the load drifts within
    seconds, and timed one after the other the runs' ratios moved with it."""
    for _, fn in runs:
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    for _ in range(repeats):
        for name, fn in runs:
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


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
    parser.add_argument("--steps", type=int, default=10 if cuda else 7)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 1)
    parser.add_argument("--system_malloc", action="store_true",
                        help="CPU: leave malloc as the system sets it (training keeps freed memory by default)")
    args = parser.parse_args(argv)

    info = environment()  # the commit and load as the measurement starts (others may commit meanwhile)
    device = torch.device("cuda" if cuda else "cpu")
    # As the training program does (config key keep_freed_memory), before any large allocation.
    malloc = "kept" if device.type == "cpu" and not args.system_malloc and keep_freed_memory() else "system"
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
    logits_s = out_s.logits.float().detach().requires_grad_(True)

    def coco_only():
        coco_loss([cached.paraphrased], [tuple(taps_s)], backend=cfg.similarity_backend).backward()

    def adversarial_term_only():  # the critic's forward and its backward to the student's logits
        coco.adversarial(logits_s, images).backward()

    # Lazy regularisation (config key gp_every, not the paper's): one timed call is LAZY steps, so the penalty
    # step is in every timing; its figure is divided by LAZY below.
    lazy = build_step(replace(cfg, gp_every=LAZY), rt, teacher, paraphrasers)
    lazy.cache = coco.cache

    def lazy_steps():
        for _ in range(LAZY):
            lazy(images, masks, keys=keys)

    runs = [
        ("student alone (CE)", lambda: alone(images, masks)),
        ("student + CoCo + AdvD, teacher forward", lambda: coco(images, masks)),
        ("student + CoCo + AdvD, cached teacher", lambda: coco(images, masks, keys=keys)),
        ("CoCo loss forward + backward only", coco_only),
        ("critic step only (WGAN-GP)", lambda: coco.critic_update(cached.logits, out_s.logits, images)),
        ("adversarial term only (critic forward + backward)", adversarial_term_only),
        (LAZY_ROW, lazy_steps),
    ]
    ms = interleaved(runs, device, args.warmup, args.steps)
    ms[LAZY_ROW] /= LAZY
    cache_dir.cleanup()
    # The floor: the student's own step plus the critic's work, which this maths makes every cached step do.
    ms["floor: student alone + critic step + adversarial term (sum, not timed)"] = (
        ms["student alone (CE)"] + ms["critic step only (WGAN-GP)"]
        + ms["adversarial term only (critic forward + backward)"])
    full = ms["student + CoCo + AdvD, teacher forward"]
    alone_ms = ms["student alone (CE)"]
    setting = (f"{cfg.teacher_model} x{cfg.teacher_width:g} -> {cfg.student_model} x{cfg.student_width:g}, "
               f"batch {args.batch}, {args.size}x{args.size}, amp {args.amp}, {torch.get_num_threads()} threads"
               + (f", malloc {malloc}" if device.type == "cpu" else ""))
    rows = [{"setting": setting, "step": name, "ms_per_step": round(value, 2),
             "share_of_full_step": round(value / full, 4), "x_student_alone": round(value / alone_ms, 3)}
            for name, value in ms.items()]
    write_csv(RESULTS, rows, info)
    print(f"training step ({setting}; {info['device']}; torch {info['torch']}, triton {info['triton']}, "
          f"commit {info['commit']})\n")
    print("| step | ms / step | share of full CoCo + AdvD step | × student alone |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['step']} | {row['ms_per_step']:.1f} | {row['share_of_full_step']:.1%} | "
              f"{row['x_student_alone']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
