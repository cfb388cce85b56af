"""Distillation methods side by side: train each table's rows over K seeds, report mean ± std.

    python -m cocofast.experiments I II III                 # the paper's Tables I-III on the built-in data
    python -m cocofast.experiments emkd graph_flow cpkd --seeds=0,1,2 --out=docs/results
    python -m cocofast.experiments I --config=configs/experiments.yaml --student_epochs=20   # any config key
    python -m cocofast.experiments scarce --tune          # every method tuned on validation first (T_tuned.*)
    python -m cocofast.experiments all --tune --dry_run --run_seconds=20   # the plan in hours, train nothing
    OMP_NUM_THREADS=1 python -m cocofast.experiments scarce --jobs=16      # 16 single-threaded runs at a time

Every run is the training program itself (`python -m cocofast.train.distill`, one subprocess per run) with
`--config` (default configs/experiments.yaml) plus the row's settings plus any `--key=value` given here.
What is shared, and what varies:

- one teacher (seed 0) for every row and seed, and one set of paraphrasers per student network (seed 0), so
  rows differ only in how the student is trained;
- seed s varies the student's initialisation, data order, augmentation and critic; the data themselves are
  fixed by `data_seed` (the same training, validation and test patches for every run);
- each method reads the teacher features its paper uses, as its loss declares (`reads` in cocofast.losses):
  AT, IFVD and EMKD the raw teacher taps, FSP and CPKD (which match channels one to one), SS, CMSS and CoCo
  the paraphraser encodings, KD only logits;
- a row is a (student network, method) pair with a fixed id: rows that appear in several tables (the plain
  student, CoCo) are trained once per seed and reused. A finished run (its eval.json, and an
  experiment.json recording the command and base configuration that made it) is skipped when the same
  command would make it again, so an interrupted invocation continues where it stopped; changed settings
  make the training program refuse the old checkpoint (delete the run folder, or use another --work).

Two views of each table. Without --tune every loss runs at its paper's default weight and temperature.
With --tune (the fair protocol) each row is first searched on the validation split at one seed
(--tune_seed, outside the table's seeds): its loss weights scaled together by each of GRID, then each
temperature it takes (KD's and EMKD's T, CPKD's tau) over its default x GRID at the chosen weight; the
student alone gets GRID over its learning rate. The chosen setting is then trained over the seeds and scored
on test. The all-default point of a search is the default view's row itself, so the two views share runs.

Each row is paired with its table's student alone (same network, labelled fraction and supervised loss,
else cross-entropy; `reference_of`) seed by seed: per-seed differences, a two-sided sign test and a paired
t-test (cocofast/experiment_stats.py). Before running, the plan is printed: the student runs each table
needs with and without --tune, shared rows counted once.

Outputs in --out, per table T (T_tuned with --tune): T.csv (one line per row and seed: ACC, mIoU, mDice,
the best validation mIoU, params, GMACs, the setting and the reference row), T.md (mean ± std over seeds,
the paired tests, the search with its val mIoU per grid point, the command, the configuration, the wall
time), T_search.csv (with --tune: every grid point tried) and T.png (the mIoU and ACC of each row: the mean
as a bar, each seed as a dot).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cocofast.experiment_stats import format_p, mean_std, paired_t_test, sign_test
from cocofast.io import atomic_path, atomic_write_text
from cocofast.losses import LOSSES, loss_parameters, parse_losses, resolve_aliases

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "experiments.yaml"


@dataclass(frozen=True)
class Row:
    id: str                     # run folder name; one id = one set of settings
    label: str                  # what the table calls it
    student: str = "mobile_unet"
    settings: tuple[tuple[str, str], ...] = field(default=())

    def args(self) -> list[str]:
        return [f"--student_model={self.student}"] + [f"--{k}={v}" for k, v in self.settings]


def _row(id: str, label: str, student: str = "mobile_unet", **settings) -> Row:
    return Row(id, label, student, tuple(sorted((k, str(v).lower() if isinstance(v, bool) else str(v))
                                                for k, v in settings.items())))


ALONE = dict(losses="none", adversarial=False)
COCO = dict(losses="coco", adversarial=True)  # CoCo DistillNet in full: CoCoD + AdvD
TEACHER = "teacher"  # pseudo-row: the shared teacher's own scores
TEACHER_SEEDS = "teacher seeds"  # pseudo-row: the teacher retrained at each of --teacher_seeds

# The label-scarce table's methods: (id, label, settings). KD is the positive control: the logit-only loss
# that needs no features and is known to help when labels are few (Hinton et al. 2015).
SCARCE_METHODS = [
    ("alone", "student alone", ALONE),
    ("kd", "KD", dict(losses="kd", adversarial=False)),
    ("cocod", "CoCoD", dict(losses="coco", adversarial=False)),
    ("coco", "CoCo DistillNet", COCO),
    ("graph_flow", "Graph Flow", dict(losses="graph_flow,kd", adversarial=True)),
    ("ss", "SKD pairwise", dict(losses="skd_pairwise", adversarial=False)),
    ("cpkd", "CPKD", dict(losses="cpkd", adversarial=False)),
    ("emkd", "EMKD (focal + dice)", dict(losses="emkd", supervised_loss="focal_dice", adversarial=False)),
    ("kd_coco", "KD + CoCoD", dict(losses="kd,coco", adversarial=False)),
]


def scarce_rows(fractions) -> list[Row]:
    rows = []
    for fraction in fractions:
        percent = round(100 * fraction)
        rows += [_row(f"{id}_semi{percent}", f"{label}, {percent} % labelled", labelled_fraction=fraction, **settings)
                 for id, label, settings in SCARCE_METHODS]
    return rows

TABLES: dict[str, tuple[str, list]] = {
    "I": ("Ablation of CoCo DistillNet (paper Table I), Mobile U-Net student", [
        _row("alone", "student alone", **ALONE),
        _row("ss", "SS (SKD pairwise)", losses="skd_pairwise", adversarial=False),
        _row("cmss", "CMSS", losses="cmss", adversarial=False),
        _row("cocod", "CoCoD", losses="coco", adversarial=False),
        _row("coco", "CoCoD + AdvD", **COCO),
    ]),
    "II": ("Distillation baselines (paper Table II), Mobile U-Net student", [
        _row("alone", "student alone", **ALONE),
        _row("kd", "KD", losses="kd", adversarial=False),
        _row("at", "AT", losses="at", adversarial=False),
        _row("fsp", "FSP", losses="fsp", adversarial=False),
        _row("ifvd", "IFVD", losses="ifvd", adversarial=False),
        _row("coco", "CoCo DistillNet", **COCO),
    ]),
    "III": ("Students with and without CoCo DistillNet (paper Table III)", [
        TEACHER,
        _row("alone", "Mobile U-Net", **ALONE),
        _row("coco", "Mobile U-Net + CoCo", **COCO),
        _row("alone", "ENet", "enet", **ALONE),
        _row("coco", "ENet + CoCo", "enet", **COCO),
        _row("alone", "ERFNet", "erfnet", **ALONE),
        _row("coco", "ERFNet + CoCo", "erfnet", **COCO),
    ]),
    "emkd": ("EMKD (Qin et al. 2021) against CoCo, Mobile U-Net student", [
        _row("alone", "student alone", **ALONE),
        # EMKD trains on focal + dice, not cross-entropy: this row separates that change from the distillation.
        _row("alone_focal_dice", "student alone, focal + dice", supervised_loss="focal_dice", **ALONE),
        _row("coco", "CoCo DistillNet", **COCO),
        _row("emkd", "EMKD (PMD + IMD + RAD, focal + dice)", losses="emkd", supervised_loss="focal_dice",
             adversarial=False),
    ]),
    "graph_flow": ("Graph Flow (Zou, Sun et al. 2023) against CoCo, Mobile U-Net student", [
        _row("alone", "student alone", **ALONE),
        _row("coco", "CoCo DistillNet", **COCO),
        _row("graph_flow", "Graph Flow (vertices + edges + KD + AdvD)", losses="graph_flow,kd", adversarial=True),
        _row("alone_semi60", "student alone, 60% labelled", labelled_fraction=0.6, **ALONE),
        _row("graph_flow_semi60", "Graph Flow, 60% labelled", losses="graph_flow,kd", adversarial=True,
             labelled_fraction=0.6),
    ]),
    "cpkd": ("CPKD (Xiong & Yu 2024) against CoCo, Mobile U-Net student", [
        _row("alone", "student alone", **ALONE),
        _row("coco", "CoCo DistillNet", **COCO),
        _row("cpkd", "CPKD (channel + pixel relations)", losses="cpkd", adversarial=False),
    ]),
    "drift": ("The critic's drift penalty (Karras et al. 2018): CoCo DistillNet at 20 % labels without it (the "
              "paper) and with drift_weight = 1e-3; the last column shows how far the critic's scores wandered", [
        _row("alone_semi20", "student alone, 20 % labelled", labelled_fraction=0.2, **ALONE),
        _row("coco_semi20", "CoCo DistillNet, 20 % labelled", labelled_fraction=0.2, **COCO),
        _row("coco_drift_semi20", "CoCo DistillNet + drift penalty, 20 % labelled", labelled_fraction=0.2,
             drift_weight=1e-3, **COCO),
    ]),
    "teacher": ("The teacher (FANet) trained at several seeds on every label: how much its own test mIoU "
                "moves, since every table's students learn from the seed-0 one", [TEACHER_SEEDS]),
    "scarce": ("Few labels: the teacher trained on every label, students on 10 % and 20 % of them "
               "(half-labelled batches), distillation on every image; Mobile U-Net student",
               [TEACHER, *scarce_rows((0.1, 0.2))]),
    # The 10 % half of `scarce` (the same rows, so the same runs): its tuned view fits where the whole does not.
    "scarce10": ("Few labels, 10 % only: the teacher trained on every label, students on 10 % of them "
                 "(half-labelled batches), distillation on every image; Mobile U-Net student",
                 [TEACHER, *scarce_rows((0.1,))]),
}


def _check_ids_are_consistent() -> None:
    """The same (student, id) must mean the same settings in every table: it names one shared run."""
    seen: dict[tuple[str, str], Row] = {}
    for _, rows in TABLES.values():
        for row in rows:
            if row in (TEACHER, TEACHER_SEEDS):
                continue
            other = seen.setdefault((row.student, row.id), row)
            if other.settings != row.settings:
                raise AssertionError(f"row id {row.id!r} ({row.student}) has two different settings")


_check_ids_are_consistent()


def reads_paraphrased(row: Row) -> bool:
    """Whether the row's student stage reads paraphraser encodings: a loss defined on them, and the switch on."""
    settings = dict(row.settings)
    if settings.get("use_paraphraser", "true") == "false":
        return False
    return any(LOSSES[spec.name].reads.teacher == "paraphrased" for spec in parse_losses(settings.get("losses", "none")))


