"""The training pipeline: configuration errors, schedules, checkpoints, exact resume, DDP, bf16.

Everything runs configs/tiny.yaml (a few seconds per stage on one core). One uninterrupted run of every stage
is shared by the tests that need trained weights.
"""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import write_folder_dataset

from cocofast.models import create_model
from cocofast.train import distill
from cocofast.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from cocofast.train.config import ConfigError, TrainConfig, parse_args
from cocofast.train.schedule import lr_factor

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def run(run_dir: Path, *extra: str) -> int:
    return distill.main(["--config", TINY, f"--run_dir={run_dir}", *extra])


def weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {role: spec["state_dict"] for role, spec in load_checkpoint(path)["models"].items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for role in a:
        assert a[role].keys() == b[role].keys()
        for name in a[role]:
            assert torch.equal(a[role][name], b[role][name]), f"{role}.{name} differs"


def summary_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """Every stage of the tiny config, uninterrupted, with two students (CoCo+AdvD, and alone)."""
    run_dir = tmp_path_factory.mktemp("full")
    assert run(run_dir) == 0
    assert run(run_dir, "--stage=student", "--student_name=alone", "--losses=none", "--adversarial=false") == 0
    assert run(run_dir, "--stage=eval", "--eval_students=student,alone") == 0
    return run_dir


# --- configuration ---------------------------------------------------------------------------------------
def test_paper_yaml_matches_the_defaults():
    from_file = parse_args(["--config", str(ROOT / "configs" / "paper.yaml")]).to_dict()
    defaults = TrainConfig().to_dict()
    assert {k: v for k, v in from_file.items() if from_file[k] != defaults[k]} == {"run_dir": "runs/paper"}


def test_every_shipped_config_parses():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        parse_args(["--config", str(path)])


def test_overrides_types_and_precedence(tmp_path):
    (tmp_path / "c.yaml").write_text("student_lr: 3e-3\nbatch_size: 4\nflips: false\n")
    cfg = parse_args(["--config", str(tmp_path / "c.yaml"), "--batch_size=2", "--resume", "--losses", "cmss,kd:0.5"])
    assert (cfg.student_lr, cfg.batch_size, cfg.flips, cfg.resume) == (3e-3, 2, False, True)
    assert [(s.name, s.weight, s.params) for s in cfg.loss_specs()] == [("cmss", None, {}), ("kd", 0.5, {})]
    assert parse_args(["--losses=none"]).loss_specs() == []
    specs = parse_args(["--losses=kd:1:T=2,cpkd:tau=0.5:pixel_weight=0"]).loss_specs()
    assert [(s.name, s.weight, s.params) for s in specs] == [("kd", 1.0, {"T": 2}), ("cpkd", None,
                                                                                     {"tau": 0.5, "pixel_weight": 0})]
    assert specs[0].build().temperature == 2.0 and specs[1].build().tau == 0.5


@pytest.mark.parametrize("argv, words", [
    (["--batch_sise=4"], ["unknown config key 'batch_sise'", "batch_size"]),
    (["--batch_size=eight"], ["'batch_size'", "expected int", "'eight'"]),
    (["--flips=maybe"], ["'flips'", "expected bool"]),
    (["--student_lr=fast"], ["'student_lr'", "expected float"]),
    (["--losses=cocoa"], ["'losses'", "'cocoa'", "did you mean coco", "ifvd"]),
    (["--losses=kd:lots"], ["'losses'", "weight of 'kd'", "'lots'"]),
    (["--losses=kd,kd"], ["'losses'", "listed twice"]),
    (["--paraphraser_clip=-1"], ["'paraphraser_clip'", ">= 0"]),
    (["--losses=kd:T=0"], ["'losses'", "temperature must be a finite number > 0"]),
    (["--losses=kd:tau=2"], ["'losses'", "unknown hyper-parameter(s) tau", "temperature", "T (= temperature)"]),
    (["--losses=kd:1:2"], ["'losses'", "two weights"]),
    (["--similarity_backend=chunked"], ["'similarity_backend'", "'chunked'", "gram"]),
    (["--pixel_relation_backend=gram"], ["'pixel_relation_backend'", "'gram'", "chunked"]),
    (["--loss_modules=no_such_module_here"], ["'loss_modules'", "no_such_module_here", "ModuleNotFoundError"]),
    (["--labelled_fraction=0"], ["'labelled_fraction'", "(0, 1]"]),
    (["--supervised_loss=dice"], ["'supervised_loss'", "focal_dice"]),
    (["--batch_size=0"], ["'batch_size'", ">= 1"]),
    (["--gp_every=0"], ["'gp_every'", ">= 1"]),
    (["--config", "/nonexistent/cfg.yaml"], ["config file not found", "/nonexistent/cfg.yaml"]),
    (["stray"], ["unexpected argument 'stray'"]),
])
def test_config_errors_name_the_key(argv, words):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    for word in words:
        assert word in str(err.value)


def test_yaml_errors_name_key_and_file(tmp_path):
    bad_key, bad_type, not_map = tmp_path / "k.yaml", tmp_path / "t.yaml", tmp_path / "m.yaml"
    bad_key.write_text("teacher_epoch: 3\n")
    bad_type.write_text("batch_size: 2.5\n")
    not_map.write_text("- 1\n- 2\n")
    for path, words in [(bad_key, ["unknown config key 'teacher_epoch'", "teacher_epochs"]),
                        (bad_type, ["'batch_size'", "expected int", "2.5"]), (not_map, ["mapping"])]:
        with pytest.raises(ConfigError) as err:
            parse_args(["--config", str(path)])
        assert str(path) in str(err.value)
        for word in words:
            assert word in str(err.value)


def test_cli_reports_config_errors_with_exit_status_2(capsys):
    assert distill.main(["--config", TINY, "--image_sise=64"]) == 2
    assert "unknown config key 'image_sise'" in capsys.readouterr().err


def test_image_size_the_networks_cannot_take_is_refused_before_training(tmp_path, capsys):
    assert run(tmp_path, "--stage=teacher", "--teacher_model=mobile_unet", "--image_size=48") == 2
    assert "config key 'image_size'" in capsys.readouterr().err
    assert not (tmp_path / "teacher" / "last.pt").exists()


def test_folder_dataset_trains_and_bad_folders_are_named(tmp_path, capsys):
    write_folder_dataset(tmp_path / "data", side=80)
    folder = ["--dataset=folder", f"--data_root={tmp_path / 'data'}", "--mask_values=0:0,255:1"]
    assert run(tmp_path / "run", *folder, "--stage=teacher", "--teacher_epochs=1") == 0
    assert run(tmp_path / "run", *folder, "--stage=eval") == 0  # no test/ split: scored on val/
    assert (tmp_path / "run" / "eval.csv").is_file()
    # A mask value outside the declared mapping is named with its file and the key.
    assert run(tmp_path / "bad", "--dataset=folder", f"--data_root={tmp_path / 'data'}", "--stage=teacher") == 2
    err = capsys.readouterr().err
    assert "config key 'data_root'" in err and "p0.png" in err and "255" in err


# --- schedule and checkpoint pieces ----------------------------------------------------------------------
def test_poly_and_stepped_schedules():
    kw = dict(total_iters=1000, iters_per_epoch=10)
    assert lr_factor(0, **kw) == 1.0
    assert lr_factor(1000, **kw) == 0.0
    assert math.isclose(lr_factor(500, **kw), 0.5**0.9)
    # poly_step: x0.1 after every 50 epochs, on top of the poly decay (epochs 0-49, 50-99, ...).
    step = dict(kind="poly_step", step_epochs=50, step_gamma=0.1, **kw)
    assert math.isclose(lr_factor(499, **step), (1 - 0.499) ** 0.9)
    assert math.isclose(lr_factor(500, **step), 0.1 * 0.5**0.9)
    assert math.isclose(lr_factor(999, **step), 0.1 * 0.001**0.9)
    assert lr_factor(123, total_iters=1000, iters_per_epoch=10, kind="constant") == 1.0


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    save_checkpoint(tmp_path / "rng.pt", models={}, rng=capture_rng())
    first = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    restore_rng(load_checkpoint(tmp_path / "rng.pt")["rng"])
    second = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2:] == second[2:]


