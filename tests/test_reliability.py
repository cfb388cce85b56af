"""Nothing silently wrong, nothing lost: checkpoints, the run folder, configuration values, file writes.

Each test reproduces one way a run could go wrong without saying so (docs/reliability.md lists them) on
configs/tiny.yaml with one-epoch stages.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cocofast.checkpoint import CheckpointError, network_digest, read_checkpoint
from cocofast.io import WriteError, atomic_save, atomic_write_text
from cocofast.models import create_model
from cocofast.train import distill, loop
from cocofast.train.checkpoint import check_sources, load_checkpoint, save_checkpoint, source_digests
from cocofast.train.config import ConfigError, parse_args
from cocofast.train.rundir import lock_run_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
TEACHER = ["--stage=teacher", "--teacher_epochs=1"]


def run(run_dir: Path, *extra: str) -> int:
    return distill.main(["--config", TINY, f"--run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("teacher_run")
    assert run(run_dir, *TEACHER) == 0
    return run_dir


@pytest.fixture
def copy_of(teacher_run, tmp_path):
    shutil.copytree(teacher_run, tmp_path / "run")
    return tmp_path / "run"


# --- 2: a student folder named like another stage's --------------------------------------------------------
@pytest.mark.parametrize("name", ["teacher", "paraphraser", "../elsewhere", ".hidden", ""])
def test_student_names_that_would_land_on_another_folder_are_refused(name):
    with pytest.raises(ConfigError, match="'student_name'"):
        parse_args([f"--student_name={name}"])


# --- 3: best.pt before last.pt -----------------------------------------------------------------------------
def test_a_failure_between_the_best_and_last_writes_never_leaves_a_finished_stage_without_its_best(
        tmp_path, monkeypatch, capsys):
    original = loop.save_checkpoint

    def fail_on_best(path, **content):
        if Path(path).name == "best.pt":
            raise WriteError(f"could not write {path} (disk full?): injected")
        original(path, **content)

    monkeypatch.setattr(loop, "save_checkpoint", fail_on_best)
    assert run(tmp_path, *TEACHER) == 2
    assert "could not write" in capsys.readouterr().err
    monkeypatch.setattr(loop, "save_checkpoint", original)
    assert run(tmp_path, *TEACHER, "--resume") == 0
    last, best = (load_checkpoint(tmp_path / "teacher" / n) for n in ("last.pt", "best.pt"))
    assert last["finished"] and (best["epoch"], best["run_id"]) == (last["best_epoch"], last["run_id"])


def test_a_finished_stage_beside_a_foreign_best_pt_is_refused(copy_of, capsys):
    best_path = copy_of / "teacher" / "best.pt"
    best = load_checkpoint(best_path)
    best.pop("checksum")
    save_checkpoint(best_path, **{**best, "run_id": "another run"})
    assert run(copy_of, *TEACHER, "--resume") == 2
    assert "does not belong" in capsys.readouterr().err


# --- 4: one run per folder ---------------------------------------------------------------------------------
def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(tmp_path, capsys):
    with lock_run_dir(tmp_path):
        assert run(tmp_path, *TEACHER) == 2
    err = capsys.readouterr().err
    assert "in use by another training run" in err and f"pid {os.getpid()}" in err
    assert not (tmp_path / "teacher").exists()


def test_the_lock_dies_with_a_killed_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from cocofast.train.rundir import lock_run_dir
        lock = lock_run_dir({str(tmp_path)!r})
        print("held", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            lock_run_dir(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_run_dir(tmp_path).release()


# --- 5: what a stage was distilled from ----------------------------------------------------------------------
def test_source_digests_follow_the_weights_not_the_file(tmp_path):
    torch.manual_seed(0)
    kwargs = {"in_channels": 3, "num_classes": 2, "width": 0.25}
    teacher, other = create_model("erfnet", **kwargs), create_model("erfnet", **kwargs)
    entry = {"model_name": "erfnet", "model_kwargs": kwargs, "state_dict": teacher.state_dict()}
    save_checkpoint(tmp_path / "t.pt", models={"teacher": entry})
    reloaded = create_model("erfnet", **kwargs)
    reloaded.load_state_dict(read_checkpoint(tmp_path / "t.pt")["models"]["teacher"]["state_dict"])
    recorded = source_digests(teacher=teacher)
    assert source_digests(teacher=reloaded) == recorded
    assert recorded["teacher"] == network_digest("erfnet", kwargs, teacher.state_dict())
    check_sources(recorded, source_digests(teacher=reloaded), "last.pt")
    with pytest.raises(CheckpointError, match="teacher: checkpoint was trained from"):
        check_sources(recorded, source_digests(teacher=other), "last.pt")
    with pytest.raises(CheckpointError, match="does not record"):
        check_sources(None, recorded, "last.pt")
    with pytest.warns(UserWarning, match="does not record"):
        check_sources(None, recorded, "last.pt", finished=True)
    pair = torch.nn.ModuleList([create_model("paraphraser", in_channels=8, k=4)] * 2)
    assert set(source_digests(teacher=teacher, paraphraser=pair, critic=None)) == {
        "teacher", "paraphraser0", "paraphraser1"}


def test_resuming_a_student_against_another_teacher_is_refused(teacher_run, tmp_path, capsys):
    other = tmp_path / "other"
    assert run(other, *TEACHER, "--seed=1") == 0
    student = [str(tmp_path / "s"), "--stage=student", "--student_epochs=1", "--losses=kd", "--adversarial=false",
               "--use_paraphraser=false"]
    used = f"--teacher_checkpoint={teacher_run / 'teacher' / 'best.pt'}"
    assert run(*student, used, "--stop_after_iters=3") == 3
    assert run(*student, f"--teacher_checkpoint={other / 'teacher' / 'best.pt'}", "--resume") == 2
    assert "teacher: checkpoint was trained from" in capsys.readouterr().err
    assert run(*student, used, "--resume") == 0


# --- 6: checksums ------------------------------------------------------------------------------------------
def test_a_flipped_byte_inside_a_tensor_is_caught_on_load(tmp_path):
    pattern = torch.arange(4096, dtype=torch.float32) * 0.5 + 1234.25
    path = tmp_path / "c.pt"
    save_checkpoint(path, models={}, weights=pattern)
    assert torch.equal(load_checkpoint(path)["weights"], pattern)
    raw = bytearray(path.read_bytes())
    at = raw.find(pattern.numpy().tobytes()[:64])
    assert at >= 0
    raw[at + 1000] ^= 0x10
    path.write_bytes(bytes(raw))
    assert torch.load(path, weights_only=True)["weights"].ne(pattern).sum() == 1  # torch itself notices nothing
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_checkpoints_without_a_checksum_still_load(tmp_path):
    atomic_save({"models": {"student": {"model_name": "enet", "model_kwargs": {}, "state_dict": {}}}},
                tmp_path / "hand_made.pt")
    assert "student" in read_checkpoint(tmp_path / "hand_made.pt")["models"]


# --- 12: duplicate YAML keys --------------------------------------------------------------------------------
def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("batch_size: 2\nflips: false\nbatch_size: 4\n")
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", str(path)])
    assert str(path) in str(err.value) and "'batch_size' twice (lines 1 and 3)" in str(err.value)


# --- 13: exit-2 messages instead of tracebacks --------------------------------------------------------------
@pytest.mark.parametrize("arg, words", [
    ("--student_model=mobilenet", ["'student_model'", "'mobilenet'", "mobile_unet"]),
    ("--teacher_width=0", ["'teacher_width'", "> 0"]),
    ("--student_width=-1", ["'student_width'", "> 0"]),
    ("--in_channels=2", ["'in_channels'", "1 (grayscale) or 3 (RGB)"]),
    ("--teacher_lr=nan", ["'teacher_lr'", "finite"]),
    ("--student_lr=-0.1", ["'student_lr'", ">= 0"]),
    ("--lr_power=nan", ["'lr_power'", "finite"]),
    ("--disc_beta2=1", ["'disc_beta2'", "< 1"]),
])
def test_values_that_cannot_work_exit_2_before_any_stage(tmp_path, capsys, arg, words):
    assert run(tmp_path, arg) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(w in err for w in words), err
    assert not (tmp_path / "teacher").exists()


def test_a_full_disk_while_saving_is_a_clear_exit_2(tmp_path, monkeypatch, capsys):
    def full_disk(obj, f, *args, **kwargs):  # what torch's zip writer raises when the disk fills
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 1408 vs 1302")

    monkeypatch.setattr(torch, "save", full_disk)
    assert run(tmp_path, *TEACHER) == 2
    err = capsys.readouterr().err
    assert "could not write" in err and str(tmp_path / "teacher" / "last.pt") in err
    assert not list((tmp_path / "teacher").glob(".*.tmp"))


def test_a_real_short_write_becomes_a_write_error(tmp_path):
    # RLIMIT_FSIZE makes the kernel refuse writes past 64 KiB, as a full disk would (EFBIG instead of ENOSPC).
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from cocofast.io import WriteError, atomic_save
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        try:
            atomic_save({{"x": torch.zeros(100_000)}}, {str(tmp_path / "big.pt")!r})
        except WriteError as err:
            print("WriteError:", err)
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "WriteError: could not write" in done.stdout, done.stdout + done.stderr
    assert os.listdir(tmp_path) == []


def test_experiments_refuse_an_empty_seed_list(capsys):
    from cocofast import experiments

    with pytest.raises(SystemExit) as stop:
        experiments.main(["emkd", "--seeds=,", "--dry_run"])
    assert stop.value.code == 2 and "--seeds" in capsys.readouterr().err


# --- 15: leftovers -----------------------------------------------------------------------------------------
def test_a_finished_stage_skipped_on_resume_redraws_its_reports_and_clears_temporaries(copy_of):
    folder = copy_of / "teacher"
    drawn = ["summary.csv", "curves.png", "overlays_last.png", "overlays_best.png"]
    for name in drawn:
        (folder / name).unlink()
    (folder / ".curves.png.k1ll3d.tmp").write_bytes(b"half a png")
    assert run(copy_of, *TEACHER, "--resume") == 0
    assert all((folder / name).is_file() for name in drawn)
    assert not list(folder.glob(".*.tmp"))


def test_a_failed_overwrite_leaves_config_yaml_describing_the_checkpoints(copy_of):
    folder = copy_of / "teacher"
    assert run(copy_of, *TEACHER, "--overwrite", "--teacher_lr=0.5", "--stop_after_iters=1") == 3
    assert parse_args(["--config", str(folder / "config.yaml")]).teacher_lr == 1e-3
    assert load_checkpoint(folder / "last.pt")["config"]["teacher_lr"] == 1e-3
    # Once the new run has its first last.pt, the old run's best.pt and reports are gone with it.
    assert run(copy_of, *TEACHER, "--overwrite", "--teacher_lr=0.5", "--stop_after_iters=3") == 3
    assert parse_args(["--config", str(folder / "config.yaml")]).teacher_lr == 0.5
    assert not (folder / "best.pt").exists() and not (folder / "summary.csv").exists()


def test_written_files_honour_the_umask_and_are_synced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd)))
    old = os.umask(0o027)
    try:
        atomic_write_text("a", tmp_path / "a.txt")
        atomic_save({"x": torch.zeros(2)}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in ("a.txt", "b.pt")] == [0o640, 0o640]
    assert str(tmp_path) in synced and any(s.startswith(str(tmp_path / ".a.txt.")) for s in synced)