# --- running ---------------------------------------------------------------------------------------------
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
        shown = " ".join(shlex.quote(a) for a in ["python", "-m", "cocofast.train.distill", *cmd[3:]])
        print(f"[experiments] {what}: {shown}", flush=True)
        if self.dry_run:
            return
        started = time.perf_counter()
        if log is None:
            done = subprocess.run(cmd, cwd=REPO)
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as out:
                done = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
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
        todo = [(r, s) for r, s in dict.fromkeys(pairs) if (r.student, r.id, s) not in self._failed]
        for student in dict.fromkeys(r.student for r, _ in todo if reads_paraphrased(r)):
            self.paraphraser(student)
        if todo:
            self.teacher()

        def one(pair: tuple[Row, int]) -> None:
            row, seed = pair
            try:
                self.row(row, seed, log=self.run_dir(row, seed) / "log.txt")
            except RunFailed as err:
                self._failed[(row.student, row.id, seed)] = err

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

    def paraphraser(self, student: str) -> Path:
        run_dir = self.work / f"paraphraser_{student}"
        self._once(["--stage=paraphraser", f"--run_dir={run_dir}", f"--teacher_checkpoint={self.teacher()}",
                    f"--student_model={student}", "--seed=0", "--resume"], f"paraphrasers for {student}")
        return run_dir / "paraphraser" / "best.pt"

    def _once(self, args: list[str], what: str) -> None:
        """Run a shared stage once per invocation; --resume makes a finished one a quick no-op."""
        if what not in self._done:
            self._call(args, what)
            self._done.add(what)

    def run_dir(self, row: Row, seed: int) -> Path:
        return self.work / row.student / row.id / f"seed{seed}"

    def row(self, row: Row, seed: int, log: Path | None = None) -> dict:
        """Train and score one (row, seed); returns the eval.json entries {name: metrics}."""
        if (row.student, row.id, seed) in self._failed:
            raise self._failed[(row.student, row.id, seed)]
        run_dir = self.run_dir(row, seed)
        args = ["--stage=student,eval", f"--run_dir={run_dir}", f"--seed={seed}",
                f"--teacher_checkpoint={self.work / 'teacher' / 'teacher' / 'best.pt'}", "--student_name=student",
                f"--teacher_cache_dir={self.work / 'teacher_cache'}", "--resume", *row.args()]
        if reads_paraphrased(row):
            args.append(f"--paraphraser_checkpoint={self.work / f'paraphraser_{row.student}' / 'paraphraser' / 'best.pt'}")

        def shared_stages() -> None:
            self.teacher()
            if "--paraphraser_checkpoint" in args[-1]:
                self.paraphraser(row.student)

        entries = self._recorded(run_dir, args, f"{row.label} ({row.student}), seed {seed}", log, shared_stages)
        return {entry["name"]: entry for entry in entries}

    def critic_score(self, row: Row, seed: int) -> float:
        """The largest |mean critic score on the student's output| over the run's epochs (nan: no critic).

        The WGAN critic is unconstrained in level (only its slope is penalised), so its scores can drift far
        from zero over a run; the drift penalty (drift_weight) is there to hold them, and this shows whether it did.
        """
        path = self.run_dir(row, seed) / "student" / "summary.csv"
        if not path.is_file():
            return math.nan
        with open(path, newline="") as f:
            values = [abs(float(r["loss_adv_g"])) for r in csv.DictReader(f) if r.get("loss_adv_g", "") != ""]
        return max(values) if values else math.nan

    def val_miou(self, row: Row, seed: int) -> float:
        """The validation mIoU of the run's best.pt: the largest val_miou of its summary.csv (nan if none).

        The training loop scores the student on the validation split after every epoch and saves best.pt
        at the epoch with the largest val_miou, so this is exactly the figure that chose the checkpoint the
        test split then scores; evaluating best.pt on the validation split again would give the same number
        at the cost of another pass. The test scores (eval.json) are never read to choose a setting.
        """
        path = self.run_dir(row, seed) / "student" / "summary.csv"
        if not path.is_file():
            return math.nan
        with open(path, newline="") as f:
            values = [float(r["val_miou"]) for r in csv.DictReader(f) if r.get("val_miou", "") != ""]
        values = [v for v in values if not math.isnan(v)]
        return max(values) if values else math.nan