# --- the pipeline ----------------------------------------------------------------------------------------
def test_full_run_writes_everything_a_person_reads(full_run):
    for stage in ("teacher", "paraphraser", "student", "alone"):
        folder = full_run / stage
        for name in ("last.pt", "best.pt", "summary.csv", "config.yaml", "curves.png"):
            assert (folder / name).is_file(), folder / name
    assert (full_run / "student" / "overlays_best.png").is_file()
    columns = summary_rows(full_run / "student" / "summary.csv")[0].keys()
    for col in ("loss_ce", "loss_coco", "loss_adv_g", "loss_total", "d_loss", "d_gp", "val_acc", "val_miou",
                "lr_student", "lr_discriminator"):
        assert col in columns
    assert "loss_coco" not in summary_rows(full_run / "alone" / "summary.csv")[0]
    with open(full_run / "eval.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"teacher", "student", "alone"}
    assert all(0 <= float(r["miou"]) <= 1 and int(r["params"]) > 0 for r in rows.values())
    # The agreed checkpoint format rebuilds the network with create_model alone.
    spec = torch.load(full_run / "student" / "best.pt", weights_only=True)["models"]["student"]
    create_model(spec["model_name"], **spec["model_kwargs"]).load_state_dict(spec["state_dict"])


def test_curves_are_redrawn_at_most_every_curves_every_s_and_after_the_last_epoch(tmp_path, monkeypatch):
    from cocofast.train import report
    drawn = []
    monkeypatch.setattr(report, "plot_curves", lambda history, path, title: drawn.append(len(history)))
    assert run(tmp_path / "rare", "--stage=teacher", "--teacher_epochs=3", "--curves_every_s=1e9") == 0
    assert drawn == [1, 3]  # the first epoch (nothing drawn yet) and the last
    assert len(summary_rows(tmp_path / "rare" / "teacher" / "summary.csv")) == 3  # the CSV after every epoch
    drawn.clear()
    assert run(tmp_path / "every", "--stage=teacher", "--teacher_epochs=3", "--curves_every_s=0") == 0
    assert drawn == [1, 2, 3]


def test_resume_after_kills_mid_epoch_is_bit_identical(full_run, tmp_path):
    # tiny.yaml: 4 iterations per epoch, last.pt every 2. Kill 1 lands in the teacher's first epoch after
    # iteration 3 (resume from 2); kill 2 in the student's second epoch after iteration 7 (resume from 6).
    assert run(tmp_path, "--stop_after_iters=3") == 3
    assert load_checkpoint(tmp_path / "teacher" / "last.pt")["batch_in_epoch"] == 2
    assert run(tmp_path, "--resume", "--stop_after_iters=17") == 3
    ckpt = load_checkpoint(tmp_path / "student" / "last.pt")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["iteration"]) == (1, 2, 6)
    assert run(tmp_path, "--resume") == 0
    for stage in ("teacher", "paraphraser", "student"):
        assert_same_weights(weights(full_run / stage / "last.pt"), weights(tmp_path / stage / "last.pt"))
        assert summary_rows(full_run / stage / "summary.csv") == summary_rows(tmp_path / stage / "summary.csv")
    # The optimiser state and learning rate continue too, not only the weights.
    a, b = load_checkpoint(full_run / "student" / "last.pt"), load_checkpoint(tmp_path / "student" / "last.pt")
    assert a["schedulers"] == b["schedulers"]
    assert torch.equal(a["optimizers"]["student"]["state"][0]["exp_avg_sq"],
                       b["optimizers"]["student"]["state"][0]["exp_avg_sq"])


