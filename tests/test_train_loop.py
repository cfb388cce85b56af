"""The epoch loop's reading of loss terms: tensors read together (not one host sync per term), meters equal to
per-step floats, and a non-finite loss reported at its own iteration even when later steps fail otherwise."""
import csv
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cocofast.train.config import TrainConfig
from cocofast.train.loop import IterationBudget, PendingTerms, Stage, run_stage
from cocofast.train.runtime import ResumableSampler, Runtime

SAMPLES, BATCH = 24, 2  # 12 iterations: more than one reading interval


def test_pending_terms_keep_order_floats_and_exact_values():
    pending = PendingTerms()
    third = torch.tensor(1 / 3)  # float32: read back exactly, widened to a double
    pending.add(1, {"a": torch.tensor(2.5), "b": 0.25})
    pending.add(2, {"a": third, "b": torch.tensor(float("nan"))})
    rows = pending.take()
    assert [it for it, _ in rows] == [1, 2]
    assert rows[0][1] == {"a": 2.5, "b": 0.25}
    assert rows[1][1]["a"] == third.item() and rows[1][1]["b"] != rows[1][1]["b"]
    assert all(isinstance(v, float) for _, terms in rows for v in terms.values())
    assert pending.take() == []


def toy_stage(tmp_path: Path, step) -> tuple:
    cfg = TrainConfig(run_dir=str(tmp_path), batch_size=BATCH, progress=False, save_every_iters=0)
    rt = Runtime(0, 1, 0, torch.device("cpu"), None)
    data = TensorDataset(torch.rand(SAMPLES, 1), torch.zeros(SAMPLES, dtype=torch.long))
    sampler = ResumableSampler(data, rt, seed=0)
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler)
    net = torch.nn.Linear(1, 1)
    history = []
    stage = Stage(name="toy", out_dir=tmp_path / "toy", epochs=1, models={}, trained=[net], optimizers={},
                  schedulers={}, scaler=torch.amp.GradScaler("cpu", enabled=False), train_step=step,
                  evaluate=lambda: history.append(1) or {"val": 0.0}, score_key="val")
    return stage, cfg, rt, loader, sampler


def run(tmp_path, step):
    stage, cfg, rt, loader, sampler = toy_stage(tmp_path, step)
    run_stage(stage, cfg, rt, loader, sampler, IterationBudget(0))


def test_non_finite_loss_is_reported_at_its_iteration(tmp_path):
    calls = []

    def step(images, masks):
        calls.append(1)
        return {"loss": torch.tensor(float("inf") if len(calls) == 4 else 1.0), "lr": 0.1}

    with pytest.raises(FloatingPointError, match=r"epoch 1, iteration 4: loss=inf"):
        run(tmp_path, step)
    assert len(calls) < SAMPLES // BATCH  # read within the interval, before the epoch ended


def test_a_later_error_reports_the_earlier_non_finite_loss(tmp_path):
    calls = []

    def step(images, masks):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("the student's features hold NaN")  # what a loss's input check says next step
        return {"loss": torch.tensor(float("nan") if len(calls) == 2 else 1.0)}

    with pytest.raises(FloatingPointError, match=r"iteration 2: loss=nan"):
        run(tmp_path, step)


def test_meters_average_every_iteration(tmp_path):
    values = iter(range(1, SAMPLES // BATCH + 1))

    def step(images, masks):
        return {"loss": torch.tensor(float(next(values))), "lr": 0.5}

    stage, cfg, rt, loader, sampler = toy_stage(tmp_path, step)
    run_stage(stage, cfg, rt, loader, sampler, IterationBudget(0))
    row = next(csv.DictReader(open(tmp_path / "toy" / "summary.csv")))
    assert float(row["loss"]) == pytest.approx(sum(range(1, 13)) / 12) and float(row["lr"]) == 0.5