def student_lr(runner: Runner, row: Row) -> float:
    """The student learning rate a row trains with: the row's, else this invocation's --student_lr, else the
    base configuration's (the same precedence as the training program: YAML < command line)."""
    given = [a.partition("=")[2] for a in runner.extra if a.startswith("--student_lr=")]
    value = dict(row.settings).get("student_lr") or (given[-1] if given else None)
    if value is None:
        value = (yaml.safe_load(runner.config.read_text()) or {}).get("student_lr")
    if value is None:
        # The training program's own default lives in cocofast.train, which this package does not import.
        raise RunFailed(f"--tune: the learning-rate grid of {row.label} needs student_lr, set in --config "
                        f"({runner.config}) or given as --student_lr=")
    try:
        return float(str(value))
    except ValueError:
        raise RunFailed(f"--tune: student_lr must be a number, got {value!r}") from None


# --- the fair protocol (--tune) ------------------------------------------------------------------------
# Every method gets the same search on the validation split, one seed. First the student alone searches its
# learning rate over default x GRID; every row paired with it then trains at the rate it chose and searches
# its loss weight scaled by each of GRID, then each temperature it has (KD's T, EMKD's T, CPKD's tau) over
# default x GRID at the chosen weight. Searching the rate for the baseline alone would compare a tuned rate
# with an untuned one: a 16-epoch run at a 10x too low rate loses more than any loss weight can win back.
# The default (x1) is a point of every axis, so on the tuning seed's validation split a tuned row is never
# worse than its default-weight self at the same rate.
GRID = (0.01, 0.1, 1.0, 10.0)
TEMPERATURES = ("temperature", "tau")  # constructor arguments that are a softmax temperature
DEFAULT_TUNE_SEED = 100  # outside the table seeds: a chosen run's own test score is never one of the table's


