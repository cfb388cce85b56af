"""Distillation methods side by side: train each table's rows over K seeds, report mean ± std.

    python -m cocofast.experiments I II III                 # the paper's Tables I-III on the built-in data
    python -m cocofast.experiments emkd graph_flow cpkd --seeds=0,1,2 --out=docs/results
    python -m cocofast.experiments I --config=configs/experiments.yaml --student_epochs=20   # any config key

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

Outputs in --out, per table T: T.csv (one line per row and seed: ACC, mIoU, mDice, params, GMACs),
T.md (mean ± std over seeds, the command, the configuration, the wall time) and T.png (the mIoU and ACC of
each row: the mean as a bar, each seed as a dot).
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
from dataclasses import dataclass, field
from pathlib import Path

from cocofast.io import atomic_path, atomic_write_text
from cocofast.losses import parse_losses

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
}


def _check_ids_are_consistent() -> None:
    """The same (student, id) must mean the same settings in every table: it names one shared run."""
    seen: dict[tuple[str, str], Row] = {}
    for _, rows in TABLES.values():
        for row in rows:
            if row == TEACHER:
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
    return any(spec.build().reads.teacher == "paraphrased" for spec in parse_losses(settings.get("losses", "none")))


# --- running ---------------------------------------------------------------------------------------------
class RunFailed(RuntimeError):
    pass


class Runner:
    def __init__(self, config: Path, work: Path, extra: list[str], dry_run: bool = False):
        self.config, self.work, self.extra, self.dry_run = config, work, extra, dry_run
        self.base = [sys.executable, "-m", "cocofast.train.distill", "--config", str(config)]
        self._done: set[str] = set()

    def _call(self, args: list[str], what: str) -> None:
        cmd = self.base + args + self.extra
        shown = " ".join(shlex.quote(a) for a in ["python", "-m", "cocofast.train.distill", *cmd[3:]])
        print(f"[experiments] {what}: {shown}", flush=True)
        if self.dry_run:
            return
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO)
        if done.returncode != 0:
            raise RunFailed(f"{what} failed with exit status {done.returncode}; command: {shown}")
        print(f"[experiments] {what}: {time.perf_counter() - started:.0f} s", flush=True)

    def teacher(self) -> Path:
        run_dir = self.work / "teacher"
        self._once(["--stage=teacher", f"--run_dir={run_dir}", "--seed=0", "--resume"], "teacher")
        return run_dir / "teacher" / "best.pt"

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

    def row(self, row: Row, seed: int) -> dict:
        """Train and score one (row, seed); returns the eval.json entries {name: metrics}."""
        run_dir = self.work / row.student / row.id / f"seed{seed}"
        result, record = run_dir / "eval.json", run_dir / "experiment.json"
        args = ["--stage=student,eval", f"--run_dir={run_dir}", f"--seed={seed}",
                f"--teacher_checkpoint={self.work / 'teacher' / 'teacher' / 'best.pt'}", "--student_name=student",
                "--resume", *row.args()]
        if reads_paraphrased(row):
            args.append(f"--paraphraser_checkpoint={self.work / f'paraphraser_{row.student}' / 'paraphraser' / 'best.pt'}")
        # A finished run is reused only if it was made by the same command from the same base configuration;
        # otherwise the training program runs, and its --resume refuses a checkpoint with other settings.
        made_by = {"args": args + self.extra, "config": self.config.read_text()}
        if not (result.is_file() and record.is_file() and json.loads(record.read_text()) == made_by):
            self.teacher()
            if "--paraphraser_checkpoint" in args[-1]:
                self.paraphraser(row.student)
            self._call(args, f"{row.label} ({row.student}), seed {seed}")
            if self.dry_run:
                return {}
            atomic_write_text(json.dumps(made_by, indent=1), record)
        return {entry["name"]: entry for entry in json.loads(result.read_text())}


# --- reporting -------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def run_table(name: str, runner: Runner, seeds: list[int]) -> list[dict]:
    title, rows = TABLES[name]
    records = []
    for row in rows:
        if row == TEACHER:
            continue
        for seed in seeds:
            scores = runner.row(row, seed)
            if not scores:
                continue
            student = scores["student"]
            records.append({"table": name, "row": row.label, "id": row.id, "network": row.student, "seed": seed,
                            "acc": student["acc"], "miou": student["miou"], "mdice": student["mdice"],
                            "params": student["params"], "gmacs": _gmacs(student),
                            "settings": " ".join(row.args()[1:])})
            if TEACHER in rows and "teacher" in scores and not any(r["row"] == "teacher" for r in records):
                t = scores["teacher"]
                records.insert(0, {"table": name, "row": "teacher", "id": "teacher", "network": t["model"],
                                   "seed": 0, "acc": t["acc"], "miou": t["miou"], "mdice": t["mdice"],
                                   "params": t["params"], "gmacs": _gmacs(t), "settings": "trained once"})
    return records


def _gmacs(entry: dict) -> float:
    return next(v for k, v in entry.items() if k.startswith("gmacs@"))


def write_csv(records: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
    writer.writeheader()
    for r in records:
        writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in r.items()})
    atomic_write_text(buffer.getvalue(), path)


def grouped(records: list[dict]) -> list[tuple[str, list[dict]]]:
    order: dict[str, list[dict]] = {}
    for r in records:
        order.setdefault(r["row"], []).append(r)
    return list(order.items())


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


def markdown(name: str, records: list[dict], command: str, config: Path, seconds: float, version: str) -> str:
    title, _ = TABLES[name]
    seeds = sorted({r["seed"] for r in records if r["id"] != "teacher"})
    lines = [f"# Table {name}: {title}", "",
             f"Mean ± sample standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
             f"test split of the built-in synthetic data unless the configuration says otherwise.", "",
             "| method | network | params | GMACs | ACC | mIoU | mIoU per seed |", "|---|---|---:|---:|---:|---:|---|"]
    for label, rs in grouped(records):
        per_seed = ", ".join(f"{r['miou']:.4f}" for r in rs)
        lines.append(f"| {label} | {rs[0]['network']} | {rs[0]['params']:,} | {rs[0]['gmacs']:.3f} | "
                     f"{mean_std([r['acc'] for r in rs])} | {mean_std([r['miou'] for r in rs])} | {per_seed} |")
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
    fig.suptitle(f"Table {name}: bars = mean, dots = seeds, whiskers = ±1 std", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m cocofast.experiments", description=__doc__.split("\n\n")[0],
                                     epilog="Any other --key=value is a training config key, passed to every run.")
    parser.add_argument("tables", nargs="+", metavar="TABLE", help=f"any of {', '.join(TABLES)}, or 'all'")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated student seeds (default 0,1,2)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="base training configuration (YAML)")
    parser.add_argument("--out", default="docs/results", help="folder for T.csv, T.md, T.png")
    parser.add_argument("--work", default="runs/experiments", help="folder for every run's checkpoints")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, train nothing")
    args, extra = parser.parse_known_args(argv)
    names = list(TABLES) if args.tables == ["all"] else args.tables
    unknown = [t for t in names if t not in TABLES]
    if unknown:
        parser.error(f"unknown table(s) {', '.join(unknown)}; known: {', '.join(TABLES)}")
    bad = [a for a in extra if not a.startswith("--") or "=" not in a]
    if bad:
        parser.error(f"unexpected argument(s) {' '.join(bad)}: config keys are passed as --key=value")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not seeds:
        parser.error(f"--seeds: expected at least one integer seed, got {args.seeds!r}")
    config = Path(args.config).resolve()
    if not config.is_file():
        parser.error(f"--config: {config} not found")
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    runner = Runner(config, work, extra, args.dry_run)
    command = "python -m cocofast.experiments " + " ".join(shlex.quote(a) for a in argv)
    version = source_version(REPO, out)  # before training: the runs are built from the tree as it is now
    for name in names:
        started = time.perf_counter()
        try:
            records = run_table(name, runner, seeds)
        except RunFailed as err:
            print(f"cocofast experiments: {err}", file=sys.stderr)
            return 1
        if args.dry_run:
            continue
        out.mkdir(parents=True, exist_ok=True)
        write_csv(records, out / f"{name}.csv")
        text = markdown(name, records, command, config, time.perf_counter() - started, version)
        atomic_write_text(text, out / f"{name}.md")
        plot(name, records, out / f"{name}.png")
        print("\n" + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
