"""cocofast.export: ONNX Runtime and TorchScript give PyTorch's logits at any size (padded to the network's
multiple); weights the user's own class loads; one-line errors that leave nothing behind."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
safetensors_torch = pytest.importorskip("safetensors.torch")

from cocofast.export import (example_sizes, export_onnx, export_torchscript, load_weights_file,  # noqa: E402
                             main, save_weights_file)
from cocofast.checkpoint import with_checksum  # noqa: E402
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
    assert manifest["output"]["classes"] == 3 and manifest["input"]["network_multiple_of"] == model.input_divisor
    # The graph pads to the network's multiple itself, so it takes any size, and says how it pads.
    assert manifest["input"]["multiple_of"] == 1
    assert manifest["input"]["padding"] == {"mode": "edge", "to_multiple_of": model.input_divisor,
                                            "where": "bottom and right", "logits": "cropped back to the input's H x W"}
    assert manifest["model_kwargs"] == {"in_channels": 3, "num_classes": 3, "width": 0.25}
    assert manifest["taps"] is None
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


# --- any size in ------------------------------------------------------------------------------------------
TORCH_PAD = {"edge": "replicate", "reflect": "reflect", "zero": "constant"}


def padded_reference(model, x, multiple, pad):
    """PyTorch's logits on x padded at the bottom and right to `multiple`, cropped back: what the graph promises."""
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, [0, -w % multiple, 0, -h % multiple], mode=TORCH_PAD[pad])
    assert padded.shape[-1] % multiple == 0 and padded.shape[-2] % multiple == 0
    return pytorch_logits(model, padded)[:, :, :h, :w]


@pytest.mark.parametrize("name,pad", [("mobile_unet", "edge"), ("enet", "edge"), ("erfnet", "edge"),
                                      ("mobile_unet", "reflect"), ("mobile_unet", "zero")])
def test_padded_exports_take_sizes_that_are_not_multiples(tmp_path, name, pad):
    model = trained_looking(name)
    assert model.input_divisor > 1
    export_onnx(model, tmp_path / "m.onnx", pad=pad)
    export_torchscript(model, tmp_path / "m.ts", pad=pad)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(tmp_path / "m.ts"))
    for shape in ((2, 3, 97, 211), (1, 3, 130, 66)):
        assert shape[2] % model.input_divisor and shape[3] % model.input_divisor
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(shape[2]))
        expected = padded_reference(model, x, model.input_divisor, pad)
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == expected.shape == (shape[0], 3, shape[2], shape[3])
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        with torch.no_grad():
            np.testing.assert_allclose(scripted(x).numpy(), expected, atol=1e-5, rtol=0)
    assert np.abs(expected).max() > 1e-2


def test_without_padding_the_graph_still_needs_multiples(tmp_path):
    model = trained_looking("mobile_unet")
    export_onnx(model, tmp_path / "m.onnx", pad=None)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": np.random.rand(1, 3, 64, 96).astype(np.float32)})[0].shape == (1, 3, 64, 96)
    with pytest.raises(Exception):  # the bare network's skip connections cannot meet at 97 x 211
        session.run(None, {"image": np.random.rand(1, 3, 97, 211).astype(np.float32)})


# --- weights the user's own class loads ----------------------------------------------------------------
USER_DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture
def user_unet_module():
    sys.path.insert(0, str(USER_DATA))
    import user_unet

    yield user_unet
    sys.path.remove(str(USER_DATA))
    sys.modules.pop("user_unet", None)


def save_checkpoint(path, role_entries: dict, config: dict | None = None):
    content = {"models": role_entries, **({"config": config} if config is not None else {})}
    atomic_save(with_checksum(content), path)
    return path


def entry_of(model) -> dict:
    return {"model_name": model.model_name, "model_kwargs": model.model_kwargs, "state_dict": model.state_dict()}