@dataclass(frozen=True)
class Axis:
    key: str                    # 'student_lr', 'weight' (a factor on every loss weight) or 'loss.parameter'
    values: tuple[float, ...]
    default: float

    def show(self, value: float) -> str:
        if self.key == "weight":
            return f"weight ×{value:g}"
        if self.key == "student_lr":
            return f"lr {value:g}"
        return f"{self.key.replace('.temperature', ' T').replace('.tau', ' tau')} {value:g}"


def _number(value: float) -> float:
    return float(f"{value:.6g}")  # 2e-3 * 0.01 is 2e-05, not 2.0000000000000002e-05


def _losses(row: Row):
    return parse_losses(dict(row.settings).get("losses", "none"))


def is_alone(row: Row) -> bool:
    return not _losses(row) and dict(row.settings).get("adversarial", "true") == "false"


def tuning_axes(row: Row, lr: float) -> list[Axis]:
    """The search of one row: GRID over the learning rate for a student alone, else over the loss weights
    (all of the row's losses together) and then over each temperature the row's losses take."""
    specs = _losses(row)
    if not specs:
        return [Axis("student_lr", tuple(_number(lr * m) for m in GRID), _number(lr))]
    axes = [Axis("weight", GRID, 1.0)]
    for spec in specs:
        loss = spec.build()
        for param in TEMPERATURES:
            if param in loss_parameters(spec.name):
                base = float(getattr(loss, param))
                axes.append(Axis(f"{spec.name}.{param}", tuple(_number(base * m) for m in GRID), base))
    return axes


def with_student_lr(row: Row, lr: float) -> Row:
    """The row at another student learning rate (the rate its student alone chose)."""
    settings = {**dict(row.settings), "student_lr": f"{lr:g}"}
    return Row(f"{row.id}-lr{lr:g}", row.label, row.student, tuple(sorted(settings.items())))


def point_row(row: Row, axes: list[Axis], point: dict[str, float]) -> Row:
    """The row trained at one point of its search; the row itself at the all-default point (shared runs)."""
    if all(point[a.key] == a.default for a in axes):
        return row
    if "student_lr" in point:  # the student alone's one axis
        return with_student_lr(row, point["student_lr"])
    items = []
    for spec in _losses(row):
        params = resolve_aliases(spec.name, spec.params)
        for param in TEMPERATURES:
            if f"{spec.name}.{param}" in point:
                params[param] = point[f"{spec.name}.{param}"]
        weight = _number(spec.build().weight * point["weight"])
        items.append(":".join([spec.name, f"{weight:g}", *(f"{k}={_show_value(v)}" for k, v in params.items())]))
    settings = {**dict(row.settings), "losses": ",".join(items)}
    suffix = "-".join(f"{a.key.replace('weight', 'x').replace('.', '_')}{point[a.key]:g}"
                      for a in axes if point[a.key] != a.default)
    return Row(f"{row.id}-{suffix}", row.label, row.student, tuple(sorted(settings.items())))


def _show_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class Tuning:
    row: Row
    axes: list[Axis]
    per_axis: list[list[tuple[float, float]]]  # per axis: (value, val mIoU) in grid order
    chosen: dict[str, float]
    chosen_row: Row
    runs: int  # distinct training runs the search made
    lr: float | None = None  # the rate the search trained at, chosen by the row's student alone

    def setting(self) -> str:
        rate = [] if self.lr is None else [f"lr {self.lr:g} (student alone's)"]
        return ", ".join(rate + [describe(self.axes, self.chosen)])


def describe(axes: list[Axis], point: dict[str, float]) -> str:
    return ", ".join(a.show(point[a.key]) for a in axes)


def choose(axis: Axis, scored: list[tuple[float, float]]) -> float | None:
    """The value with the best val mIoU; ties go to the value nearest the default (then the smaller)."""
    valid = [(v, s) for v, s in scored if not math.isnan(s)]
    if not valid:
        return None
    return min(valid, key=lambda vs: (-vs[1], abs(math.log10(vs[0] / axis.default)), vs[0]))[0]


