"""`cocofast experiments` as a tool: a user's own teacher, student (import paths) and folder data set, from a
wheel-installed cocofast with the checkout off sys.path; and the table files' rules."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_folder_dataset

from cocofast.train.experiments import cli, tables
from cocofast.train.experiments.tables import TableError, load_table, methods_table

ROOT = Path(__file__).resolve().parents[1]

NETWORKS = '''
import torch
from torch import nn
import torch.nn.functional as F


class Net(nn.Module):
    """Two levels: `down` and `up` both at H/2 (the taps)."""

    def __init__(self, in_channels=3, num_classes=2, base=4):
        super().__init__()
        self.inc = nn.Sequential(nn.Conv2d(in_channels, base, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(base, 2 * base, 3, padding=1), nn.ReLU())
        self.up = nn.Sequential(nn.Conv2d(2 * base, base, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(2 * base, num_classes, 1)

    def forward(self, x):
        x1 = self.inc(x)
        y = self.up(self.down(F.max_pool2d(x1, 2)))
        return self.head(torch.cat([F.interpolate(y, scale_factor=2.0), x1], 1))
'''

CONFIG = '''
dataset: folder
data_root: data            # relative: read from the directory the command runs in
mask_values: "0:0,255:1"
image_size: 32
batch_size: 4
eval_batch_size: 4
num_workers: 0
progress: false
save_every_iters: 0
num_overlays: 0
teacher_model: "mynets:Net"
teacher_model_kwargs: {base: 8}
teacher_taps: [down, up]
teacher_input_divisor: 2
student_model: "mynets:Net"
student_model_kwargs: {base: 4}
student_taps: [down, up]
student_input_divisor: 2
teacher_epochs: 1
student_epochs: 1
teacher_lr: 1.0e-2
student_lr: 1.0e-2
'''


def user_project(folder: Path) -> Path:
    """What a user brings: their networks (mynets.py), a folder data set and a training config."""
    folder.mkdir(parents=True)
    (folder / "mynets.py").write_text(NETWORKS)
    (folder / "my.yaml").write_text(CONFIG)
    write_folder_dataset(folder / "data", side=32)
    return folder


def test_a_methods_table_plans_runs_of_the_users_own_networks(tmp_path, monkeypatch, capsys):
    user = user_project(tmp_path / "user")
    monkeypatch.chdir(user)
    monkeypatch.syspath_prepend(str(user))
    assert cli.main(["--config", "my.yaml", "--methods", "kd,at", "--seeds", "0-1", "--tune", "--grid=0.5,1",
                     "--dry_run"]) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if "cocofast.train.distill" in line]
    assert commands and not any("--student_model" in c for c in commands)  # the config's own student
    assert all(f"--config {user / 'my.yaml'}" in c for c in commands)
    # Runs under ./runs/experiments (the default --work) in the user's directory, the student's folder "student".
    assert f"--run_dir={user / 'runs' / 'experiments' / 'student' / 'kd' / 'seed1'}" in out
    assert "seed 100" in out and "--losses=kd:1:temperature=2" in out  # the grid's 0.5 point of KD's T = 4
    assert not (user / "runs").exists()


def test_a_methods_table_pairs_every_method_with_the_student_alone():
    table = methods_table(["coco", "kd", "coco"])
    assert [r.id for r in table.rows] == ["alone", "coco", "kd"] and all(r.student == "" for r in table.rows)
    assert [tables.reference_of(table.rows, r) for r in table.rows] == [None, table.rows[0], table.rows[0]]
    assert table.rows[1].args() == ["--adversarial=true", "--losses=coco"]
    with pytest.raises(TableError, match="unknown method 'kdd'"):
        methods_table(["kdd"])


def test_the_packaged_tables_keep_their_invariants():
    known = tables.packaged_tables()
    assert list(known) == ["I", "II", "III", "emkd", "graph_flow", "cpkd", "drift", "teacher", "scarce", "scarce10",
                           "scarce20"]
    # The paper's tables name their students; a row id means one setting everywhere (checked on load).
    assert all(r.student for t in known.values() for r in t.rows if isinstance(r, tables.Row))
    scarce = [r for r in known["scarce"].rows if isinstance(r, tables.Row)]
    assert known["scarce10"].rows == [tables.TEACHER, *[r for r in scarce if r.id.endswith("_semi10")]]
    assert known["teacher"].rows == [tables.TEACHER_SEEDS]
    assert dict(next(r for r in known["drift"].rows if r.id == "coco_drift_semi20").settings) == {
        "adversarial": "true", "drift_weight": "0.001", "labelled_fraction": "0.2", "losses": "coco"}


def test_a_table_file_that_reuses_an_id_with_other_settings_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("title: t\nrows:\n  - {method: kd, id: alone}\n")
    clash = load_table(bad)
    with pytest.raises(TableError, match="'alone'.*two different settings"):
        tables.check_ids_are_consistent([methods_table([]), clash])
    for text, words in [("rows: []\n", "needs a title"), ("title: t\nrow: []\n", "unknown key(s) row"),
                        ("title: t\nrows:\n  - {method: nope}\n", "row 1: unknown method 'nope'"),
                        ("title: t\n", "no rows"), ("title: t\ngrid: [0.1, 10]\nrows: [{method: kd}]\n", "including 1")]:
        bad.write_text(text)
        with pytest.raises(TableError, match=None) as err:
            load_table(bad)
        assert words in str(err.value) and str(bad) in str(err.value)


def test_seeds_take_ranges_and_bad_lists_exit_2_in_one_line(tmp_path, capsys):
    assert cli.parse_seeds("--seeds", "0-2,5") == [0, 1, 2, 5]
    for argv, words in [(["--methods=kd", "--seeds=0-2,1"], "listed twice"), (["--methods=kd", "--seeds=3-1"], "0-4"),
                        (["--methods=kdd"], "unknown method 'kdd'"), (["--methods=kd", "--grid=2,3"], "including 1"),
                        ([], "give --methods"), ([str(tmp_path / "nope.yaml")], "cannot read it")]:
        with pytest.raises(SystemExit) as exit:
            cli.main(argv)
        assert exit.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.slow  # builds a wheel, then 1 teacher + 13 student runs of tiny networks: about 2 minutes on 2 cores
def test_cocofast_experiments_on_own_networks_and_data_from_a_wheel(tmp_path):
    # A wheel of this source, installed into a folder of its own; the checkout itself is never on sys.path.
    source = tmp_path / "source"
    for name in ("cocofast", "kernels", "train", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("cocofast-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    user = user_project(tmp_path / "user")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(user)]), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import cocofast.train.experiments.tables as t; "
                            "print(t.__file__); print(t.tables_folder())"],
                           cwd=user, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    run = subprocess.run([sys.executable, "-m", "cocofast", "experiments", "--config", "my.yaml",
                          "--methods", "kd,at", "--seeds", "0-1", "--tune", "--grid=0.5,1", "--jobs=2",
                          "--work", "work", "--out", "tables"], cwd=user, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(user / "tables" / "methods_tuned.csv") as f:
        records = list(csv.DictReader(f))
    assert [(r["row"], r["seed"]) for r in records] == [(label, seed) for label in ("student alone", "KD", "AT")
                                                       for seed in ("0", "1")]
    assert {r["network"] for r in records} == {"mynets:Net"}
    assert [r["reference"] for r in records] == ["", "", "student alone", "student alone", "student alone",
                                                 "student alone"]
    # The paired differences in the report are the rows' mIoU minus the student alone's, seed by seed.
    miou = {(r["row"], r["seed"]): float(r["miou"]) for r in records}
    text = (user / "tables" / "methods_tuned.md").read_text()
    for label in ("KD", "AT"):
        pairs = ", ".join(f"{s}: {miou[(label, s)] - miou[('student alone', s)]:+.4f}" for s in ("0", "1"))
        assert f"| {label} | student alone | {pairs} |" in text
    with open(user / "tables" / "methods_tuned_search.csv") as f:
        search = list(csv.DictReader(f))
    assert [(r["row"], r["axis"]) for r in search] == [("student alone", "student_lr")] * 2 + \
        [("KD", "weight")] * 2 + [("KD", "kd.temperature")] * 2 + [("AT", "weight")] * 2
    assert {p.name for p in (user / "work" / "student").glob("*/seed*")} == {"seed0", "seed1", "seed100"}
    assert "installed, not a git checkout" in text
