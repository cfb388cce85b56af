"""`make demo`: a complete CoCo DistillNet run on the built-in synthetic patches, on a CPU, in minutes.

It runs the training program (`python -m cocofast.train.distill`, the same one `torchrun` starts) with
configs/demo.yaml, one stage per command so each step is visible:

    1. teacher          a quarter-width FANet, trained with cross-entropy
    2. paraphraser      one auto-encoder per teacher tap, on the frozen teacher's features
    3. student alone    a quarter-width Mobile U-Net, cross-entropy only
    4. student + CoCo   the same student with the CoCo loss (on paraphrased teacher taps) and the critic
    5. eval             all three on the held-out synthetic test split

and prints one table: parameters, GMACs (torch FlopCounterMode, MACs = FLOPs / 2) at the demo's 64x64
input, pixel accuracy and mIoU. Outputs (checkpoints, summary.csv, curves, overlays) stay in runs/demo/.
The demo's numbers come from a few minutes of training on generated data; they show the pipeline working,
not the paper's result, and the distilled student need not beat the one trained alone.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
RUN_DIR = REPO / "runs" / "demo"

STEPS = [
    ("teacher", ["--stage=teacher"]),
    ("paraphrasers", ["--stage=paraphraser"]),
    ("student alone", ["--stage=student", "--student_name=student_alone", "--losses=none",
                       "--adversarial=false"]),
    ("student + CoCo + AdvD", ["--stage=student", "--student_name=student_coco", "--losses=coco",
                               "--adversarial=true"]),
    ("evaluation", ["--stage=eval", "--eval_students=student_alone,student_coco"]),
]
LABELS = {"teacher": "teacher", "student_alone": "student", "student_coco": "student + CoCo"}


def main() -> int:
    if not CONFIG.is_file():
        print(f"cocofast demo: {CONFIG} not found; run the demo from a clone of the repository "
              f"(`make demo` at its root)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    base = [sys.executable, "-m", "cocofast.train.distill", "--config", str(CONFIG), f"--run_dir={RUN_DIR}",
            "--overwrite"]
    for i, (title, args) in enumerate(STEPS, 1):
        print(f"\n=== [{i}/{len(STEPS)}] {title}: {' '.join(['python -m cocofast.train.distill', *base[3:], *args])}",
              flush=True)
        step_started = time.perf_counter()
        done = subprocess.run(base + args, cwd=REPO)
        if done.returncode != 0:
            print(f"cocofast demo: step '{title}' failed (exit status {done.returncode})", file=sys.stderr)
            return done.returncode
        print(f"    {title}: {time.perf_counter() - step_started:.0f} s", flush=True)

    rows = json.loads((RUN_DIR / "eval.json").read_text())
    gmacs_key = next(k for k in rows[0] if k.startswith("gmacs@"))
    size = gmacs_key.split("@")[1]
    print(f"\ncocofast demo: synthetic test split, {size}x{size} inputs "
          f"(total {time.perf_counter() - started:.0f} s)\n")
    print(f"| model | network | params | GMACs @{size}² | ACC | mIoU |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {LABELS.get(row['name'], row['name'])} | {row['model']} x{row['width']:g} | {row['params']:,} | "
              f"{row[gmacs_key]:.3f} | {row['acc']:.4f} | {row['miou']:.4f} |")
    print("\nA few minutes of training on generated patches: these numbers show the pipeline working, not the "
          "paper's result\n(200 epochs at 512x512 on gastric cancer slides); the distilled student may well lose.")
    print(f"Checkpoints, summary.csv, curves.png and overlays_*.png per stage: {RUN_DIR}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
