"""What a user needs told: a network stuck on one class, the split eval scored, per-class IoU, CPU threads."""
import os

import torch

from cocofast.train.config import TrainConfig
from cocofast.train.evaluate import evaluate_segmentation, scored_split, single_predicted_class
from cocofast.train.runtime import Runtime, cpu_threads


class Constant(torch.nn.Module):
    """Predicts class `k` everywhere (a collapsed network)."""

    def __init__(self, k: int, classes: int = 2):
        super().__init__()
        self.k, self.classes, self.model_name = k, classes, "constant"
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.classes, *x.shape[-2:]) + self.bias
        logits[:, self.k] = 1.0
        return type("Out", (), {"logits": logits})()


def loader(n=3, size=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(2, 3, size, size, generator=g), torch.randint(0, 2, (2, size, size), generator=g))
            for _ in range(n)]


def test_a_network_predicting_one_class_is_flagged_and_per_class_iou_reported(capsys):
    rt = Runtime(0, 1, 0, torch.device("cpu"), None)
    scores = evaluate_segmentation(Constant(1), loader(), TrainConfig(num_classes=2), rt)
    assert "predicted class 1 for every pixel" in capsys.readouterr().out
    assert scores["val_iou0"] == 0.0 and 0 < scores["val_iou1"] < 1
    assert abs(scores["val_miou"] - (scores["val_iou0"] + scores["val_iou1"]) / 2) < 1e-12


def test_a_network_predicting_both_classes_is_not_flagged(capsys):
    m = torch.zeros(2, 2, 2, dtype=torch.int64)
    m[0, 0, 0] = 5
    assert single_predicted_class(m[0]) == 0
    m[0, 1, 1] = 1
    assert single_predicted_class(m[0]) is None


def test_eval_says_when_it_scores_the_validation_split(tmp_path):
    (tmp_path / "val").mkdir()
    assert scored_split(TrainConfig(dataset="folder", data_root=str(tmp_path))) == "val"
    (tmp_path / "test").mkdir()
    assert scored_split(TrainConfig(dataset="folder", data_root=str(tmp_path))) == "test"
    assert scored_split(TrainConfig()) == "test"


def test_threads_default_to_every_core_and_one_per_process_under_torchrun_on_cpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cpu_threads(3, 4, cpu) == 3
    assert cpu_threads(0, 4, cpu) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert cpu_threads(0, 1, cpu) == 5 and cpu_threads(0, 4, cuda) == 5
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads(0, 1, cpu) == (os.cpu_count() or 1)