def tune(runner: Runner, row: Row, seed: int, lr: float | None = None) -> Tuning:
    """Search the row's axes one after the other on the validation split at one seed (see GRID), training a
    distillation row at student learning rate `lr` (the one its student alone chose) where that is given."""
    configured = student_lr(runner, row)
    if lr is not None and not is_alone(row) and _number(lr) != _number(configured):
        row = with_student_lr(row, _number(lr))
    else:
        lr = None
    axes = tuning_axes(row, configured)
    current = {a.key: a.default for a in axes}
    scores: dict[str, float] = {}
    per_axis = []
    for axis in axes:
        scored = []
        runner.prefetch([(point_row(row, axes, {**current, axis.key: v}), seed) for v in axis.values])
        for value in axis.values:
            candidate = point_row(row, axes, {**current, axis.key: value})
            if candidate.id not in scores:
                try:
                    runner.row(candidate, seed)
                    scores[candidate.id] = runner.val_miou(candidate, seed)
                except RunFailed as err:  # e.g. a weight x10 that sends the loss to inf: that point lost
                    print(f"[experiments] tuning point failed, scored as missing: {err}", flush=True)
                    scores[candidate.id] = math.nan
            scored.append((value, scores[candidate.id]))
        per_axis.append(scored)
        best = choose(axis, scored)
        if best is None and not runner.dry_run:
            raise RunFailed(f"every tuning run of {row.label} ({row.student}) over {axis.key} failed")
        current[axis.key] = axis.default if best is None else best
    return Tuning(row, axes, per_axis, current, point_row(row, axes, current), len(scores), lr)


def tuned(runner: Runner, rows: list, row: Row, seed: int, tunings: dict) -> Tuning:
    """The row's search, made once per (network, row id): its student alone's first, whose rate it trains at."""
    key = (row.student, row.id)
    if key not in tunings:
        reference = None if is_alone(row) else reference_of(rows, row)
        lr = None if reference is None else tuned(runner, rows, reference, seed, tunings).chosen["student_lr"]
        tunings[key] = tune(runner, row, seed, lr)
    return tunings[key]


def reference_of(rows: list, row: Row) -> Row | None:
    """The student-alone row a row is paired with: same network and labelled fraction, the same supervised
    loss where the table has one (EMKD's focal + dice), else cross-entropy. None for the plain baseline."""
    if row == TEACHER:
        return None
    fraction = lambda r: float(dict(r.settings).get("labelled_fraction", 1.0))
    supervised = lambda r: dict(r.settings).get("supervised_loss", "ce")
    if is_alone(row) and supervised(row) == "ce":
        return None
    alone = [r for r in rows if r != TEACHER and r != row and is_alone(r) and r.student == row.student
             and fraction(r) == fraction(row)]
    same = [r for r in alone if supervised(r) == supervised(row)] or [r for r in alone if supervised(r) == "ce"]
    return same[0] if same else None


# --- the plan: how many training runs, before any is made ------------------------------------------------
def tuning_runs(row: Row) -> int:
    """Distinct runs of a row's search: GRID over the first axis, GRID less the current point over the rest."""
    axes = tuning_axes(row, 1.0)
    return len(GRID) + (len(axes) - 1) * (len(GRID) - 1)


def plan(names: list[str], seeds: list[int]) -> list[dict]:
    """Per table, the student runs it needs and those no earlier table already made, with and without --tune.

    Without --tune a run is (network, row id, seed). With --tune a row costs its search (tuning_runs, at the
    tuning seed) plus the chosen setting over the seeds; the chosen runs are counted as new (an upper bound:
    where the default is chosen they are the default view's runs).
    """
    seen_default: set = set()
    seen_tuned: set = set()
    out = []
    for name in names:
        rows = [r for r in TABLES[name][1] if r not in (TEACHER, TEACHER_SEEDS)]
        default = {(r.student, r.id, s) for r in rows for s in seeds}
        tuned = {(r.student, r.id) for r in rows}
        cost = {(r.student, r.id): tuning_runs(r) + len(seeds) for r in rows}
        out.append({"table": name, "rows": len(rows), "default": len(default),
                    "default_new": len(default - seen_default),
                    "tuned": sum(cost.values()), "tuned_new": sum(cost[k] for k in tuned - seen_tuned)})
        seen_default |= default
        seen_tuned |= tuned
    return out


def shared_stages(names: list[str]) -> tuple[int, int]:
    """(teachers, paraphraser sets) the tables need: one teacher, one paraphraser set per student network."""
    rows = [r for name in names for r in TABLES[name][1] if r not in (TEACHER, TEACHER_SEEDS)]
    return 1, len({r.student for r in rows if reads_paraphrased(r)})


def format_plan(names: list[str], seeds: list[int], run_seconds: float | None, jobs: int = 1) -> str:
    rows = plan(names, seeds)
    teachers, paraphrasers = shared_stages(names)
    total_default = sum(r["default_new"] for r in rows)
    total_tuned = sum(r["tuned_new"] for r in rows)
    lines = [f"[experiments] plan over {len(seeds)} seeds: student runs each table needs (new = not made by an "
             f"earlier table here), plus {teachers} teacher and {paraphrasers} paraphraser set(s) shared by all",
             f"  {'table':<12}{'rows':>5}{'default view':>16}{'new':>6}{'--tune':>9}{'new':>6}"]
    for r in rows:
        lines.append(f"  {r['table']:<12}{r['rows']:>5}{r['default']:>16}{r['default_new']:>6}{r['tuned']:>9}"
                     f"{r['tuned_new']:>6}")
    lines.append(f"  {'total':<12}{'':>5}{'':>16}{total_default:>6}{'':>9}{total_tuned:>6}"
                 f"   (both views: {total_default + total_tuned})")
    if run_seconds:
        hours = lambda n: f"{math.ceil(n / jobs) * run_seconds / 3600:.1f} h"
        lines.append(f"  at {run_seconds:g} s a run, {jobs} at a time: default view {hours(total_default)}, --tune "
                     f"{hours(total_tuned)}, both {hours(total_default + total_tuned)} (teacher and "
                     f"paraphrasers not included)")
    return "\n".join(lines)


