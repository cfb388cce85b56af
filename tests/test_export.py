"""cocofast.export: ONNX Runtime and TorchScript give PyTorch's logits at two sizes; weights-only file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
safetensors_torch = pytest.importorskip("safetensors.torch")

from cocofast.export import (example_sizes, export_onnx, export_torchscript, load_weights_file,  # noqa: E402
                             main, save_weights_file)
from cocofast.io import atomic_save  # noqa: E402
from cocofast.models import create_model  # noqa: E402

STUDENTS = ("mobile_unet", "enet", "erfnet")


def trained_looking(name: str, seed: int = 0) -> torch.nn.Module:
    """A small student whose BatchNorm running statistics are not the identity, so eval mode matters."""
    torch.manual_seed(seed)
    model = create_model(name, in_channels=3, num_classes=3, width=0.25)
    with torch.no_grad():
        model.train()(torch.rand(2, 3, 64, 64) * 2 + 0.5)
    return model.eval()


def pytorch_logits(model, x):
    with torch.no_grad():
        return model(x).logits.numpy()


@pytest.mark.parametrize("name", STUDENTS)
def test_onnx_runtime_and_torchscript_match_pytorch_at_two_sizes(tmp_path, name):
    model = trained_looking(name)
    export_onnx(model, tmp_path / "m.onnx")
    export_torchscript(model, tmp_path / "m.ts")
    graph = onnx.load(tmp_path / "m.onnx")
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] == ["height", "width"]  # symbolic, not fixed by the trace

    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(tmp_path / "m.ts"))
    sizes = example_sizes(model)
    assert sizes[0] != sizes[1]
    for i, (h, w) in enumerate(sizes):
        x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(10 + i))
        expected = pytorch_logits(model, x)
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == expected.shape == (2, 3, h, w)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        with torch.no_grad():
            np.testing.assert_allclose(scripted(x).numpy(), expected, atol=1e-5, rtol=0)
    assert np.abs(expected).max() > 1e-2  # not a network that outputs zeros whatever the input


def test_weights_file_holds_the_state_dict_only_and_rebuilds_the_network(tmp_path):
    model = trained_looking("erfnet", seed=3)
    save_weights_file(model, tmp_path / "w.safetensors")
    tensors = safetensors_torch.load_file(str(tmp_path / "w.safetensors"))
    assert set(tensors) == set(model.state_dict())
    fresh = load_weights_file(tmp_path / "w.safetensors")
    assert type(fresh) is type(model) and fresh.model_kwargs == model.model_kwargs and not fresh.training
    x = torch.rand(1, 3, 64, 64)
    assert np.array_equal(pytorch_logits(fresh, x), pytorch_logits(model, x))
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_weights_file(tmp_path / "junk.safetensors")


@pytest.fixture
def training_checkpoint(tmp_path):
    """A checkpoint laid out like training's best.pt, with optimiser state beside the weights."""
    model = trained_looking("erfnet", seed=1)
    optimiser = torch.optim.Adam(model.parameters())
    model(torch.rand(1, 3, 64, 64)).logits.sum().backward()
    optimiser.step()
    entry = {"model_name": model.model_name, "model_kwargs": model.model_kwargs, "state_dict": model.state_dict()}
    path = tmp_path / "run" / "student" / "best.pt"
    atomic_save({"models": {"student": entry}, "optimizers": {"student": optimiser.state_dict()},
                 "config": {"student_model": "erfnet"}}, path)
    return path, model


def test_export_command_needs_only_the_checkpoint(tmp_path, training_checkpoint, capsys):
    path, model = training_checkpoint
    out = tmp_path / "deploy"
    assert main([str(path), "--out", str(out)]) == 0
    assert "student.onnx" in capsys.readouterr().out
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["model_name"] == "erfnet" and manifest["input"]["channels"] == 3
    assert manifest["output"]["classes"] == 3 and manifest["input"]["multiple_of"] == model.input_divisor
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "student.onnx", "student.safetensors",
                                                    "student.torchscript.pt"]
    weights = safetensors_torch.load_file(str(out / "student.safetensors"))
    assert not any("exp_avg" in k or k.startswith("optim") for k in weights)
    assert set(weights) == set(model.state_dict())
    assert (out / "student.safetensors").stat().st_size < path.stat().st_size / 2  # Adam's moments are gone
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_export_command_errors_name_the_culprit(tmp_path, training_checkpoint, capsys):
    path, _ = training_checkpoint
    assert main([str(path), "--out", str(tmp_path / "o"), "--role", "teacher"]) == 2
    assert "'teacher'" in (err := capsys.readouterr().err) and "student" in err
    assert main([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), "--out", str(tmp_path / "o"), "--opset", "13"])
    assert exit_info.value.code == 2 and "--opset 13" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


class AdaptivePooled(torch.nn.Module):
    """Adaptive pooling to a fixed grid, which the ONNX exporter cannot take with dynamic sizes (FANet has it)."""

    in_channels, input_divisor, model_name = 3, 1, "adaptive_pooled"

    def forward(self, x):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, (3, 3))
        return torch.nn.functional.interpolate(pooled, size=x.shape[-2:])


def test_a_network_the_exporter_cannot_take_is_a_short_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="adaptive_pooled cannot be exported to ONNX") as info:
        export_onnx(AdaptivePooled(), tmp_path / "m.onnx")
    assert len(str(info.value)) < 500 and not list(tmp_path.iterdir())
