"""One training process per run: the shared teacher and paraphrasers, then each (row, seed), resumable.

Every run is the training program itself (`python -m cocofast.train.distill`) with `--config` plus the
row's settings plus the invocation's `--key=value`, started in the current directory (so a configuration's
relative data_root means what it means to `cocofast train`). Runs live under the work directory:
WORK/teacher, WORK/paraphraser_NETWORK, WORK/NETWORK/ROW_ID/seedS, WORK/teacher_cache.
"""
from __future__ import annotations

import csv
import json
import math
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cocofast.io import atomic_write_text
from cocofast.train.config import ConfigError, parse_args
from cocofast.train.experiments.tables import Row, reads_paraphrased


class RunFailed(RuntimeError):
    pass


class Runner:
    def __init__(self, config: Path, work: Path, extra: list[str], dry_run: bool = False, jobs: int = 1):
        self.config, self.work, self.extra, self.dry_run, self.jobs = config, work, extra, dry_run, jobs
        self.base = [sys.executable, "-m", "cocofast.train.distill", "--config", str(config)]
        self._done: set[str] = set()
        self._failed: dict[tuple[str, str, int], RunFailed] = {}  # (network, row id, seed) -> its failure

    def _call(self, args: list[str], what: str, log: Path | None = None) -> None:
        """Run the training program; with `log` its output goes to that file (runs side by side) instead."""
        cmd = self.base + args + self.extra
        shown = shlex.join(["python", "-m", "cocofast.train.distill", *cmd[3:]])
        print(f"[experiments] {what}: {shown}", flush=True)
        if self.dry_run:
            return
        started = time.perf_counter()
        if log is None:
            done = subprocess.run(cmd)
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as out:
                done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            where = f" (its output: {log})" if log is not None else ""
            raise RunFailed(f"{what} failed with exit status {done.returncode}{where}; command: {shown}")
        print(f"[experiments] {what}: {time.perf_counter() - started:.0f} s", flush=True)

    def prefetch(self, pairs: list[tuple[Row, int]]) -> None:
        """Train the (row, seed) runs not yet made, `jobs` at a time (one training process each; give each
        process one thread, OMP_NUM_THREADS=1, when jobs fill the cores). The shared teacher and paraphrasers
        are made first, one at a time; a run that fails is remembered and raised when the table reads it."""
        if self.jobs <= 1 or self.dry_run:
            return
        todo = [(r, s) for r, s in dict.fromkeys(pairs) if (r.network, r.id, s) not in self._failed]
        for student in dict.fromkeys(r.student for r, _ in todo if reads_paraphrased(r)):
            self.paraphraser(student)
        if todo:
            self.teacher()

        def one(pair: tuple[Row, int]) -> None:
            row, seed = pair
            try:
                self.row(row, seed, log=self.run_dir(row, seed) / "log.txt")
            except RunFailed as err:
                self._failed[(row.network, row.id, seed)] = err

        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            list(pool.map(one, todo))

    def teacher(self) -> Path:
        run_dir = self.work / "teacher"
        self._once(["--stage=teacher", f"--run_dir={run_dir}", "--seed=0", "--resume"], "teacher")
        return run_dir / "teacher" / "best.pt"

    def teacher_scores(self, seed: int) -> dict:
        """The teacher trained at `seed` (seed 0: the one every row shares) and scored on test."""
        run_dir = self.work / ("teacher" if seed == 0 else f"teacher_seed{seed}")
        args = ["--stage=teacher,eval", f"--run_dir={run_dir}", f"--seed={seed}", "--resume"]
        entries = self._recorded(run_dir, args, f"teacher, seed {seed}")
        return next((e for e in entries if e["name"] == "teacher"), {})

    def _recorded(self, run_dir: Path, args: list[str], what: str, log: Path | None = None,
                  before=lambda: None) -> list[dict]:
        """Run the training program unless run_dir holds its finished result (eval.json) made by the same
        command from the same base configuration (experiment.json); returns the eval.json entries ([] in a
        dry run). Otherwise the program runs, and its --resume refuses a checkpoint with other settings."""
        result, record = run_dir / "eval.json", run_dir / "experiment.json"
        made_by = {"args": args + self.extra, "config": self.config.read_text()}
        if not (result.is_file() and record.is_file() and json.loads(record.read_text()) == made_by):
            before()
            self._call(args, what, log)
            if self.dry_run:
                return []
            atomic_write_text(json.dumps(made_by, indent=1), record)
        return json.loads(result.read_text())

    def paraphraser_dir(self, student: str) -> Path:
        return self.work / f"paraphraser_{student or 'student'}"

    def paraphraser(self, student: str) -> Path:
        run_dir = self.paraphraser_dir(student)
        network = [f"--student_model={student}"] if student else []
        self._once(["--stage=paraphraser", f"--run_dir={run_dir}", f"--teacher_checkpoint={self.teacher()}",
                    *network, "--seed=0", "--resume"], f"paraphrasers for {student or 'the student'}")
        return run_dir / "paraphraser" / "best.pt"

    def _once(self, args: list[str], what: str) -> None:
        """Run a shared stage once per invocation; --resume makes a finished one a quick no-op."""
        if what not in self._done:
            self._call(args, what)
            self._done.add(what)

    def run_dir(self, row: Row, seed: int) -> Path:
        return self.work / row.network / row.id / f"seed{seed}"

    def row(self, row: Row, seed: int, log: Path | None = None) -> dict:
        """Train and score one (row, seed); returns the eval.json entries {name: metrics}."""
        if (row.network, row.id, seed) in self._failed:
            raise self._failed[(row.network, row.id, seed)]
        run_dir = self.run_dir(row, seed)
        args = ["--stage=student,eval", f"--run_dir={run_dir}", f"--seed={seed}",
                f"--teacher_checkpoint={self.work / 'teacher' / 'teacher' / 'best.pt'}", "--student_name=student",
                f"--teacher_cache_dir={self.work / 'teacher_cache'}", "--resume", *row.args()]
        paraphrased = reads_paraphrased(row)
        if paraphrased:
            args.append(f"--paraphraser_checkpoint={self.paraphraser_dir(row.student) / 'paraphraser' / 'best.pt'}")

        def shared_stages() -> None:
            self.teacher()
            if paraphrased:
                self.paraphraser(row.student)

        entries = self._recorded(run_dir, args, f"{row.label} ({row.network}), seed {seed}", log, shared_stages)
        return {entry["name"]: entry for entry in entries}

    def critic_score(self, row: Row, seed: int) -> float:
        """The largest |mean critic score on the student's output| over the run's epochs (nan: no critic).

        The WGAN critic is unconstrained in level (only its slope is penalised), so its scores can drift far
        from zero over a run; the drift penalty (drift_weight) is there to hold them, and this shows whether it did.
        """
        return _largest(self.run_dir(row, seed) / "student" / "summary.csv", "loss_adv_g", abs)

    def val_miou(self, row: Row, seed: int) -> float:
        """The validation mIoU of the run's best.pt: the largest val_miou of its summary.csv (nan if none).

        The training loop scores the student on the validation split after every epoch and saves best.pt
        at the epoch with the largest val_miou, so this is exactly the figure that chose the checkpoint the
        test split then scores. The test scores (eval.json) are never read to choose a setting.
        """
        return _largest(self.run_dir(row, seed) / "student" / "summary.csv", "val_miou")


def _largest(path: Path, column: str, f=lambda v: v) -> float:
    if not path.is_file():
        return math.nan
    with open(path, newline="") as file:
        values = [f(float(r[column])) for r in csv.DictReader(file) if r.get(column, "") != ""]
    values = [v for v in values if not math.isnan(v)]
    return max(values) if values else math.nan


def student_lr(runner: Runner, row: Row) -> float:
    """The student learning rate a row trains with, as the training program resolves the run's own command
    (base configuration, then the row's settings, then this invocation's --key=value)."""
    try:
        return parse_args(["--config", str(runner.config), *row.args(), *runner.extra]).student_lr
    except ConfigError as err:
        raise RunFailed(f"--tune: the learning-rate grid of {row.label} needs the run's configuration: {err}") from None
