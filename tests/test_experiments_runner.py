"""The runner's scheduling, with the training program replaced by a stand-in that writes what a run writes:
runs side by side give the same tables as runs one at a time, never more than --jobs at once, and a search
point is trained and validated but never scored on the test split."""
from __future__ import annotations

import json
import subprocess
import threading
import time
import zlib
from pathlib import Path

from cocofast.train.experiments import report, runner as runner_module, tables
from cocofast.train.experiments.runner import Runner

TABLE = tables.packaged_tables()["I"]  # five rows, three of them read the paraphrasers


class FakeTraining:
    """subprocess.run for the training program: a val_miou per epoch from the run folder's name, eval.json
    where the eval stage is asked for; counts the processes running at once."""

    def __init__(self):
        self.lock, self.running, self.most, self.commands = threading.Lock(), 0, 0, []

    def __call__(self, cmd, stdout=None, stderr=None):
        args = dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.commands.append(args)
        time.sleep(0.01)
        run_dir = Path(args["run_dir"])
        if args["stage"].startswith("student"):
            score = zlib.crc32(run_dir.parent.name.encode()) % 1000 / 1000
            (run_dir / "student").mkdir(parents=True, exist_ok=True)
            (run_dir / "student" / "summary.csv").write_text(f"epoch,val_miou\n1,{score / 2}\n2,{score}\n")
            if "eval" in args["stage"]:
                entry = {"model": "mobile_unet", "acc": score, "miou": score, "mdice": score, "params": 1,
                         "gmacs@64": 0.1}
                (run_dir / "eval.json").write_text(json.dumps([{**entry, "name": "teacher", "miou": 0.9},
                                                               {**entry, "name": "student"}]))
        with self.lock:
            self.running -= 1
        return subprocess.CompletedProcess(cmd, 0)


def tuned_table(tmp_path: Path, monkeypatch, jobs: int):
    fake = FakeTraining()
    monkeypatch.setattr(runner_module.subprocess, "run", fake)
    runner = Runner(tables.default_config(), tmp_path / f"work{jobs}", [], jobs=jobs)
    records, searches = report.run_table(TABLE, runner, [0, 1], tune_seed=100, tunings={})
    return records, searches, fake


def test_runs_side_by_side_make_the_same_table_within_the_jobs_limit(tmp_path, monkeypatch, capsys):
    one_at_a_time, searches1, fake1 = tuned_table(tmp_path, monkeypatch, jobs=1)
    side_by_side, searches3, fake3 = tuned_table(tmp_path, monkeypatch, jobs=3)
    assert fake1.most == 1 and fake3.most == 3  # the five rows' searches ask at once; three slots
    assert one_at_a_time == side_by_side  # the rows' order, every score, every chosen setting
    assert [s.chosen for s in searches1] == [s.chosen for s in searches3]
    assert [r["row"] for r in side_by_side][:3] == ["student alone"] * 2 + [TABLE.rows[1].label]
    # Each run once: the student alone's search is shared by the four rows that train at its rate.
    for fake in (fake1, fake3):
        dirs = [c["run_dir"] for c in fake.commands if c["stage"].startswith("student")]
        assert len(dirs) == len(set(dirs))
        assert sum(c["stage"] == "teacher" for c in fake.commands) == 1
        assert sum(c["stage"] == "paraphraser" for c in fake.commands) == 1


def test_a_search_point_is_never_scored_on_test(tmp_path, monkeypatch):
    records, searches, fake = tuned_table(tmp_path, monkeypatch, jobs=2)
    students = [c for c in fake.commands if c["stage"].startswith("student")]
    assert {c["stage"] for c in students if c["seed"] == "100"} == {"student"}
    assert {c["stage"] for c in students if c["seed"] != "100"} == {"student,eval"}
    assert len([c for c in students if c["seed"] == "100"]) == sum(s.runs for s in searches)
    # A finished search point is recognised by its record (no eval.json): a second invocation trains nothing.
    fake.commands.clear()
    runner = Runner(tables.default_config(), tmp_path / "work2", [], jobs=2)
    assert report.run_table(TABLE, runner, [0, 1], tune_seed=100, tunings={})[0] == records
    assert [c["stage"] for c in fake.commands] == ["teacher", "paraphraser"]  # --resume: quick no-ops


def test_runs_side_by_side_share_the_cores_unless_the_user_chose():
    assert runner_module.threads_per_run(2, [], environ={}, cores=2) == ["--threads=1"]
    assert runner_module.threads_per_run(3, [], environ={}, cores=16) == ["--threads=5"]
    assert runner_module.threads_per_run(8, [], environ={}, cores=2) == ["--threads=1"]
    assert runner_module.threads_per_run(1, [], environ={}, cores=16) == []  # one run: torch's own choice
    assert runner_module.threads_per_run(2, [], environ={"OMP_NUM_THREADS": "4"}, cores=2) == []
    assert runner_module.threads_per_run(2, ["--threads=2"], environ={}, cores=2) == []


def test_the_thread_count_reaches_each_run_but_not_its_record(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner_module.os, "cpu_count", lambda: 4)
    fake = FakeTraining()
    monkeypatch.setattr(runner_module.subprocess, "run", fake)
    runner = Runner(tables.default_config(), tmp_path / "work", [], jobs=2)
    runner.row(TABLE.rows[0], 0)
    assert fake.commands and all(c.get("threads") == "2" for c in fake.commands)
    record = json.loads((runner.run_dir(TABLE.rows[0], 0) / "experiment.json").read_text())
    assert not any(a.startswith("--threads") for a in record["args"])
    again = Runner(tables.default_config(), tmp_path / "work", [], jobs=1)  # other threads: the run is reused
    count = len(fake.commands)
    again.row(TABLE.rows[0], 0)
    assert len(fake.commands) == count