def test_the_users_own_class_loads_the_exported_weights_with_plain_load_state_dict(tmp_path, user_unet_module):
    torch.manual_seed(2)
    model = create_model("user_unet:UNet", base=4, taps=["down2", "up1"], input_divisor=8)
    with torch.no_grad():
        model.train()(torch.rand(2, 3, 32, 32) * 2)  # BatchNorm statistics that are not the identity
    config = {"image_size": 64, "patch_size": 128, "normalise": "range", "slide_mpp": 0.5, "in_channels": 3,
              "num_classes": 2}
    path = save_checkpoint(tmp_path / "best.pt", {"student": entry_of(model)}, config)
    out = tmp_path / "deploy"
    assert main([str(path), "--out", str(out), "--trust-model-code=user_unet:UNet"]) == 0
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["model_name"] == "user_unet:UNet"
    assert manifest["model_kwargs"] == {"base": 4}  # exactly what UNet(...) takes
    assert manifest["taps"] == {"shallow": "down2", "deep": "up1", "chain": None}
    assert manifest["input"]["network_multiple_of"] == 8
    assert manifest["training"] == {"mpp": 0.5, "patch_size": 128, "image_size": 64, "normalisation": "range"}

    mine = user_unet_module.UNet(**manifest["model_kwargs"])
    mine.load_state_dict(safetensors_torch.load_file(str(out / "student.safetensors")))  # strict, no renaming
    x = torch.rand(2, 3, 40, 48)
    with torch.no_grad():
        assert torch.equal(mine.eval()(x), model.eval()(x).logits)
    rebuilt = load_weights_file(out / "student.safetensors", trusted=["user_unet:UNet"])
    with torch.no_grad():
        assert torch.equal(rebuilt(x).logits, model(x).logits) and rebuilt.tap_paths == ("down2", "up1")


def test_a_checkpoint_without_mpp_says_it_does_not_know(tmp_path, training_checkpoint):
    path, _ = training_checkpoint
    assert main([str(path), "--out", str(tmp_path / "d")]) == 0
    training = json.loads((tmp_path / "d" / "export.json").read_text())["training"]
    assert training["mpp"] is None and training["normalisation"] == "range"


# --- one-line errors, nothing left behind ------------------------------------------------------------------
def one_line_exit_2(capfd, argv, out: Path, *words):
    code = main(argv)
    captured = capfd.readouterr()
    assert code == 2, captured.err
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert len(lines) == 1 and len(lines[0]) < 600, lines[:5]
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))  # no folder, no scratch
    return lines[0]


def test_the_fanet_teacher_is_refused_in_one_line_naming_its_pooling(tmp_path, capfd):
    teacher = create_model("fanet", in_channels=3, num_classes=2, width=0.125).eval()
    path = save_checkpoint(tmp_path / "t.pt", {"teacher": entry_of(teacher)})
    one_line_exit_2(capfd, [str(path), "--out", str(tmp_path / "out"), "--role", "teacher"], tmp_path / "out",
                    "fanet", "adaptive pooling", "dynamic height and width")


def test_weights_of_another_width_are_one_line_naming_the_tensor(tmp_path, capfd):
    narrow = create_model("erfnet", in_channels=3, num_classes=2, width=0.25)
    entry = {**entry_of(narrow), "model_kwargs": {"in_channels": 3, "num_classes": 2, "width": 0.5}}
    path = save_checkpoint(tmp_path / "w.pt", {"student": entry})
    line = one_line_exit_2(capfd, [str(path), "--out", str(tmp_path / "out")], tmp_path / "out",
                           "'student'", "other shapes", "width")
    assert "'width': 0.5" in line


def test_a_paraphraser_role_is_refused_not_described_as_logits(tmp_path, capfd):
    para = create_model("paraphraser", in_channels=16, k=4)
    student = trained_looking("erfnet")
    path = save_checkpoint(tmp_path / "p.pt", {"paraphraser0": entry_of(para), "student": entry_of(student)},
                           {"in_channels": 3, "num_classes": 2})
    one_line_exit_2(capfd, [str(path), "--out", str(tmp_path / "out"), "--role", "paraphraser0"],
                    tmp_path / "out", "paraphraser", "not an image -> logits segmentation network", "'student'")


def test_a_failed_export_leaves_an_existing_folder_as_it_was(tmp_path, capfd):
    teacher = create_model("fanet", in_channels=3, num_classes=2, width=0.125).eval()
    path = save_checkpoint(tmp_path / "t.pt", {"teacher": entry_of(teacher)})
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([str(path), "--out", str(out), "--role", "teacher"]) == 2
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not list(tmp_path.glob(".deploy.*"))
