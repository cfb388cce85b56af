"""The fair protocol (--tune): every method gets the same search on the validation split, at one seed.

First the student alone searches its learning rate over default x GRID; every row paired with it then trains
at the rate it chose and searches its loss weight scaled by each of GRID, then each temperature it has (KD's
T, EMKD's T, CPKD's tau) over default x GRID at the chosen weight. Searching the rate for the baseline alone
would compare a tuned rate with an untuned one: a 16-epoch run at a 10x too low rate loses more than any loss
weight can win back. The default (x1) is a point of every axis, so on the tuning seed's validation split a
tuned row is never worse than its default-weight self at the same rate. The grid is a table's `grid:` or
`--grid`; GRID otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from cocofast.losses import loss_parameters, resolve_aliases
from cocofast.train.experiments.runner import RunFailed, Runner, student_lr
from cocofast.train.experiments.tables import Row, Table, is_alone, losses_of, reads_paraphrased, reference_of

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


def rounded(value: float) -> float:
    return float(f"{value:.6g}")  # 2e-3 * 0.01 is 2e-05, not 2.0000000000000002e-05


def tuning_axes(row: Row, lr: float, grid: tuple[float, ...] = GRID) -> list[Axis]:
    """The search of one row: the grid over the learning rate for a student alone, else over the loss weights
    (all of the row's losses together) and then over each temperature the row's losses take."""
    specs = losses_of(row)
    if not specs:
        return [Axis("student_lr", tuple(rounded(lr * m) for m in grid), rounded(lr))]
    axes = [Axis("weight", tuple(grid), 1.0)]
    for spec in specs:
        loss = spec.build()
        for param in TEMPERATURES:
            if param in loss_parameters(spec.name):
                base = float(getattr(loss, param))
                axes.append(Axis(f"{spec.name}.{param}", tuple(rounded(base * m) for m in grid), base))
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
    for spec in losses_of(row):
        params = resolve_aliases(spec.name, spec.params)
        for param in TEMPERATURES:
            if f"{spec.name}.{param}" in point:
                params[param] = point[f"{spec.name}.{param}"]
        weight = rounded(spec.build().weight * point["weight"])
        items.append(":".join([spec.name, f"{weight:g}", *(f"{k}={show_value(v)}" for k, v in params.items())]))
    settings = {**dict(row.settings), "losses": ",".join(items)}
    suffix = "-".join(f"{a.key.replace('weight', 'x').replace('.', '_')}{point[a.key]:g}"
                      for a in axes if point[a.key] != a.default)
    return Row(f"{row.id}-{suffix}", row.label, row.student, tuple(sorted(settings.items())))


def show_value(value) -> str:
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
        return ", ".join(rate + [", ".join(a.show(self.chosen[a.key]) for a in self.axes)])


def choose(axis: Axis, scored: list[tuple[float, float]]) -> float | None:
    """The value with the best val mIoU; ties go to the value nearest the default (then the smaller)."""
    valid = [(v, s) for v, s in scored if not math.isnan(s)]
    if not valid:
        return None
    return min(valid, key=lambda vs: (-vs[1], abs(math.log10(vs[0] / axis.default)), vs[0]))[0]


def tune(runner: Runner, row: Row, seed: int, lr: float | None = None, grid: tuple[float, ...] = GRID) -> Tuning:
    """Search the row's axes one after the other on the validation split at one seed, training a distillation
    row at student learning rate `lr` (the one its student alone chose) where that is given."""
    configured = student_lr(runner, row)
    if lr is not None and not is_alone(row) and rounded(lr) != rounded(configured):
        row = with_student_lr(row, rounded(lr))
    else:
        lr = None
    axes = tuning_axes(row, configured, grid)
    current = {a.key: a.default for a in axes}
    scores: dict[str, float] = {}
    per_axis = []
    for axis in axes:
        scored = []
        runner.prefetch([(point_row(row, axes, {**current, axis.key: v}), seed) for v in axis.values], search=True)
        for value in axis.values:
            candidate = point_row(row, axes, {**current, axis.key: value})
            if candidate.id not in scores:
                try:
                    runner.search_row(candidate, seed)
                    scores[candidate.id] = runner.val_miou(candidate, seed)
                except RunFailed as err:  # e.g. a weight x10 that sends the loss to inf: that point lost
                    print(f"[experiments] tuning point failed, scored as missing: {err}", flush=True)
                    scores[candidate.id] = math.nan
            scored.append((value, scores[candidate.id]))
        per_axis.append(scored)
        best = choose(axis, scored)
        if best is None and not runner.dry_run:
            raise RunFailed(f"every tuning run of {row.label} ({row.network}) over {axis.key} failed")
        current[axis.key] = axis.default if best is None else best
    return Tuning(row, axes, per_axis, current, point_row(row, axes, current), len(scores), lr)


def tuned(runner: Runner, rows: list, row: Row, seed: int, tunings: dict, grid: tuple[float, ...] = GRID) -> Tuning:
    """The row's search, made once per (network, row id, grid): its student alone's first, whose rate it
    trains at. Rows searched from several threads share it: the first makes it, the others wait for it."""
    key = (row.network, row.id, grid)
    with runner.exclusive(key):
        if key not in tunings:
            reference = None if is_alone(row) else reference_of(rows, row)
            lr = None if reference is None else tuned(runner, rows, reference, seed, tunings, grid).chosen["student_lr"]
            tunings[key] = tune(runner, row, seed, lr, grid)
    return tunings[key]


# --- the plan: how many training runs, before any is made ------------------------------------------------
def tuning_runs(row: Row, grid: tuple[float, ...] = GRID) -> int:
    """Distinct runs of a row's search: the grid over the first axis, the grid less the current point over
    the rest."""
    axes = tuning_axes(row, 1.0, grid)
    return len(grid) + (len(axes) - 1) * (len(grid) - 1)


def student_rows(table: Table) -> list[Row]:
    return [r for r in table.rows if isinstance(r, Row)]


def plan(tables: list[Table], seeds: list[int], grid: tuple[float, ...] | None = None) -> list[dict]:
    """Per table, the student runs it needs and those no earlier table already made, with and without --tune.

    Without --tune a run is (network, row id, seed). With --tune a row costs its search (tuning_runs, at the
    tuning seed) plus the chosen setting over the seeds; the chosen runs are counted as new (an upper bound:
    where the default is chosen they are the default view's runs).
    """
    seen_default: set = set()
    seen_tuned: set = set()
    out = []
    for table in tables:
        rows = student_rows(table)
        used_grid = grid or table.grid or GRID
        default = {(r.network, r.id, s) for r in rows for s in seeds}
        tuned_keys = {(r.network, r.id, used_grid) for r in rows}
        cost = {(r.network, r.id, used_grid): tuning_runs(r, used_grid) + len(seeds) for r in rows}
        out.append({"table": table.name, "rows": len(rows), "default": len(default),
                    "default_new": len(default - seen_default),
                    "tuned": sum(cost.values()), "tuned_new": sum(cost[k] for k in tuned_keys - seen_tuned)})
        seen_default |= default
        seen_tuned |= tuned_keys
    return out


def shared_stages(tables: list[Table]) -> tuple[int, int]:
    """(teachers, paraphraser sets) the tables need: one teacher, one paraphraser set per student network."""
    rows = [r for table in tables for r in student_rows(table)]
    return 1, len({r.network for r in rows if reads_paraphrased(r)})


def format_plan(tables: list[Table], seeds: list[int], run_seconds: float | None, jobs: int = 1,
                grid: tuple[float, ...] | None = None) -> str:
    rows = plan(tables, seeds, grid)
    teachers, paraphrasers = shared_stages(tables)
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
