"""`cocofast experiments`: distillation methods side by side over several seeds, on any configuration.

    cocofast experiments I II III                        # the paper's Tables I-III, the packaged set-up
    cocofast experiments emkd graph_flow cpkd --seeds=0-2 --out=docs/results
    cocofast experiments --config MY.yaml --methods kd,coco,graph_flow --seeds 0-4 --tune
    cocofast experiments MY_TABLE.yaml --config MY.yaml  # a table file of one's own (see tables.py)
    cocofast experiments scarce --tune --grid=0.1,1,10   # every method tuned on validation first (T_tuned.*)
    cocofast experiments all --tune --dry_run --run_seconds=20   # the plan in hours, train nothing
    cocofast experiments scarce --jobs=16             # 16 runs at a time, each with cores / 16 threads

Every run is the training program itself (`python -m cocofast.train.distill`, one process per run, started in
the current directory) with `--config` (default: the packaged configs/experiments.yaml) plus the row's
settings plus any `--key=value` given here, so the teacher, the student and the data are whatever that
configuration says (a folder or slide data set, networks by import path). A row names its student network
only where its table does (the paper's tables: Mobile U-Net, and ENet and ERFNet in Table III); --methods
rows train the configuration's own student. What is shared, and what varies:

- one teacher (seed 0) for every row and seed, and one set of paraphrasers per student network (seed 0), so
  rows differ only in how the student is trained;
- seed s varies the student's initialisation, data order, augmentation and critic; the data themselves are
  fixed by `data_seed` (the same training, validation and test patches for every run);
- each method reads the teacher features its paper uses, as its loss declares (`reads` in cocofast.losses);
- a row is a (student network, method) pair with a fixed id: rows that appear in several tables are trained
  once per seed and reused. A finished run (its eval.json, and an experiment.json recording the command and
  base configuration that made it) is skipped when the same command would make it again, so an interrupted
  invocation continues where it stopped; changed settings make the training program refuse the old
  checkpoint (delete the run folder, or use another --work).

Without --tune every loss runs at its paper's default weight and temperature. With --tune (the fair
protocol, tuning.py) each row is first searched on the validation split at one seed (--tune_seed, outside the
table's seeds); the chosen setting is then trained over the seeds and scored on test. Each row is paired with
its table's student alone seed by seed: per-seed differences, a sign test and a paired t-test.

Outputs in --out, per table T (T_tuned with --tune): T.csv (one line per row and seed), T.md (mean ± std,
the paired tests, the search, the command, the configuration, the wall time), T_search.csv (with --tune) and
T.png (each row's mean as a bar, each seed as a dot).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from cocofast.io import atomic_write_text
from cocofast.train.experiments.report import markdown, plot, run_table, source_version, tuning_records, write_csv
from cocofast.train.experiments.runner import RunFailed, Runner
from cocofast.train.experiments.tables import (TEACHER_SEEDS, TableError, default_config, load_table,
                                               methods_table, packaged_tables, parse_grid)
from cocofast.train.experiments.tuning import DEFAULT_TUNE_SEED, GRID, format_plan


def parse_seeds(flag: str, text: str) -> list[int]:
    """Comma-separated distinct integers or ranges (0-4 = 0,1,2,3,4): a seed listed twice would count one run
    twice in mean ± std."""
    seeds = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            first, dash, last = part.partition("-")
            if dash and first:
                if int(last) < int(first):
                    raise ValueError
                seeds += range(int(first), int(last) + 1)
            else:
                seeds.append(int(part))
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers or ranges such as 0-4, got {text!r}") from None
    if not seeds:
        raise ValueError(f"{flag}: expected at least one integer seed, got {text!r}")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ValueError(f"{flag}: seed(s) {', '.join(map(str, twice))} listed twice in {text!r}; the same run "
                         f"would count twice in the mean and standard deviation")
    return seeds


def build_parser(known: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cocofast experiments", description=__doc__.split("\n\n")[0],
                                     epilog="Any other --key=value is a training config key, passed to every run.")
    parser.add_argument("tables", nargs="*", metavar="TABLE",
                        help=f"any of {', '.join(known)}, 'all', or a table file (.yaml) of one's own")
    parser.add_argument("--methods", default="",
                        help="comma-separated method names (configs/experiments/methods.yaml): a table of these, "
                             "each paired with the configuration's student alone")
    parser.add_argument("--seeds", default="0-4", help="student seeds: integers and ranges (default 0-4)")
    parser.add_argument("--teacher_seeds", default="0,1,2",
                        help="seeds of the 'teacher' table (default 0,1,2; seed 0 is the teacher every table uses)")
    parser.add_argument("--config", default=None,
                        help="base training configuration (YAML; default: the packaged configs/experiments.yaml)")
    parser.add_argument("--out", default="results/experiments", help="folder for T.csv, T.md, T.png")
    parser.add_argument("--work", default="runs/experiments", help="folder for every run's checkpoints")
    parser.add_argument("--tune", action="store_true",
                        help="choose on the validation split first: the student alone's learning rate, then, at that "
                             "rate, each row's loss weight and temperature; writes T_tuned.* beside the default view")
    parser.add_argument("--grid", default=None,
                        help=f"--tune's factors on each default, 1 among them (default: the table's grid:, else "
                             f"{','.join(f'{g:g}' for g in GRID)})")
    parser.add_argument("--tune_seed", type=int, default=DEFAULT_TUNE_SEED,
                        help=f"student seed of the tuning runs (default {DEFAULT_TUNE_SEED}; not one of --seeds)")
    parser.add_argument("--run_seconds", type=float, default=None,
                        help="seconds one student run takes here: turns the printed plan into hours")
    parser.add_argument("--jobs", type=int, default=1,
                        help="training runs side by side (default 1); each run's output then goes to its "
                             "folder's log.txt; each run gets cores / jobs threads unless OMP_NUM_THREADS or --threads= says")
    parser.add_argument("--fresh_processes", action="store_true",
                        help="start every run as a fresh Python process instead of forking it from one that has "
                             "imported the training program (forkserver.py; the same results, 10-20 s more a run)")
    parser.add_argument("--dry_run", action="store_true", help="print the plan and the commands, train nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        known = packaged_tables()
    except TableError as err:
        print(f"cocofast experiments: error: {err}", file=sys.stderr)
        return 2
    parser = build_parser(list(known))
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith("--") or "=" not in a]
    if bad:
        parser.error(f"unexpected argument(s) {' '.join(bad)}: config keys are passed as --key=value")
    if not args.tables and not args.methods:
        parser.error("name a table (any of " + ", ".join(known) + ", 'all', or a .yaml file) or give --methods")
    try:
        tables = []
        for name in (list(known) if args.tables == ["all"] else args.tables):
            if name.endswith((".yaml", ".yml")):
                tables.append(load_table(Path(name)))
            elif name in known:
                tables.append(known[name])
            else:
                parser.error(f"unknown table {name!r}; known: {', '.join(known)}, or a .yaml table file")
        if args.methods:
            tables.append(methods_table([m.strip() for m in args.methods.split(",") if m.strip()]))
        grid = parse_grid(args.grid, "--grid") if args.grid is not None else None
    except TableError as err:
        parser.error(str(err))
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
    config = Path(args.config).resolve() if args.config is not None else default_config()
    if not config.is_file():
        parser.error(f"--config: {config} not found")
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    print(format_plan(tables, seeds, args.run_seconds, args.jobs, grid), flush=True)
    runner = Runner(config, work, extra, args.dry_run, args.jobs,
                    fork_server=not args.fresh_processes and hasattr(os, "fork"))
    try:
        return run_tables(args, argv, tables, runner, seeds, teacher_seeds, grid, config, out)
    finally:
        runner.close()


def run_tables(args, argv, tables, runner, seeds, teacher_seeds, grid, config, out) -> int:
    command = "cocofast experiments " + shlex.join(argv)
    version = source_version(outputs=out)  # before training: the runs are built from the tree as it is now
    tune_seed = args.tune_seed if args.tune else None
    tunings: dict = {}
    for table in tables:
        started = time.perf_counter()
        try:
            records, searches = run_table(table, runner, seeds, tune_seed, tunings, teacher_seeds, grid)
        except RunFailed as err:
            print(f"cocofast experiments: {err}", file=sys.stderr)
            return 1
        if args.dry_run or not records:
            continue
        stem = f"{table.name}_tuned" if args.tune and table.rows != [TEACHER_SEEDS] else table.name
        out.mkdir(parents=True, exist_ok=True)
        write_csv(records, out / f"{stem}.csv")
        if searches:
            write_csv(tuning_records(table.name, searches, args.tune_seed), out / f"{stem}_search.csv")
        text = markdown(table, records, command, config, time.perf_counter() - started, version, searches,
                        tune_seed, grid or table.grid or GRID)
        atomic_write_text(text, out / f"{stem}.md")
        plot(table.name, records, out / f"{stem}.png")
        print("\n" + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
