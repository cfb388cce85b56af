"""INT8 students (cocofast/quantise.py, `cocofast export --int8`): they run, are smaller than fp32 and agree with
it; calibration and validation read the very patches training used."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.quantization")

from cocofast.checkpoint import with_checksum  # noqa: E402
from cocofast.data import SyntheticPathology  # noqa: E402
from cocofast.export import export_onnx, main  # noqa: E402
from cocofast.io import atomic_save  # noqa: E402
from cocofast.models import create_model  # noqa: E402
from cocofast.quantise import compare, quantise_dynamic, quantise_static, split_dataset  # noqa: E402


@pytest.fixture(scope="module")
def tiny_student():
    """A width-0.25 ERFNet after 12 Adam steps on synthetic patches: its predictions are not one class."""
    torch.manual_seed(0)
    model = create_model("erfnet", in_channels=3, num_classes=2, width=0.25)
    data = SyntheticPathology(16, size=64, seed=3)
    x, y = torch.stack([data[i][0] for i in range(16)]), torch.stack([data[i][1] for i in range(16)])
    optimiser = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for _ in range(12):
        loss = torch.nn.functional.cross_entropy(model(x).logits, y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@pytest.fixture(scope="module")
def fp32_graph(tiny_student, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp32") / "student.onnx"
    export_onnx(tiny_student, path)
    return path


def op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_static_int8_of_a_tiny_student_runs_is_smaller_and_agrees_with_fp32(fp32_graph, tmp_path):
    calibration = SyntheticPathology(8, size=64, seed=11)
    int8 = tmp_path / "student.int8.onnx"
    quantise_static(fp32_graph, int8, [calibration[i][0].numpy() for i in range(8)])
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(int8) and "QuantizeLinear" not in op_types(fp32_graph)
    assert int8.stat().st_size < fp32_graph.stat().st_size
    held_out = SyntheticPathology(6, size=64, seed=12)
    report = compare(fp32_graph, int8, held_out, num_classes=2)
    # Not a network that predicts one class everywhere (agreement would then be trivially 100 %).
    fp32 = onnxruntime.InferenceSession(str(fp32_graph))
    share = np.mean([fp32.run(None, {"image": held_out[i][0].numpy()[None]})[0].argmax(1).mean() for i in range(6)])
    assert 0.05 < share < 0.95
    assert report["pixel_agreement"] >= 0.95
    assert report["patches"] == 6 and len(report["fp32"]["dice"]) == len(report["int8"]["dice"]) == 2
    assert report["difference"]["miou"] == pytest.approx(report["int8"]["miou"] - report["fp32"]["miou"], abs=1e-5)
    # The INT8 graph keeps the padding: any size in, logits of that size out.
    out = onnxruntime.InferenceSession(str(int8)).run(None, {"image": np.random.rand(1, 3, 37, 53).astype(np.float32)})
    assert out[0].shape == (1, 2, 37, 53)


def test_dynamic_int8_runs_without_calibration_data(fp32_graph, tmp_path):
    int8 = tmp_path / "student.dynamic.onnx"
    quantise_dynamic(fp32_graph, int8)
    assert "ConvInteger" in op_types(int8) and int8.stat().st_size < fp32_graph.stat().st_size
    report = compare(fp32_graph, int8, SyntheticPathology(3, size=64, seed=12), num_classes=2)
    assert report["pixel_agreement"] >= 0.95


def test_calibration_and_validation_patches_are_the_ones_training_used():
    from cocofast.train.config import TrainConfig
    from cocofast.train.data import build_dataset

    cfg = TrainConfig(train_samples=3, val_samples=2, image_size=64, data_seed=7)
    for split in ("train", "val"):
        ours, theirs = split_dataset(cfg.to_dict(), split), build_dataset(cfg, split)
        assert len(ours) == len(theirs)
        for i in range(len(ours)):
            a, b = ours[i], theirs.drawn(i)  # training's own patch before its augmentation
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert split_dataset({"dataset": "folder", "data_root": "/nonexistent", "num_classes": 2}, "train") is None


def test_folder_splits_are_the_ones_training_reads(tmp_path):
    from PIL import Image

    from cocofast.train.config import TrainConfig
    from cocofast.train.data import build_dataset

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for sub in ("images", "masks"):
            (tmp_path / split / sub).mkdir(parents=True)
        for i in range(2):
            image = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
            mask = (rng.random((96, 96)) > 0.5).astype(np.uint8) * 255
            Image.fromarray(image).save(tmp_path / split / "images" / f"{i}.png")
            Image.fromarray(mask).save(tmp_path / split / "masks" / f"{i}.png")
    cfg = TrainConfig(dataset="folder", data_root=str(tmp_path), image_size=32, patch_size=48, patch_stride=24,
                      mask_values="0:0,255:1")
    for split in ("train", "val"):
        ours, theirs = split_dataset(cfg.to_dict(), split), build_dataset(cfg, split)
        assert ours is not None and len(ours) == len(theirs) and len(ours) > 2
        theirs.augment = ours.augment  # training's flips and jitter are its own; the patches must match
        for i in (0, len(ours) - 1):
            assert torch.equal(ours[i][0], theirs[i][0]) and torch.equal(ours[i][1], theirs[i][1])


def test_export_int8_states_calibration_and_the_accuracy_it_costs(tmp_path, tiny_student, capsys):
    from cocofast.train.config import TrainConfig

    config = TrainConfig(train_samples=6, val_samples=3, image_size=64).to_dict()
    entry = {"model_name": tiny_student.model_name, "model_kwargs": tiny_student.model_kwargs,
             "state_dict": tiny_student.state_dict()}
    path = tmp_path / "best.pt"
    atomic_save(with_checksum({"models": {"student": entry}, "config": config}), path)
    out = tmp_path / "deploy"
    assert main([str(path), "--out", str(out), "--int8", "--calibration", "4"]) == 0
    printed = capsys.readouterr().out
    assert "INT8: static, 4 calibration patches" in printed and "validation patches mIoU" in printed
    manifest = json.loads((out / "export.json").read_text())
    record = manifest["int8"]
    assert record["method"].startswith("static") and record["calibration_patches"] == 4
    assert record["bytes"]["int8"] < record["bytes"]["fp32"] == (out / "student.onnx").stat().st_size
    assert record["validation"]["patches"] == 3 and len(record["validation"]["difference"]["dice"]) == 2
    assert manifest["files"]["int8_onnx"]["path"] == "student.int8.onnx" and (out / "student.int8.onnx").is_file()

    bare = tmp_path / "bare.pt"  # no training config: nothing to calibrate on or score against
    atomic_save({"models": {"student": entry}}, bare)
    assert main([str(bare), "--out", str(tmp_path / "d2"), "--int8"]) == 0
    record = json.loads((tmp_path / "d2" / "export.json").read_text())["int8"]
    assert record["method"].startswith("dynamic") and record["validation"] is None
    assert "accuracy not measured" in capsys.readouterr().out


@pytest.mark.slow
def test_the_deployment_bench_runs_and_says_why_the_teacher_has_no_onnx_rows(tmp_path):
    import csv
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_deploy.py"
    spec = importlib.util.spec_from_file_location("bench_deploy", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--out", str(tmp_path / "deploy.csv")])
    rows = list(csv.DictReader(open(tmp_path / "deploy.csv")))
    patch = [r for r in rows if r["kind"] == "patch"]
    assert {r["runtime"] for r in patch} == set(bench.RUNTIMES) and all(r["commit"] for r in rows)
    student = [r for r in patch if r["role"] == "student"]
    assert student and all(r["status"] == "ok" and float(r["patches_per_s"]) > 0 for r in student)
    teacher_onnx = [r for r in patch if r["role"] == "teacher" and r["runtime"].startswith("onnx")]
    assert teacher_onnx and all(r["status"].startswith("no ONNX form") for r in teacher_onnx)
    assert {r["runtime"] for r in rows if r["kind"] == "accuracy" and r["width"]} == {"onnx_fp32", "onnx_int8"}
