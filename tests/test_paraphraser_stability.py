"""The paraphraser stage on a teacher whose taps are 100x larger, at a learning rate of 1e-2: plain MSE with
SGD (the paper; paraphraser_scale_free=false) goes to NaN in the first epoch, the scale-free objective stays
finite and learns (train/stages.py explains the change of units). Adam at 1e-3 (paraphraser_optimizer=adam,
what the experiments use) trains on plain MSE whatever the taps' scale."""
import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from cocofast.models import create_model
from cocofast.train import distill

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


class ScaledTaps(nn.Module):
    """A tiny ERFNet whose (shallow, deep) taps come out multiplied by `scale`, as a TorchScript teacher."""

    def __init__(self, scale: float):
        super().__init__()
        self.net, self.scale = create_model("erfnet", in_channels=3, num_classes=2, width=0.25).eval(), scale

    def forward(self, x):
        out = self.net(x)
        return out.logits, out.shallow * self.scale, out.deep * self.scale


def paraphraser_stage(tmp_path: Path, teacher: Path, scale_free: bool, name: str, *extra: str):
    run_dir = tmp_path / name
    rc = distill.main(["--config", TINY, f"--run_dir={run_dir}", "--stage=paraphraser", "--threads=1",
                       f"--teacher_checkpoint={teacher}", "--paraphraser_lr=1.0e-2", "--paraphraser_epochs=2",
                       f"--paraphraser_scale_free={str(scale_free).lower()}", *extra])
    summary = run_dir / "paraphraser" / "summary.csv"
    rows = list(csv.DictReader(open(summary))) if summary.is_file() else []
    return rc, rows


def test_large_teacher_taps_diverge_on_plain_mse_and_train_scale_free(tmp_path, capsys):
    torch.manual_seed(0)
    teacher = tmp_path / "teacher_x100.ts"
    torch.jit.trace(ScaledTaps(100.0), torch.rand(1, 3, 64, 64)).save(str(teacher))

    rc, rows = paraphraser_stage(tmp_path, teacher, scale_free=False, name="plain")
    err = capsys.readouterr().err
    assert rc == 4 and rows == [], err[-2000:]  # exit 4: a loss became NaN or infinite, in epoch 1
    assert "not finite at epoch 1" in err

    rc, rows = paraphraser_stage(tmp_path, teacher, scale_free=True, name="scale_free")
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert len(rows) == 2
    val = [float(r["val_rec"]) for r in rows]
    train = [float(r["loss_rec0"]) + float(r["loss_rec1"]) for r in rows]
    assert all(math.isfinite(v) for v in val + train)
    # Relative error: 1 is the all-zero reconstruction, where the paraphrasers start (their last layer is 0).
    assert val[1] < val[0] < 1.0, val
    assert train[1] < train[0], train


@pytest.mark.parametrize("scale", [100.0, 0.01])
def test_adam_trains_plain_mse_on_large_and_small_taps(tmp_path, capsys, scale):
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.ts"
    torch.jit.trace(ScaledTaps(scale), torch.rand(1, 3, 64, 64)).save(str(teacher))
    adam = ("--paraphraser_optimizer=adam", "--paraphraser_lr=1.0e-3")
    rc, rows = paraphraser_stage(tmp_path, teacher, False, "adam", *adam)
    assert rc == 0, capsys.readouterr().err[-2000:]
    # At lr 0 the paraphrasers keep their zero last layer: val_rec is then the all-zero output's error.
    rc, frozen = paraphraser_stage(tmp_path, teacher, False, "frozen", *adam, "--paraphraser_lr=0")
    assert rc == 0, capsys.readouterr().err[-2000:]
    val, zero = [float(r["val_rec"]) for r in rows], float(frozen[-1]["val_rec"])
    assert all(math.isfinite(v) for v in val)
    assert val[1] < val[0] < zero, (val, zero)
