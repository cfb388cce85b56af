"""The experiment runner: tables are well formed, runs are shared and resumed, outputs agree with the runs."""
from __future__ import annotations

import contextlib
import csv
import math
import statistics
import subprocess
from pathlib import Path

import pytest
import yaml

from cocofast.losses import list_losses
from cocofast.train.config import parse_args
from cocofast.train.experiments import cli, report, tables, tuning
from cocofast.train.experiments.runner import RunFailed, student_lr
from cocofast.train.experiments.tables import TEACHER, TEACHER_SEEDS, Table, make_row

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
TABLES = tables.packaged_tables()
DEFAULT_CONFIG = tables.default_config()


def tiny_table(tmp_path: Path, rows: list, name: str = "tiny") -> str:
    """A table file of the given rows, as a user would write one (each row a method plus its own settings)."""
    data = {"title": "tiny check", "teacher": TEACHER in rows,
            "rows": [{"method": "alone", "id": r.id, "label": r.label, "student": r.student,
                      "settings": dict(r.settings)} for r in rows if r != TEACHER]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_every_row_is_a_valid_training_configuration():
    for name, table in TABLES.items():
        rows = table.rows
        for row in rows:
            if row in (TEACHER, TEACHER_SEEDS):
                continue
            cfg = parse_args(["--config", str(DEFAULT_CONFIG), *row.args()])
            assert all(loss in list_losses() for loss in cfg.loss_names()), (name, row)


def test_the_issue_tables_list_the_methods_they_promise():
    labels = {name: [r.id for r in rows if r not in (TEACHER, TEACHER_SEEDS)]
              for name, rows in ((n, t.rows) for n, t in TABLES.items())}
    assert labels["I"] == ["alone", "ss", "cmss", "cocod", "coco"]
    assert {"kd", "at", "fsp", "ifvd", "coco"} <= set(labels["II"])
    assert TEACHER in TABLES["III"].rows
    assert {r.student for r in TABLES["III"].rows if r != TEACHER} == {
        "mobile_unet", "enet", "erfnet"}
    for sibling in ("emkd", "graph_flow", "cpkd"):
        assert {"alone", "coco", sibling} <= set(labels[sibling])


def test_bad_arguments_are_refused(capsys):
    for argv, words in [(["IV"], "unknown table"), (["I", "--seeds=a"], "--seeds"), (["I", "--jobs=0"], "--jobs"),
                        (["I", "--student_epochs"], "unexpected argument"), (["I", "stray"], "unknown table"), (["I", "--config=/nope.yaml"], "not found")]:
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert words in capsys.readouterr().err


def test_a_small_table_end_to_end(tmp_path, monkeypatch, capsys):
    rows = [make_row("alone", "student alone", "enet", losses="none", adversarial=False),
            make_row("coco", "CoCo", "enet", losses="coco", adversarial=False)]
    argv = [tiny_table(tmp_path, [TEACHER, *rows]), "--seeds=0,1", f"--config={TINY}", f"--work={tmp_path / 'work'}", f"--out={tmp_path / 'out'}",
            "--student_epochs=1", "--teacher_epochs=1"]
    assert cli.main(argv) == 0
    with open(tmp_path / "out" / "tiny.csv") as f:
        records = list(csv.DictReader(f))
    assert [(r["id"], r["seed"]) for r in records] == [("teacher", "0"), ("alone", "0"), ("alone", "1"),
                                                       ("coco", "0"), ("coco", "1")]
    coco = [float(r["miou"]) for r in records if r["id"] == "coco"]
    text = (tmp_path / "out" / "tiny.md").read_text()
    assert f"{statistics.mean(coco):.4f} ± {statistics.stdev(coco):.4f}" in text
    assert f"cocofast experiments {argv[0]} --seeds=0,1" in text
    assert (tmp_path / "out" / "tiny.png").stat().st_size > 1000
    # Seeds differ in the student's training, not in the data.
    alone = [r for r in records if r["id"] == "alone"]
    assert alone[0]["params"] == alone[1]["params"]
    # A second invocation reuses every finished run: no student is trained again.
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert ", seed " not in capsys.readouterr().out


def test_the_teacher_table_trains_one_teacher_per_seed_and_reuses_them(tmp_path, capsys):
    argv = ["teacher", "--teacher_seeds=0,1", f"--config={TINY}", f"--work={tmp_path / 'work'}",
            f"--out={tmp_path / 'out'}", "--teacher_epochs=1"]
    assert cli.main(argv) == 0
    with open(tmp_path / "out" / "teacher.csv") as f:
        records = list(csv.DictReader(f))
    assert [(r["row"], r["seed"]) for r in records] == [("teacher", "0"), ("teacher", "1")]
    # Seed 0 is the shared teacher every student row reads; seed 1 is a run of its own.
    assert (tmp_path / "work" / "teacher" / "teacher" / "best.pt").is_file()
    assert (tmp_path / "work" / "teacher_seed1" / "teacher" / "best.pt").is_file()
    miou = [float(r["miou"]) for r in records]
    assert miou[0] != miou[1]
    assert f"{statistics.mean(miou):.4f} ± {statistics.stdev(miou):.4f}" in (tmp_path / "out" / "teacher.md").read_text()
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "teacher, seed" not in capsys.readouterr().out


def test_runs_side_by_side_write_their_own_logs_and_a_failure_names_its_log(tmp_path, monkeypatch, capsys):
    rows = [make_row("alone", "student alone", "enet", losses="none", adversarial=False),
            make_row("kd", "KD", "enet", losses="kd", adversarial=False)]
    argv = [tiny_table(tmp_path, rows), "--seeds=0,1", "--jobs=2", f"--config={TINY}", f"--work={tmp_path / 'work'}",
            f"--out={tmp_path / 'out'}", "--student_epochs=1", "--teacher_epochs=1", "--train_samples=8",
            "--val_samples=4"]
    assert cli.main(argv) == 0
    with open(tmp_path / "out" / "tiny.csv") as f:
        assert sorted((r["id"], r["seed"]) for r in csv.DictReader(f)) == [
            ("alone", "0"), ("alone", "1"), ("kd", "0"), ("kd", "1")]
    for id in ("alone", "kd"):
        for seed in (0, 1):
            assert "[student] epoch 1/1" in (tmp_path / "work" / "enet" / id / f"seed{seed}" / "log.txt").read_text()
    # A run that fails (here a negative learning rate, refused at start-up) fails the table and names its log.
    bad = make_row("kd_negative", "KD at -1", "enet", losses="kd", adversarial=False, student_lr=-1)
    tiny_table(tmp_path, [rows[0], bad])  # the same file, new rows
    capsys.readouterr()
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "KD at -1 (enet), seed 0 failed with exit status 2" in err
    assert str(tmp_path / "work" / "enet" / "kd_negative" / "seed0" / "log.txt") in err


def test_the_recorded_commit_ignores_the_runners_own_tables(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "I.md").write_text("old table\n")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    assert report.source_version(tmp_path, tmp_path / "results") == head
    (tmp_path / "results" / "I.md").write_text("new table\n")
    assert report.source_version(tmp_path, tmp_path / "results") == head
    assert report.source_version(tmp_path) == f"{head} with uncommitted changes"
    (tmp_path / "code.py").write_text("x = 2\n")
    assert report.source_version(tmp_path, tmp_path / "results") == f"{head} with uncommitted changes"
    assert report.source_version(tmp_path, tmp_path) == f"{head} with uncommitted changes"


# --- the label-scarce table, the fair protocol (--tune), the paired tests, the plan ----------------------
def _table_row(table: str, id: str, student: str = "mobile_unet") -> tables.Row:
    return next(r for r in TABLES[table].rows
                if r != TEACHER and r.id == id and r.student == student)


def test_the_scarce_table_has_every_method_at_both_fractions():
    rows = [r for r in TABLES["scarce"].rows if r != TEACHER]
    assert TEACHER in TABLES["scarce"].rows  # trained once, on every label
    methods = ["alone", "kd", "cocod", "coco", "graph_flow", "ss", "cpkd", "emkd", "kd_coco"]
    assert [r.id for r in rows] == [f"{m}_semi{p}" for p in (10, 20) for m in methods]
    for r in rows:
        cfg = parse_args(["--config", str(DEFAULT_CONFIG), *r.args()])
        assert cfg.labelled_fraction == (0.1 if r.id.endswith("10") else 0.2)
    settings = {r.id: dict(r.settings) for r in rows}
    assert settings["cocod_semi10"] == {"losses": "coco", "adversarial": "false", "labelled_fraction": "0.1"}
    assert settings["coco_semi10"]["adversarial"] == settings["graph_flow_semi20"]["adversarial"] == "true"
    assert settings["graph_flow_semi10"]["losses"] == "graph_flow,kd"
    assert settings["emkd_semi20"]["supervised_loss"] == "focal_dice"
    assert settings["kd_coco_semi10"]["losses"] == "kd,coco"
    # scarce10 and scarce20 are its halves, row for row: the same runs, not look-alikes.
    assert TABLES["scarce10"].rows == [TEACHER, *[r for r in rows if r.id.endswith("10")]]
    assert TABLES["scarce20"].rows == [TEACHER, *[r for r in rows if r.id.endswith("20")]]


def test_each_method_searches_the_same_grid_around_its_defaults():
    assert tuning.GRID == (0.01, 0.1, 1.0, 10.0)
    axes = lambda table, id: [(a.key, a.values) for a in tuning.tuning_axes(_table_row(table, id), 2e-3)]
    assert axes("I", "alone") == [("student_lr", (2e-5, 2e-4, 2e-3, 2e-2))]
    assert axes("I", "coco") == [("weight", (0.01, 0.1, 1.0, 10.0))]
    assert axes("II", "kd") == [("weight", (0.01, 0.1, 1.0, 10.0)), ("kd.temperature", (0.04, 0.4, 4.0, 40.0))]
    assert axes("cpkd", "cpkd") == [("weight", (0.01, 0.1, 1.0, 10.0)), ("cpkd.tau", (0.01, 0.1, 1.0, 10.0))]
    assert axes("emkd", "emkd")[1] == ("emkd.temperature", (0.04, 0.4, 4.0, 40.0))
    assert axes("scarce", "graph_flow_semi10") == [("weight", tuning.GRID),
                                                   ("kd.temperature", (0.04, 0.4, 4.0, 40.0))]
    # Each point is a training configuration: weights scale from each loss's paper default (AT: 1000).
    kd = _table_row("II", "kd")
    axes_kd = tuning.tuning_axes(kd, 2e-3)
    assert tuning.point_row(kd, axes_kd, {"weight": 1.0, "kd.temperature": 4.0}) is kd  # shares its runs
    point = tuning.point_row(kd, axes_kd, {"weight": 0.1, "kd.temperature": 0.4})
    assert dict(point.settings)["losses"] == "kd:0.1:temperature=0.4" and point.id == "kd-x0.1-kd_temperature0.4"
    at = _table_row("II", "at")
    assert dict(tuning.point_row(at, tuning.tuning_axes(at, 2e-3), {"weight": 0.01}).settings)[
        "losses"] == "at:10"
    both = _table_row("scarce", "kd_coco_semi20")
    assert dict(tuning.point_row(both, tuning.tuning_axes(both, 2e-3),
                                      {"weight": 10.0, "kd.temperature": 4.0}).settings)["losses"] == \
        "kd:10:temperature=4,coco:10"
    alone = _table_row("I", "alone")
    lr_row = tuning.point_row(alone, tuning.tuning_axes(alone, 2e-3), {"student_lr": 2e-4})
    for row in (point, lr_row):
        cfg = parse_args(["--config", str(DEFAULT_CONFIG), *row.args()])
        assert cfg.student_lr == (2e-4 if row is lr_row else 2e-3)
    assert tuning.tuning_runs(kd) == 7 and tuning.tuning_runs(alone) == 4


class FakeRunner:
    """Stands in for Runner: no training, a val mIoU per point given by `score(row)`."""

    def __init__(self, score, fail=()):
        self.config, self.extra, self.dry_run = DEFAULT_CONFIG, [], False
        self.score, self.fail, self.trained, self.prefetched = score, set(fail), [], []
        self.scored_on_test = []

    def exclusive(self, key):
        return contextlib.nullcontext()

    def search_row(self, row, seed):
        self.trained.append((row.id, seed))
        if row.id in self.fail:
            raise RunFailed(f"{row.id} diverged")

    def row(self, row, seed):
        self.scored_on_test.append((row.id, seed))
        return {}

    def prefetch(self, pairs, search=False):
        self.prefetched.append([(row.id, seed) for row, seed in pairs])

    def val_miou(self, row, seed):
        return self.score(row)


def test_the_search_picks_the_best_validation_point_axis_by_axis():
    kd = _table_row("II", "kd")

    def score(row):  # best weight x0.1; then, at that weight, best T 0.4
        losses = dict(row.settings)["losses"]
        if losses == "kd":
            return 0.60
        weight, _, rest = losses.partition(":")[2].partition(":")
        temperature = float(rest.partition("=")[2]) if rest else 4.0
        return {0.01: 0.50, 0.1: 0.70, 1.0: 0.60, 10.0: 0.40}[float(weight)] + (0.05 if temperature == 0.4 else 0)

    fake = FakeRunner(score, fail={"kd-x10"})
    result = tuning.tune(fake, kd, seed=100)
    assert result.chosen == {"weight": 0.1, "kd.temperature": 0.4}
    assert dict(result.chosen_row.settings)["losses"] == "kd:0.1:temperature=0.4"
    assert result.per_axis[0] == [(0.01, 0.50), (0.1, 0.70), (1.0, 0.60)] + [(10.0, result.per_axis[0][3][1])]
    assert math.isnan(result.per_axis[0][3][1])  # the failed point lost, the search went on
    assert [s for _, s in result.per_axis[1]] == pytest.approx([0.70, 0.75, 0.70, 0.70])
    # 4 weights, then 3 new temperatures at weight x0.1 (T = 4 there was already run); all at the tuning seed.
    assert len(fake.trained) == result.runs == tuning.tuning_runs(kd) == 7
    assert {seed for _, seed in fake.trained} == {100}
    assert fake.scored_on_test == []  # a search point is trained and validated, never scored on test
    # Each axis's grid is handed to the runner at once, so --jobs can train its points side by side.
    assert [len(points) for points in fake.prefetched] == [4, 4]
    assert "weight ×0.1" in result.setting() and "kd T 0.4" in result.setting()


def test_every_row_searches_its_weights_at_the_rate_its_student_alone_chose():
    rows = TABLES["II"].rows
    kd = _table_row("II", "kd")
    lr_of = lambda row: float(dict(row.settings).get("student_lr", 2e-3))
    # The rate decides: 2e-2 is best; at that rate KD's weight x0.1 is best. At 2e-3 KD would prefer x10.
    def score(row):
        if tables.is_alone(row):
            return {2e-5: 0.1, 2e-4: 0.3, 2e-3: 0.5, 2e-2: 0.7}[lr_of(row)]
        weight = float(dict(row.settings)["losses"].partition(":")[2].partition(":")[0] or 1.0)
        return (0.8 if weight == 0.1 else 0.75) if lr_of(row) == 2e-2 else (0.6 if weight == 10.0 else 0.55)

    fake, tunings = FakeRunner(score), {}
    search = tuning.tuned(fake, rows, kd, 100, tunings)
    grid = tuning.GRID
    assert set(tunings) == {("mobile_unet", "alone", grid), ("mobile_unet", "kd", grid)}  # the baseline first
    assert tunings[("mobile_unet", "alone", grid)].row == _table_row("II", "alone")
    assert tunings[("mobile_unet", "alone", grid)].chosen == {"student_lr": 2e-2}
    assert [id for id, _ in fake.trained[:4]] == ["alone-lr2e-05", "alone-lr0.0002", "alone", "alone-lr0.02"]
    kd_runs = [id for id, _ in fake.trained[4:]]
    assert kd_runs and all(id.startswith("kd-lr0.02") for id in kd_runs)  # none at the configured rate
    assert search.lr == 2e-2 and search.chosen["weight"] == 0.1
    chosen = parse_args(["--config", str(DEFAULT_CONFIG), *search.chosen_row.args()])
    assert chosen.student_lr == 2e-2 and "lr 0.02 (student alone's)" in search.setting()
    # Made once: a second table asking for the same row reuses both searches.
    assert tuning.tuned(fake, rows, kd, 100, tunings) is search and len(fake.trained) == 4 + len(kd_runs)
    # Where the student alone keeps the configured rate, the row's runs are its default-view runs.
    flat = tuning.tuned(FakeRunner(lambda row: 0.5), rows, kd, 100, {})
    assert flat.lr is None and flat.chosen_row is kd


def test_the_search_breaks_ties_toward_the_default_and_fails_loudly_when_every_point_fails(tmp_path):
    alone = _table_row("I", "alone")
    flat = tuning.tune(FakeRunner(lambda row: 0.5), alone, seed=100)
    assert flat.chosen_row is alone and flat.chosen == {"student_lr": 2e-3}
    # The learning rate searched around is the one the run's own command trains at, as the training program
    # reads it: the config's, then the row's, then this invocation's --student_lr (last on the command line).
    fake = FakeRunner(lambda row: 0.5)
    fake.extra = ["--student_lr=0.5"]
    assert tuning.tuning_axes(alone, student_lr(fake, alone))[0].values == (0.005, 0.05, 0.5, 5.0)
    own = make_row("alone", "alone", "enet", losses="none", adversarial=False, student_lr=0.25)
    assert student_lr(fake, own) == 0.5
    fake.extra = []
    assert student_lr(fake, own) == 0.25
    tmp_config = tmp_path / "no_default.yaml"
    tmp_config.write_text("dataset: synthetic\n")  # the training program's own default
    fake.config = tmp_config
    assert student_lr(fake, alone) == parse_args([]).student_lr
    tmp_config.write_text("student_lr: fast\n")
    with pytest.raises(RunFailed, match="student_lr"):
        tuning.tune(fake, alone, seed=100)
    ids = [f"alone-lr{v:g}" for v in (2e-5, 2e-4, 2e-2)] + ["alone"]
    with pytest.raises(RunFailed, match="every tuning run"):
        tuning.tune(FakeRunner(lambda row: 0.5, fail=ids), alone, seed=100)


def test_sign_test_and_paired_t_test_against_hand_computed_values():
    from cocofast.experiment_stats import paired_t_test, sign_test

    assert sign_test([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2 / 32)         # 5 of 5 positive
    assert sign_test([0.1, 0.2, -0.1, 0.3, 0.4]) == pytest.approx(2 * 6 / 32)    # 4 of 5: 2 (1 + 5) / 2^5
    assert sign_test([0.0, 1.0, 1.0]) == pytest.approx(2 / 4)                    # the tie is dropped: n = 2
    assert sign_test([1.0, -1.0]) == 1.0 and math.isnan(sign_test([0.0, 0.0]))
    # df = 2: P(|T| >= t) = 1 - t / sqrt(2 + t^2). d = 1, 2, 3: mean 2, sd 1, t = 2 sqrt(3).
    t, p = paired_t_test([1.0, 2.0, 3.0])
    assert t == pytest.approx(2 * math.sqrt(3)) and p == pytest.approx(1 - math.sqrt(12 / 14))
    # df = 1 (Cauchy): P(|T| >= t) = 1 - 2 atan(t) / pi. d = 1, 3: mean 2, sd sqrt(2), t = 2.
    t, p = paired_t_test([3.0, 1.0])
    assert t == pytest.approx(2.0) and p == pytest.approx(1 - 2 * math.atan(2) / math.pi)
    t, p = paired_t_test([-1.0, -2.0, -3.0])
    assert t == pytest.approx(-2 * math.sqrt(3)) and p == pytest.approx(1 - math.sqrt(12 / 14))
    assert paired_t_test([0.5, 0.5]) == (math.inf, 0.0)
    assert all(math.isnan(v) for v in paired_t_test([0.0, 0.0]) + paired_t_test([1.0]))


def test_each_row_is_paired_with_its_own_student_alone():
    ref = lambda table, id, student="mobile_unet": tables.reference_of(
        TABLES[table].rows, _table_row(table, id, student))
    assert ref("I", "alone") is None
    assert ref("II", "kd").id == "alone"
    assert ref("emkd", "emkd").id == "alone_focal_dice" and ref("emkd", "alone_focal_dice").id == "alone"
    assert ref("III", "coco", "enet") == _table_row("III", "alone", "enet")
    assert ref("graph_flow", "graph_flow_semi60").id == "alone_semi60"
    assert ref("scarce", "emkd_semi10").id == "alone_semi10" and ref("scarce", "kd_coco_semi20").id == "alone_semi20"
    records = [{"row": "alone", "reference": "", "seed": s, "miou": m} for s, m in [(0, 0.5), (1, 0.6), (2, 0.7)]]
    records += [{"row": "kd", "reference": "alone", "seed": s, "miou": m} for s, m in [(0, 0.6), (1, 0.8), (2, 1.0)]]
    (test,) = report.paired(records)
    assert [s for s, _ in test["pairs"]] == [0, 1, 2]
    assert [d for _, d in test["pairs"]] == pytest.approx([0.1, 0.2, 0.3])
    assert test["wins"] == 3 and test["sign_p"] == pytest.approx(0.25)
    assert test["t_p"] == pytest.approx(1 - math.sqrt(12 / 14))


def test_the_plan_counts_shared_rows_once():
    plan = {p["table"]: p for p in tuning.plan([TABLES["I"], TABLES["II"]], [0, 1])}
    assert (plan["I"]["default"], plan["I"]["default_new"]) == (10, 10)
    assert (plan["II"]["default"], plan["II"]["default_new"]) == (12, 8)  # alone and coco are Table I's
    assert (plan["I"]["tuned"], plan["I"]["tuned_new"]) == (5 * 4 + 10, 30)
    # II: KD searches 4 weights + 3 temperatures; alone and coco were searched for Table I.
    assert (plan["II"]["tuned"], plan["II"]["tuned_new"]) == (7 + 5 * 4 + 12, (7 + 2) + 3 * (4 + 2))
    text = tuning.format_plan([TABLES["I"], TABLES["II"]], [0, 1], run_seconds=36)
    assert "18" in text and "0.2 h" in text  # 18 new default runs, at 36 s a run
    assert "0.1 h" in tuning.format_plan([TABLES["I"], TABLES["II"]], [0, 1], run_seconds=36, jobs=2)


@pytest.mark.slow  # 8 training processes: about 4 CPU-minutes at tiny scale, most of it process start-up
def test_a_small_table_tuned_end_to_end(tmp_path, monkeypatch):
    rows = [make_row("alone", "student alone", "enet", losses="none", adversarial=False),
            make_row("kd", "KD", "enet", losses="kd", adversarial=False)]
    # --grid: 2 learning rates; 2 KD weights, then 1 more T
    argv = [tiny_table(tmp_path, rows), "--tune", "--grid=0.1,1", "--seeds=0", "--tune_seed=7", f"--config={TINY}", f"--work={tmp_path / 'work'}",
            f"--out={tmp_path / 'out'}", "--student_epochs=1", "--teacher_epochs=1", "--train_samples=8",
            "--val_samples=4", "--num_overlays=0", "--save_every_iters=0"]
    assert cli.main(argv) == 0
    with open(tmp_path / "out" / "tiny_tuned_search.csv") as f:
        search = list(csv.DictReader(f))
    assert [(r["row"], r["axis"]) for r in search] == [("student alone", "student_lr")] * 2 + \
        [("KD", "weight")] * 2 + [("KD", "kd.temperature")] * 2
    for axis in ("student_lr", "weight", "kd.temperature"):
        points = [r for r in search if r["axis"] == axis]
        best = max(float(r["val_miou"]) for r in points)
        chosen = [r for r in points if r["chosen"] == "True"]
        assert len(chosen) == 1 and float(chosen[0]["val_miou"]) == best
    # The search ran at the tuning seed only, the chosen setting at the table's seed.
    work = tmp_path / "work" / "enet"
    assert {p.name for p in work.glob("*/seed*")} == {"seed7", "seed0"}
    assert len(list(work.glob("*/seed7"))) == 2 + 3
    text = (tmp_path / "out" / "tiny_tuned.md").read_text()
    assert "## Tuning" in text and "## Against the student alone" in text and "seed 7" in text
    with open(tmp_path / "out" / "tiny_tuned.csv") as f:
        records = list(csv.DictReader(f))
    assert [r["row"] for r in records] == ["student alone", "KD"] and records[1]["reference"] == "student alone"
