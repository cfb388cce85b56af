"""A table's records (one per row and seed), its paired tests against the student alone, and its files:
T.csv, T.md, T_search.csv (with --tune) and T.png."""
from __future__ import annotations

import csv
import io
import math
import statistics
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cocofast
from cocofast.experiment_stats import format_p, mean_std, paired_t_test, sign_test
from cocofast.io import atomic_path, atomic_write_text
from cocofast.train.experiments.runner import Runner
from cocofast.train.experiments.tables import TEACHER, TEACHER_SEEDS, Table, reference_of
from cocofast.train.experiments.tuning import GRID, Tuning, tuned


def teacher_record(table: str, scores: dict, row_id: str, seed: int, settings: str) -> dict:
    """One record of the teacher's own scores, in the columns every student record has."""
    return {"table": table, "row": "teacher", "id": row_id, "network": scores["model"], "seed": seed,
            "acc": scores["acc"], "miou": scores["miou"], "mdice": scores["mdice"], "val_miou": math.nan,
            "critic": math.nan, "params": scores["params"], "gmacs": gmacs(scores), "setting": "all labels",
            "reference": "", "settings": settings}


def teacher_records(name: str, runner: Runner, seeds) -> list[dict]:
    scored = ((seed, runner.teacher_scores(seed)) for seed in seeds)
    return [teacher_record(name, t, "teacher_seed", seed, f"--seed={seed}") for seed, t in scored if t]


def run_table(table: Table, runner: Runner, seeds: list[int], tune_seed: int | None = None,
              tunings: dict | None = None, teacher_seeds: tuple[int, ...] = (0, 1, 2),
              grid: tuple[float, ...] | None = None) -> tuple[list[dict], list[Tuning]]:
    """Every row of the table over the seeds: as configured, or (tune_seed given) at its tuned setting.

    Returns the records (one per row and seed, the teacher first where the table shows it) and the searches.
    """
    rows, name = table.rows, table.name
    if rows == [TEACHER_SEEDS]:
        return teacher_records(name, runner, teacher_seeds), []
    grid = grid or table.grid or GRID
    tunings = {} if tunings is None else tunings  # (network, row id, grid) -> Tuning, shared between tables
    students = [row for row in rows if row != TEACHER]
    if tune_seed is None:
        runner.prefetch([(row, seed) for row in students for seed in seeds])

    def one(row) -> tuple[list[dict], Tuning | None, dict | None]:
        """The row's search (with tune_seed), its records over the seeds, and the teacher's scores its runs gave."""
        used, setting, search = row, "as configured", None
        if tune_seed is not None:
            search = tuned(runner, rows, row, tune_seed, tunings, grid)
            used, setting = search.chosen_row, search.setting()
        reference = reference_of(rows, row)
        runner.prefetch([(used, seed) for seed in seeds])
        records, teacher = [], None
        for seed in seeds:
            scores = runner.row(used, seed)
            if not scores:
                continue
            teacher = teacher or scores.get("teacher")
            student = scores["student"]
            records.append({"table": name, "row": row.label, "id": used.id, "network": student["model"],
                            "seed": seed, "acc": student["acc"], "miou": student["miou"],
                            "mdice": student["mdice"], "val_miou": runner.val_miou(used, seed),
                            "critic": runner.critic_score(used, seed), "params": student["params"],
                            "gmacs": gmacs(student), "setting": setting,
                            "reference": reference.label if reference is not None else "",
                            "settings": " ".join(used.setting_args())})
        return records, search, teacher

    if runner.side_by_side:  # every row's search and seeds at once: the runner's slots keep the cores busy
        with ThreadPoolExecutor(max_workers=len(students)) as pool:
            done = list(pool.map(one, students))
    else:
        done = [one(row) for row in students]
    records = [r for row_records, _, _ in done for r in row_records]
    searches = [search for _, search, _ in done if search is not None]
    teacher = next((scores for _, _, scores in done if scores is not None), None)
    if TEACHER in rows and teacher is not None and records:
        records.insert(0, teacher_record(name, teacher, "teacher", 0, "trained once"))
    return records, searches


def gmacs(entry: dict) -> float:
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
                out.append({"table": name, "row": t.row.label, "network": t.row.network, "seed": seed,
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


def source_version(repo: Path | None = None, outputs: Path | None = None) -> str:
    """The commit the runs came from, marked when the working tree had uncommitted changes; for an installed
    package (not a git checkout), its version.

    `repo` defaults to the checkout holding the cocofast package in use. Tracked files under `outputs` do not
    count: they are this runner's own tables, rewritten as it goes.
    """
    installed = f"cocofast {cocofast.__version__} (installed, not a git checkout)"
    try:
        where = Path(cocofast.__file__).resolve().parent if repo is None else repo
        root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=where, capture_output=True,
                                   text=True, check=True).stdout.strip()).resolve()
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", "."]
        # Tables written to the repository root itself would otherwise hide every change.
        if outputs is not None and outputs.resolve() != root and outputs.resolve().is_relative_to(root):
            status.append(f":(exclude){outputs.resolve().relative_to(root).as_posix()}")
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(status, cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return installed
    return head + (" with uncommitted changes" if dirty else "")


def markdown(table: Table, records: list[dict], command: str, config: Path, seconds: float, version: str,
             searches: list[Tuning] | None = None, tune_seed: int | None = None,
             grid: tuple[float, ...] = GRID) -> str:
    name = table.name
    seeds = sorted({r["seed"] for r in records if r["id"] != "teacher"})
    tuned_view = tune_seed is not None
    view = ("each method at the setting chosen on the validation split (see Tuning below)" if tuned_view
            else "every loss at its paper's default weight")
    lines = [f"# Table {name}{' (tuned)' if tuned_view else ''}: {table.title}", "",
             f"Mean ± sample standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
             f"{view}; test split of the data the configuration names.", "",
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
    if tuned_view and searches:
        runs = sum(s.runs for s in searches)
        lines += ["", "## Tuning", "",
                  f"One run per grid point at seed {tune_seed} (not a table seed), scored by the validation mIoU "
                  f"of its best.pt (the largest val_miou of its summary.csv: the figure that chose the checkpoint; "
                  f"the test split is never read to choose). Grid: the default × "
                  f"{{{', '.join(f'{m:g}' for m in grid)}}}: first the student alone over its learning rate; then every "
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
    shown = config.relative_to(Path.cwd()) if config.is_relative_to(Path.cwd()) else config
    lines += ["", f"Produced at commit {version} by:", "", "```", command, "```", "",
              f"Base configuration: `{shown}`; table: `{table.source or 'built from --methods'}`; "
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