# --- reporting -------------------------------------------------------------------------------------------
def teacher_record(table: str, scores: dict, row_id: str, seed: int, settings: str) -> dict:
    """One record of the teacher's own scores, in the columns every student record has."""
    return {"table": table, "row": "teacher", "id": row_id, "network": scores["model"], "seed": seed,
            "acc": scores["acc"], "miou": scores["miou"], "mdice": scores["mdice"], "val_miou": math.nan,
            "critic": math.nan, "params": scores["params"], "gmacs": _gmacs(scores), "setting": "all labels",
            "reference": "", "settings": settings}


def teacher_records(name: str, runner: Runner, seeds: list[int]) -> list[dict]:
    scored = ((seed, runner.teacher_scores(seed)) for seed in seeds)
    return [teacher_record(name, t, "teacher_seed", seed, f"--seed={seed}") for seed, t in scored if t]


def run_table(name: str, runner: Runner, seeds: list[int], tune_seed: int | None = None,
              tunings: dict | None = None, teacher_seeds: tuple[int, ...] = (0, 1, 2)) -> tuple[list[dict], list[Tuning]]:
    """Every row of the table over the seeds: as configured, or (tune_seed given) at its tuned setting.

    Returns the records (one per row and seed, the teacher first where the table shows it) and the searches.
    """
    title, rows = TABLES[name]
    if rows == [TEACHER_SEEDS]:
        return teacher_records(name, runner, teacher_seeds), []
    tunings = {} if tunings is None else tunings  # (network, row id) -> Tuning, shared between tables
    records, searches = [], []
    if tune_seed is None:
        runner.prefetch([(row, seed) for row in rows if row != TEACHER for seed in seeds])
    for row in rows:
        if row == TEACHER:
            continue
        used, setting = row, "as configured"
        if tune_seed is not None:
            search = tuned(runner, rows, row, tune_seed, tunings)
            searches.append(search)
            used, setting = search.chosen_row, search.setting()
        reference = reference_of(rows, row)
        runner.prefetch([(used, seed) for seed in seeds])
        for seed in seeds:
            scores = runner.row(used, seed)
            if not scores:
                continue
            student = scores["student"]
            records.append({"table": name, "row": row.label, "id": used.id, "network": row.student, "seed": seed,
                            "acc": student["acc"], "miou": student["miou"], "mdice": student["mdice"],
                            "val_miou": runner.val_miou(used, seed), "critic": runner.critic_score(used, seed),
                            "params": student["params"],
                            "gmacs": _gmacs(student), "setting": setting,
                            "reference": reference.label if reference is not None else "",
                            "settings": " ".join(used.args()[1:])})
            if TEACHER in rows and "teacher" in scores and not any(r["row"] == "teacher" for r in records):
                records.insert(0, teacher_record(name, scores["teacher"], "teacher", 0, "trained once"))
    return records, searches


def _gmacs(entry: dict) -> float:
    return next(v for k, v in entry.items() if k.startswith("gmacs@"))


def write_csv(records: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
    writer.writeheader()
    for r in records:
        writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in r.items()})
    atomic_write_text(buffer.getvalue(), path)


def tuning_records(name: str, searches: list[Tuning], seed: int) -> list[dict]:
    out = []
    for t in searches:
        for axis, scored in zip(t.axes, t.per_axis):
            for value, score in scored:
                out.append({"table": name, "row": t.row.label, "network": t.row.student, "seed": seed,
                            "axis": axis.key, "value": value, "val_miou": score,
                            "chosen": value == t.chosen[axis.key]})
    return out


def grouped(records: list[dict]) -> list[tuple[str, list[dict]]]:
    order: dict[str, list[dict]] = {}
    for r in records:
        order.setdefault(r["row"], []).append(r)
    return list(order.items())


def paired(records: list[dict]) -> list[dict]:
    """Per row with a reference: the per-seed mIoU differences (row - reference, same seed) and both tests."""
    by_label = dict(grouped(records))
    out = []
    for label, rs in by_label.items():
        reference = rs[0].get("reference", "")
        if not reference or reference not in by_label:
            continue
        base = {r["seed"]: r["miou"] for r in by_label[reference]}
        pairs = [(r["seed"], r["miou"] - base[r["seed"]]) for r in rs if r["seed"] in base]
        diffs = [d for _, d in pairs]
        t, p_t = paired_t_test(diffs)
        out.append({"row": label, "reference": reference, "pairs": pairs, "wins": sum(d > 0 for d in diffs),
                    "sign_p": sign_test(diffs), "t": t, "t_p": p_t})
    return out


