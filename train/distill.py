"""Train CoCo DistillNet: teacher -> paraphrasers -> student with a critic -> evaluation.

    torchrun --nproc_per_node=K train/distill.py --config configs/paper.yaml [--key=value ...]
    python train/distill.py --config configs/demo.yaml --stage teacher
    python -m cocofast.train.distill --config configs/tiny.yaml --run_dir=runs/tiny

--stage picks stages (one, a comma-separated list such as 'student,eval', or 'all', the default); they run
in this order:
    teacher      train the teacher with cross-entropy                       -> RUN_DIR/teacher/
    paraphraser  one paraphraser per teacher tap, teacher frozen            -> RUN_DIR/paraphraser/
    student      alternate critic and student steps (--losses, --adversarial, --supervised_loss and
                 --labelled_fraction choose the loss terms; --student_name names the folder)  -> RUN_DIR/STUDENT_NAME/
    eval         teacher and students on the test split                     -> RUN_DIR/eval.csv, eval.json
Each stage folder holds last.pt, best.pt (by validation mIoU; lowest reconstruction error for paraphrasers),
config.yaml (the resolved configuration), summary.csv, curves.png and overlays_*.png. --resume continues
every unfinished stage exactly where its last.pt left it and skips finished ones.

Only one run at a time may use a RUN_DIR (a lock, RUN_DIR/.distill.lock, released when the process ends).

Exit status: 0 done, 2 configuration, checkpoint or file-writing error (including a RUN_DIR in use by
another run), 3 stopped by --stop_after_iters, 4 a loss became NaN or infinite, 130 interrupted (Ctrl-C; the
message gives the command that resumes from the last saved last.pt).

Configuration keys (defaults are the paper's; YAML < --key=value):
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, Python puts train/ itself first on sys.path, where config.py or report.py could shadow
    # an unrelated top-level module; everything here is imported through the cocofast.train package instead.
    _here = Path(__file__).resolve().parent
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != _here]

from cocofast.io import WriteError
from cocofast.train.checkpoint import CheckpointError
from cocofast.train.config import ConfigError, describe, parse_args
from cocofast.train.loop import IterationBudget, TrainingInterrupted
from cocofast.train.networks import check_networks
from cocofast.train.rundir import hold_run_dir
from cocofast.train.runtime import configure_determinism, init_runtime, shutdown
from cocofast.train.stages import evaluate_all, train_paraphrasers, train_student, train_teacher


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return run(argv)
    except KeyboardInterrupt:  # the lock is released and the checkpoints are atomic: say how to go on
        if os.environ.get("RANK", "0") == "0":
            print(f"distill.py: interrupted; resume with: {resume_command(argv)}", file=sys.stderr)
        return 130


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same arguments, --resume instead of --overwrite."""
    kept, skip_value = [], False
    for arg in argv:
        if skip_value and arg.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            skip_value = False
            continue  # the value of a '--overwrite true' just dropped
        skip_value = arg in ("--resume", "--overwrite")
        if arg.split("=")[0] not in ("--resume", "--overwrite"):
            kept.append(arg)
    return shlex.join(["python", "-m", "cocofast.train.distill", *kept, "--resume"])


def run(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(__doc__ + describe())
        return 0
    try:
        cfg = parse_args(argv)
        rt = init_runtime(cfg)
    except ConfigError as err:
        print(f"distill.py: error: {err}", file=sys.stderr)
        return 2
    lock = None
    try:
        lock = hold_run_dir(cfg.run_dir, rt)
        configure_determinism(cfg)
        check_networks(cfg)  # every name, import path and tap path, and the tap shapes, before any training
        budget = IterationBudget(cfg.stop_after_iters)
        for stage in cfg.stages():
            if stage == "teacher":
                train_teacher(cfg, rt, budget)
            elif stage == "paraphraser":
                train_paraphrasers(cfg, rt, budget)
            elif stage == "student":
                train_student(cfg, rt, budget)
            else:
                evaluate_all(cfg, rt)
        return 0
    except (ConfigError, CheckpointError, WriteError) as err:
        print(f"distill.py: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"distill.py: error: {err}", file=sys.stderr)
        return 4
    except TrainingInterrupted as err:
        if rt.is_main:
            print(f"distill.py: {err}", file=sys.stderr)
        return 3
    finally:
        if lock is not None:
            lock.release()
        shutdown(rt)


if __name__ == "__main__":
    sys.exit(main())
