"""The experiment runner: tables are well formed, runs are shared and resumed, outputs agree with the runs."""
from __future__ import annotations

import csv
import statistics
import subprocess
from pathlib import Path

import pytest

from cocofast import experiments
from cocofast.losses import list_losses
from cocofast.train.config import parse_args

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def test_every_row_is_a_valid_training_configuration():
    for name, (_, rows) in experiments.TABLES.items():
        for row in rows:
            if row == experiments.TEACHER:
                continue
            cfg = parse_args(["--config", str(experiments.DEFAULT_CONFIG), *row.args()])
            assert all(loss in list_losses() for loss in cfg.loss_names()), (name, row)


def test_the_issue_tables_list_the_methods_they_promise():
    labels = {name: [r.id for r in rows if r != experiments.TEACHER] for name, (_, rows) in experiments.TABLES.items()}
    assert labels["I"] == ["alone", "ss", "cmss", "cocod", "coco"]
    assert {"kd", "at", "fsp", "ifvd", "coco"} <= set(labels["II"])
    assert experiments.TEACHER in experiments.TABLES["III"][1]
    assert {r.student for r in experiments.TABLES["III"][1] if r != experiments.TEACHER} == {
        "mobile_unet", "enet", "erfnet"}
    for sibling in ("emkd", "graph_flow", "cpkd"):
        assert {"alone", "coco", sibling} <= set(labels[sibling])


def test_bad_arguments_are_refused(capsys):
    for argv, words in [(["IV"], "unknown table"), (["I", "--seeds=a"], "--seeds"),
                        (["I", "--student_epochs"], "unexpected argument"), (["I", "stray"], "unknown table"), (["I", "--config=/nope.yaml"], "not found")]:
        with pytest.raises(SystemExit):
            experiments.main(argv)
        assert words in capsys.readouterr().err


def test_a_small_table_end_to_end(tmp_path, monkeypatch, capsys):
    rows = [experiments._row("alone", "student alone", "enet", losses="none", adversarial=False),
            experiments._row("coco", "CoCo", "enet", losses="coco", adversarial=False)]
    monkeypatch.setitem(experiments.TABLES, "tiny", ("tiny check", [experiments.TEACHER, *rows]))
    argv = ["tiny", "--seeds=0,1", f"--config={TINY}", f"--work={tmp_path / 'work'}", f"--out={tmp_path / 'out'}",
            "--student_epochs=1", "--teacher_epochs=1"]
    assert experiments.main(argv) == 0
    with open(tmp_path / "out" / "tiny.csv") as f:
        records = list(csv.DictReader(f))
    assert [(r["id"], r["seed"]) for r in records] == [("teacher", "0"), ("alone", "0"), ("alone", "1"),
                                                       ("coco", "0"), ("coco", "1")]
    coco = [float(r["miou"]) for r in records if r["id"] == "coco"]
    text = (tmp_path / "out" / "tiny.md").read_text()
    assert f"{statistics.mean(coco):.4f} ± {statistics.stdev(coco):.4f}" in text
    assert "python -m cocofast.experiments tiny --seeds=0,1" in text
    assert (tmp_path / "out" / "tiny.png").stat().st_size > 1000
    # Seeds differ in the student's training, not in the data.
    alone = [r for r in records if r["id"] == "alone"]
    assert alone[0]["params"] == alone[1]["params"]
    # A second invocation reuses every finished run: no student is trained again.
    capsys.readouterr()
    assert experiments.main(argv) == 0
    assert ", seed " not in capsys.readouterr().out


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
    assert experiments.source_version(tmp_path, tmp_path / "results") == head
    (tmp_path / "results" / "I.md").write_text("new table\n")
    assert experiments.source_version(tmp_path, tmp_path / "results") == head
    assert experiments.source_version(tmp_path) == f"{head} with uncommitted changes"
    (tmp_path / "code.py").write_text("x = 2\n")
    assert experiments.source_version(tmp_path, tmp_path / "results") == f"{head} with uncommitted changes"
    assert experiments.source_version(tmp_path, tmp_path) == f"{head} with uncommitted changes"