def test_resume_refuses_changed_settings_and_foreign_checkpoints(full_run, tmp_path, capsys):
    assert run(tmp_path, "--stage=teacher", "--stop_after_iters=3") == 3
    assert run(tmp_path, "--stage=teacher", "--resume", "--teacher_lr=0.5") == 2
    assert "teacher_lr: checkpoint has 0.001, now 0.5" in capsys.readouterr().err
    assert run(tmp_path, "--stage=teacher") == 2
    assert "pass --resume" in capsys.readouterr().err
    # A teacher checkpoint of another width is refused, naming both networks.
    teacher = full_run / "teacher" / "best.pt"
    assert run(tmp_path / "b", "--stage=paraphraser", f"--teacher_checkpoint={teacher}", "--teacher_width=0.5") == 2
    err = capsys.readouterr().err
    assert "width=0.25" in err and "width=0.5" in err and str(teacher) in err


def test_ablation_switches_and_bf16_autocast(full_run, tmp_path):
    common = [f"--teacher_checkpoint={full_run / 'teacher' / 'best.pt'}",
              f"--paraphraser_checkpoint={full_run / 'paraphraser' / 'best.pt'}", "--stage=student",
              "--student_epochs=1"]
    # SS on raw teacher taps (64 vs 16 channels: only N must match) with logit KD, no critic.
    assert run(tmp_path, *common, "--student_name=ss", "--losses=skd_pairwise,kd:1", "--use_paraphraser=false",
               "--adversarial=false") == 0
    row = summary_rows(tmp_path / "ss" / "summary.csv")[0]
    assert "loss_skd_pairwise" in row and "loss_kd" in row and "d_loss" not in row
    # CMSS with the paraphraser and a logits-only critic, in bf16 autocast: finite losses and weights.
    assert run(tmp_path, *common, "--student_name=cmss", "--losses=cmss", "--disc_input=logits",
               "--amp=bf16") == 0
    row = summary_rows(tmp_path / "cmss" / "summary.csv")[0]
    for key in ("loss_cmss", "loss_total", "d_loss", "val_miou"):
        assert math.isfinite(float(row[key])), (key, row[key])
    for tensors in weights(tmp_path / "cmss" / "last.pt").values():
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


DDP_WORKER = """
import os, sys, torch
import cocofast.train.stages as stages
from cocofast.models import unwrap_model as unwrap
original = stages.run_stage

def run_and_dump(stage, cfg, rt, *args):
    original(stage, cfg, rt, *args)
    dump = {role: {k: v.detach().cpu().clone() for k, v in unwrap(m).state_dict().items()}
            for role, (_, _, m) in stage.models.items()}
    torch.save(dump, os.path.join(cfg.run_dir, f"rank{rt.rank}_{stage.out_dir.name}.pt"))

stages.run_stage = run_and_dump
from cocofast.train import distill
sys.exit(distill.main(sys.argv[1:]))
"""


def test_two_process_gloo_run_ends_with_identical_weights_on_both_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(DDP_WORKER))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--config", TINY, f"--run_dir={tmp_path}", "--stage=all", "--device=cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("teacher", "paraphraser", "student"):
        rank0 = torch.load(tmp_path / f"rank0_{stage}.pt")
        rank1 = torch.load(tmp_path / f"rank1_{stage}.pt")
        assert_same_weights(rank0, rank1)
        # ...and they are the weights rank 0 saved.
        assert_same_weights(rank0, weights(tmp_path / stage / "last.pt"))
    assert (tmp_path / "eval.csv").is_file()
