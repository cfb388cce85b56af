"""One training process per run: the shared teacher and paraphrasers, then each (row, seed), resumable.

Every run is the training program itself (`python -m cocofast.train.distill`) with `--config` plus the
row's settings plus the invocation's `--key=value`, started in the current directory (so a configuration's
relative data_root means what it means to `cocofast train`). Runs live under the work directory:
WORK/teacher, WORK/paraphraser_NETWORK, WORK/NETWORK/ROW_ID/seedS, WORK/teacher_cache.

With --jobs=N at most N training processes run at once, whoever asks for them (`slots`): the tables' rows and
their searches ask side by side, so a row waiting on its search's slowest point leaves no core idle. A search
run (`search_row`) trains and validates only: its score is the validation mIoU, so it skips the test split.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cocofast.io import atomic_write_text
from cocofast.train.config import ConfigError, parse_args
from cocofast.train.experiments.forkserver import ForkServer
from cocofast.train.experiments.tables import Row, reads_paraphrased


class RunFailed(RuntimeError):
    pass


def threads_per_run(jobs: int, extra: list[str], environ=os.environ, cores: int | None = None) -> list[str]:
    """The --threads each run is given: the cores shared out over the `jobs` runs side by side.

    Left to torch, every run takes every core; two 2-thread runs on 2 cores made epochs of 3 s take 30-80 s
    whenever a third process woke (OpenMP threads spin-waiting for a core another process holds). Nothing is
    added for one job, or where the user chose (OMP_NUM_THREADS, or --threads among the config keys). Thread
    counts steer this invocation only: they are not part of a run's record, so runs made either way are reused.
    """
    if jobs <= 1 or "OMP_NUM_THREADS" in environ or any(a.startswith("--threads=") for a in extra):
        return []
    return [f"--threads={max(1, (cores or os.cpu_count() or 1) // jobs)}"]


class Runner:
    def __init__(self, config: Path, work: Path, extra: list[str], dry_run: bool = False, jobs: int = 1,
                 fork_server: bool = False):
        self.config, self.work, self.extra, self.dry_run, self.jobs = config, work, extra, dry_run, jobs
        self._fork_server, self._server, self._server_lock = fork_server, None, threading.Lock()
        self.base = [sys.executable, "-m", "cocofast.train.distill", "--config", str(config)]
        self._done: set[str] = set()
        self._failed: dict[tuple[str, str, int], RunFailed] = {}  # (network, row id, seed) -> its failure
        self._slots = threading.BoundedSemaphore(jobs)  # training processes running at once
        self._shared = threading.Lock()  # the teacher and paraphrasers are trained by one caller, once
        self._keys: dict = {}  # key -> its lock (exclusive)
        self._keys_lock = threading.Lock()
        self.threads = threads_per_run(jobs, extra)

    def exclusive(self, key) -> threading.Lock:
        """One lock per key: work on one key (a row's search) is done by one thread while the others wait."""
        with self._keys_lock:
            return self._keys.setdefault(key, threading.Lock())

    @property
    def side_by_side(self) -> bool:
        """Whether callers should ask for runs from several threads (--jobs > 1, and something to train)."""
        return self.jobs > 1 and not self.dry_run

    def _call(self, args: list[str], what: str, log: Path | None = None) -> None:
        """Run the training program; with `log` its output goes to that file (runs side by side) instead."""
        cmd = self.base + args + self.threads + self.extra
        shown = shlex.join(["python", "-m", "cocofast.train.distill", *cmd[3:]])
        if self.dry_run:
            print(f"[experiments] {what}: {shown}", flush=True)
            return
        with self._slots:
            print(f"[experiments] {what}: {shown}", flush=True)  # when it starts, not when asked for
            started = time.perf_counter()
            server = self.server()
            if server is not None:
                status = server.run(cmd[3:], log)
            elif log is None:
                status = subprocess.run(cmd).returncode
            else:
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "w") as out:
                    status = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
        if status != 0:
            where = f" (its output: {log})" if log is not None else ""
            raise RunFailed(f"{what} failed with exit status {status}{where}; command: {shown}")
        print(f"[experiments] {what}: {time.perf_counter() - started:.0f} s", flush=True)

    def server(self) -> ForkServer | None:
        """The fork server the runs start from (fork_server), started at the first run."""
        if not self._fork_server:
            return None
        with self._server_lock:
            if self._server is None:
                self._server = ForkServer()
            return self._server

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def prefetch(self, pairs: list[tuple[Row, int]], search: bool = False) -> None:
        """Train the (row, seed) runs not yet made side by side, within the `jobs` slots (one training process
        each, with its share of the cores: threads_per_run). The shared teacher
        and paraphrasers are made first, one at a time; a run that fails is remembered and raised when the
        table reads it. `search`: the runs are search points (search_row)."""
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
                (self.search_row if search else self.row)(row, seed, log=self.run_dir(row, seed) / "log.txt")
            except RunFailed as err:
                self._failed[(row.network, row.id, seed)] = err

        with ThreadPoolExecutor(max_workers=len(todo) or 1) as pool:
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
                  before=lambda: None, scored: bool = True) -> list[dict]:
        """Run the training program unless run_dir holds its finished result (eval.json) made by the same
        command from the same base configuration (experiment.json); returns the eval.json entries ([] in a
        dry run, and for a run not `scored` on test, whose record alone says it finished). Otherwise the
        program runs, and its --resume refuses a checkpoint with other settings."""
        result, record = run_dir / "eval.json", run_dir / "experiment.json"
        made_by = {"args": args + self.extra, "config": self.config.read_text()}
        if not ((result.is_file() or not scored) and record.is_file() and json.loads(record.read_text()) == made_by):
            before()
            self._call(args, what, log)
            if self.dry_run:
                return []
            atomic_write_text(json.dumps(made_by, indent=1), record)
        return json.loads(result.read_text()) if scored else []

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
        with self._shared:
            if what not in self._done:
                self._call(args, what)
                self._done.add(what)

    def run_dir(self, row: Row, seed: int) -> Path:
        return self.work / row.network / row.id / f"seed{seed}"

    def row(self, row: Row, seed: int, log: Path | None = None) -> dict:
        """Train and score one (row, seed); returns the eval.json entries {name: metrics}."""
        return self._student(row, seed, log, "student,eval")

    def search_row(self, row: Row, seed: int, log: Path | None = None) -> None:
        """Train one search point: the student stage alone. The search reads the validation mIoU of its
        best.pt (val_miou), so the eval stage's test-split scores (the teacher's and the student's, a tenth
        of a run) would never be read."""
        self._student(row, seed, log, "student")

    def _student(self, row: Row, seed: int, log: Path | None, stages: str) -> dict:
        if (row.network, row.id, seed) in self._failed:
            raise self._failed[(row.network, row.id, seed)]
        if log is None and self.side_by_side:
            log = self.run_dir(row, seed) / "log.txt"  # other runs may be printing at the same time
        run_dir = self.run_dir(row, seed)
        args = [f"--stage={stages}", f"--run_dir={run_dir}", f"--seed={seed}",
                f"--teacher_checkpoint={self.work / 'teacher' / 'teacher' / 'best.pt'}", "--student_name=student",
                f"--teacher_cache_dir={self.work / 'teacher_cache'}", "--resume", *row.args()]
        paraphrased = reads_paraphrased(row)
        if paraphrased:
            args.append(f"--paraphraser_checkpoint={self.paraphraser_dir(row.student) / 'paraphraser' / 'best.pt'}")

        def shared_stages() -> None:
            self.teacher()
            if paraphrased:
                self.paraphraser(row.student)

        with self.exclusive(run_dir):  # two callers asking for one run: the second reads the first's result
            entries = self._recorded(run_dir, args, f"{row.label} ({row.network}), seed {seed}", log, shared_stages,
                                     scored="eval" in stages)
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
