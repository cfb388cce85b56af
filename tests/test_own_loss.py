"""A user's own loss: one file of tensor maths, registered from the config, trained by train/distill.py.

Nothing under train/ knows the loss: `--loss_modules` imports the user's file, which registers it, and the
feature adapter feeds it what its `reads` declares.
"""
import csv
import math
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

USER_LOSS = '''
import torch
from cocofast.losses import DistillLoss, Reads, register_loss


class DeepMeanLoss(DistillLoss):
    """Match each network's mean deep-tap activation per image (a toy: a few lines of maths)."""
    reads = Reads("deep", teacher="paraphrased")

    def __init__(self, weight=None, power: float = 2.0):
        super().__init__(weight)
        self.power = power

    def distill(self, student, teacher, labels):
        (s,), (t,) = student, teacher
        return (s.mean(dim=(1, 2, 3)) - t.mean(dim=(1, 2, 3))).abs().pow(self.power).mean()


register_loss("deep_mean", DeepMeanLoss)
'''


def test_a_users_loss_in_one_file_trains_through_distill(tmp_path):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "my_loss.py").write_text(textwrap.dedent(USER_LOSS))
    run_dir = tmp_path / "run"
    base = [sys.executable, str(ROOT / "train" / "distill.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"--run_dir={run_dir}", "--teacher_epochs=1", "--paraphraser_epochs=1"]
    env = {"PYTHONPATH": str(pkg), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    teacher = subprocess.run([*base, "--stage=teacher,paraphraser"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    # Two iterations: one epoch of 16 samples at batch 8.
    proc = subprocess.run([*base, "--stage=student", "--student_epochs=1", "--batch_size=8",
                           "--loss_modules=my_loss", "--losses=deep_mean:0.5:power=1", "--adversarial=false"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = list(csv.DictReader((run_dir / "student" / "summary.csv").open()))
    assert rows and math.isfinite(float(rows[-1]["loss_deep_mean"])) and float(rows[-1]["loss_deep_mean"]) > 0


def test_an_unknown_loss_module_is_refused_before_training(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "distill.py"), "--config",
                           str(ROOT / "configs" / "tiny.yaml"), f"--run_dir={tmp_path}", "--loss_modules=nope_mod",
                           "--losses=deep_mean"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "loss_modules" in proc.stderr and "nope_mod" in proc.stderr
    assert not (tmp_path / "teacher").exists()