def source_version(repo: Path = REPO, outputs: Path | None = None) -> str:
    """The commit the runs came from, marked when the working tree had uncommitted changes.

    Tracked files under `outputs` do not count: they are this runner's own tables, rewritten as it goes.
    """
    status = ["git", "status", "--porcelain", "--untracked-files=no", "--", "."]
    root = repo.resolve()
    # Tables written to the repository root itself would otherwise hide every change.
    if outputs is not None and outputs.resolve() != root and outputs.resolve().is_relative_to(root):
        status.append(f":(exclude){outputs.resolve().relative_to(root).as_posix()}")
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(status, cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes" if dirty else "")


def markdown(name: str, records: list[dict], command: str, config: Path, seconds: float, version: str,
             searches: list[Tuning] | None = None, tune_seed: int | None = None) -> str:
    title, _ = TABLES[name]
    seeds = sorted({r["seed"] for r in records if r["id"] != "teacher"})
    tuned = tune_seed is not None
    view = ("each method at the setting chosen on the validation split (see Tuning below)" if tuned
            else "every loss at its paper's default weight")
    lines = [f"# Table {name}{' (tuned)' if tuned else ''}: {title}", "",
             f"Mean ± sample standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
             f"{view}; test split of the built-in synthetic data unless the configuration says otherwise.", "",
             "| method | network | setting | params | GMACs | ACC | mIoU | mIoU per seed | max \\|critic score\\| |",
             "|---|---|---|---:|---:|---:|---:|---|---:|"]
    for label, rs in grouped(records):
        per_seed = ", ".join(f"{r['miou']:.4f}" for r in rs)
        critic = [r.get("critic", math.nan) for r in rs]
        critic = "–" if all(math.isnan(c) for c in critic) else f"{max(c for c in critic if not math.isnan(c)):.3g}"
        lines.append(f"| {label} | {rs[0]['network']} | {rs[0]['setting']} | {rs[0]['params']:,} | "
                     f"{rs[0]['gmacs']:.3f} | {mean_std([r['acc'] for r in rs])} | "
                     f"{mean_std([r['miou'] for r in rs])} | {per_seed} | {critic} |")
    tests = paired(records)
    if tests:
        lines += ["", "## Against the student alone, paired by seed", "",
                  "Δ = the row's test mIoU minus its reference's at the same seed (which draws the same data "
                  "order, augmentation and initialisation streams). Sign test: two-sided exact binomial over the "
                  "non-zero Δ; paired t-test: t = mean Δ / (sd Δ / √n), n - 1 degrees of freedom "
                  f"(cocofast/experiment_stats.py). With {len(seeds)} seeds the sign test cannot go below "
                  f"p = {format_p(min(1.0, 2 / 2 ** len(seeds)))}.", "",
                  "| method | against | Δ mIoU per seed | mean Δ ± sd | better in | sign test p | paired t | t-test p |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for t in tests:
            diffs = [d for _, d in t["pairs"]]
            t_value = "–" if math.isnan(t["t"]) else f"{t['t']:+.2f}"
            lines.append(f"| {t['row']} | {t['reference']} | "
                         f"{', '.join(f'{s}: {d:+.4f}' for s, d in t['pairs'])} | "
                         f"{mean_std(diffs) if diffs else '–'} | {t['wins']}/{len(diffs)} | "
                         f"{format_p(t['sign_p'])} | {t_value} | "
                         f"{format_p(t['t_p'])} |")
    if tuned and searches:
        runs = sum(s.runs for s in searches)
        lines += ["", "## Tuning", "",
                  f"One run per grid point at seed {tune_seed} (not a table seed), scored by the validation mIoU "
                  f"of its best.pt (the largest val_miou of its summary.csv: the figure that chose the checkpoint; "
                  f"the test split is never read to choose). Grid: the default × "
                  f"{{{', '.join(f'{m:g}' for m in GRID)}}}: first the student alone over its learning rate; then every "
                  f"row paired with it, at the rate it chose, over the loss weight(s) of the row (all of its "
                  f"losses scaled together), then each temperature at the chosen weight. Ties go to the value "
                  f"nearest the default. {runs} tuning runs for this table "
                  f"(shared with other tables where the row is the same).", "",
                  "| method | axis | val mIoU per grid value | chosen |", "|---|---|---|---|"]
        for s in searches:
            if s.lr is not None:
                lines.append(f"| {s.row.label} | student_lr | the student alone's choice | lr {s.lr:g} |")
            for axis, scored in zip(s.axes, s.per_axis):
                tried = ", ".join(f"{v:g}: {'failed' if math.isnan(score) else f'{score:.4f}'}"
                                  for v, score in scored)
                lines.append(f"| {s.row.label} | {axis.key} | {tried} | {axis.show(s.chosen[axis.key])} |")
    lines += ["", f"Produced at commit {version} by:", "", "```", command, "```", "",
              f"Base configuration: `{config.relative_to(REPO) if config.is_relative_to(REPO) else config}`; "
              f"wall time of this invocation {seconds / 60:.1f} min (runs shared with other tables are counted "
              f"where they were first trained)."]
    return "\n".join(lines) + "\n"


def plot(name: str, records: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[experiments] matplotlib is not installed (pip install 'cocofast[plot]'): {path.name} skipped")
        return
    groups = grouped(records)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(groups), 4.2), constrained_layout=True)
    for ax, key in zip(axes, ("miou", "acc")):
        for i, (label, rs) in enumerate(groups):
            values = [r[key] for r in rs]
            ax.bar(i, statistics.mean(values), color="#9bbcd9" if "alone" not in rs[0]["id"] else "#c8c8c8",
                   yerr=statistics.stdev(values) if len(values) > 1 else None, capsize=4)
            ax.scatter([i] * len(values), values, color="#1f3b57", s=14, zorder=3)
        ax.set_xticks(range(len(groups)), [g for g, _ in groups], rotation=30, ha="right", fontsize=8)
        low = min(r[key] for r in records)
        ax.set_ylim(max(0.0, math.floor((low - 0.05) * 20) / 20), None)
        ax.set_ylabel({"miou": "mIoU", "acc": "pixel accuracy"}[key])
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Table {path.stem}: bars = mean, dots = seeds, whiskers = ±1 std", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def parse_seeds(flag: str, text: str) -> list[int]:
    """Comma-separated distinct integers: a seed listed twice would count one run twice in mean ± std."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ValueError(f"{flag}: expected at least one integer seed, got {text!r}")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ValueError(f"{flag}: seed(s) {', '.join(map(str, twice))} listed twice in {text!r}; the same run "
                         f"would count twice in the mean and standard deviation")
    return seeds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m cocofast.experiments", description=__doc__.split("\n\n")[0],
                                     epilog="Any other --key=value is a training config key, passed to every run.")
    parser.add_argument("tables", nargs="+", metavar="TABLE", help=f"any of {', '.join(TABLES)}, or 'all'")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated student seeds (default 0,1,2,3,4)")
    parser.add_argument("--teacher_seeds", default="0,1,2",
                        help="seeds of the 'teacher' table (default 0,1,2; seed 0 is the teacher every table uses)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="base training configuration (YAML)")
    parser.add_argument("--out", default="docs/results", help="folder for T.csv, T.md, T.png")
    parser.add_argument("--work", default="runs/experiments", help="folder for every run's checkpoints")
    parser.add_argument("--tune", action="store_true",
                        help="choose on the validation split first: the student alone's learning rate, then, at that "
                             "rate, each row's loss weight and temperature; writes T_tuned.* beside the default view")
    parser.add_argument("--tune_seed", type=int, default=DEFAULT_TUNE_SEED,
                        help=f"student seed of the tuning runs (default {DEFAULT_TUNE_SEED}; not one of --seeds)")
    parser.add_argument("--run_seconds", type=float, default=None,
                        help="seconds one student run takes here: turns the printed plan into hours")
    parser.add_argument("--jobs", type=int, default=1,
                        help="training runs side by side (default 1); each run's output then goes to its "
                             "folder's log.txt. Runs are single-threaded when OMP_NUM_THREADS=1: use one job a core")
    parser.add_argument("--dry_run", action="store_true", help="print the plan and the commands, train nothing")
    args, extra = parser.parse_known_args(argv)
    names = list(TABLES) if args.tables == ["all"] else args.tables
    unknown = [t for t in names if t not in TABLES]
    if unknown:
        parser.error(f"unknown table(s) {', '.join(unknown)}; known: {', '.join(TABLES)}")
    bad = [a for a in extra if not a.startswith("--") or "=" not in a]
    if bad:
        parser.error(f"unexpected argument(s) {' '.join(bad)}: config keys are passed as --key=value")
    try:
        seeds = parse_seeds("--seeds", args.seeds)
        teacher_seeds = tuple(parse_seeds("--teacher_seeds", args.teacher_seeds))
    except ValueError as err:
        parser.error(str(err))
    if args.tune and args.tune_seed in seeds:
        parser.error(f"--tune_seed: {args.tune_seed} is one of --seeds; the search would pick a run whose own test "
                     f"score then enters the table")
    if args.jobs < 1:
        parser.error(f"--jobs: expected a positive number of runs side by side, got {args.jobs}")
    if args.run_seconds is not None and not args.run_seconds > 0:
        parser.error(f"--run_seconds: expected a positive number of seconds, got {args.run_seconds}")
    config = Path(args.config).resolve()
    if not config.is_file():
        parser.error(f"--config: {config} not found")
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    print(format_plan(names, seeds, args.run_seconds, args.jobs), flush=True)
    runner = Runner(config, work, extra, args.dry_run, args.jobs)
    command = "python -m cocofast.experiments " + " ".join(shlex.quote(a) for a in argv)
    version = source_version(REPO, out)  # before training: the runs are built from the tree as it is now
    tune_seed = args.tune_seed if args.tune else None
    tunings: dict = {}
    for name in names:
        started = time.perf_counter()
        try:
            records, searches = run_table(name, runner, seeds, tune_seed, tunings, teacher_seeds)
        except RunFailed as err:
            print(f"cocofast experiments: {err}", file=sys.stderr)
            return 1
        if args.dry_run:
            continue
        stem = f"{name}_tuned" if args.tune and TABLES[name][1] != [TEACHER_SEEDS] else name
        out.mkdir(parents=True, exist_ok=True)
        write_csv(records, out / f"{stem}.csv")
        if searches:
            write_csv(tuning_records(name, searches, args.tune_seed), out / f"{stem}_search.csv")
        text = markdown(name, records, command, config, time.perf_counter() - started, version, searches, tune_seed)
        atomic_write_text(text, out / f"{stem}.md")
        plot(name, records, out / f"{stem}.png")
        print("\n" + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
