"""Deployable files of a trained network: ONNX, TorchScript and a weights-only safetensors file.

    cocofast export run/student/best.pt --out deploy/        [--role student] [--opset 17]

writes into DIR, each atomically:
    ROLE.onnx             logits only, input "image" (B, C, H, W) float32, batch, height and width dynamic
    ROLE.torchscript.pt   the same network traced for torch.jit.load (no cocofast needed to run it)
    ROLE.safetensors      the state dict alone (no optimiser, scheduler or RNG state); its metadata names the
                          network, so `load_weights_file` rebuilds it with cocofast
    export.json           what a deployment needs to feed it: channels, classes, the multiple H and W must be,
                          the checkpoint's input normalisation, and what the parity checks measured

The networks return SegOutput(logits, shallow, deep); the exported graph is `LogitsOnly`, which drops the taps.
Both files are checked against PyTorch at two input sizes before the command reports success.

Exporter choice: torch.onnx.export(dynamo=False), the TorchScript-based exporter, which exists in torch 2.4 to
2.13 and handles all three students with dynamic H/W. The dynamo exporter (torch.export + onnxscript) cannot
prove the networks' divisibility checks for symbolic sizes and has no ONNX translation for ENet's max-unpooling.
Neither exporter maps aten::max_unpool2d, so `exportable` swaps nn.MaxUnpool2d for the equivalent scatter
(max-unpooling writes every value at its pooled index, i.e. ScatterElements into a zero plane).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cocofast.checkpoint import (TRUST_HELP, CheckpointError, check_model_code, model_spec, read_checkpoint,
                                 trusted_paths)
from cocofast.io import atomic_path, atomic_write_text
from cocofast.models import TappedModel, create_model, logits_of
from cocofast.segment import checkpoint_normalisation

WEIGHTS_FORMAT = "cocofast-weights"
DEFAULT_OPSET = 17
PARITY_ATOL = 1e-4


class LogitsOnly(nn.Module):
    """A segmentation network that returns only its logits (B, K, H, W)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return logits_of(self.network(image))


class ScatterMaxUnpool2d(nn.Module):
    """nn.MaxUnpool2d written as a scatter, which both ONNX exporters and torch.jit.trace handle."""

    def __init__(self, unpool: nn.MaxUnpool2d):
        super().__init__()
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        self.kernel_size, self.stride, self.padding = (pair(v) for v in
                                                       (unpool.kernel_size, unpool.stride, unpool.padding))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, output_size=None) -> torch.Tensor:
        b, c, h, w = x.shape
        if output_size is None:
            oh = (h - 1) * self.stride[0] - 2 * self.padding[0] + self.kernel_size[0]
            ow = (w - 1) * self.stride[1] - 2 * self.padding[1] + self.kernel_size[1]
        else:
            oh, ow = output_size[-2], output_size[-1]
        plane = x.new_zeros((b, c, oh * ow))
        return plane.scatter(2, indices.flatten(2), x.flatten(2)).view(b, c, oh, ow)


def exportable(model: nn.Module) -> LogitsOnly:
    """An eval-mode copy of `model`, logits only, with layers the exporters cannot trace replaced."""
    if isinstance(model, TappedModel):
        # Logits only: the wrapped network itself. (Its tap hooks are closures over the original wrapper, so a
        # deep copy of the wrapper would find its own taps never firing.)
        model = model.model
    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MaxUnpool2d):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, ScatterMaxUnpool2d(module))
    return LogitsOnly(model).eval()


def example_sizes(model: nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two different (H, W), both multiples of the network's input divisor: one to trace, one to check."""
    d = int(getattr(model, "input_divisor", 1))
    side = d * max(1, -(-64 // d))
    return (side, side), (side + d, side + 2 * d)


def example_input(model: nn.Module, size: tuple[int, int], batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, int(model.in_channels), *size, generator=generator)


# --- the three files -------------------------------------------------------------------------------------
def export_onnx(model: nn.Module, path: str | Path, *, opset: int = DEFAULT_OPSET) -> None:
    """Write `model`'s logits as ONNX with dynamic batch, height and width."""
    if opset < 17:
        raise ValueError(f"opset {opset}: cocofast exports opset 17 or newer")
    wrapped = exportable(model)
    x = example_input(model, example_sizes(model)[0])
    axes = {0: "batch", 2: "height", 3: "width"}
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # The networks' input checks become constants in the trace (they hold for any size the deployment
        # must feed anyway, recorded in export.json); say nothing about them.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            torch.onnx.export(wrapped, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=["image"],
                              output_names=["logits"], dynamic_axes={"image": axes, "logits": axes})
        except Exception as err:  # the exporter's errors have many types and print whole graphs: keep line 1
            reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise ValueError(f"{getattr(model, 'model_name', type(model).__name__)} cannot be exported to ONNX "
                             f"with dynamic height and width: {reason}") from None
        import onnx

        onnx.checker.check_model(str(tmp))


def export_torchscript(model: nn.Module, path: str | Path) -> None:
    """Write `model`'s logits as a traced TorchScript module (shapes stay symbolic in the trace)."""
    wrapped = exportable(model)
    x = example_input(model, example_sizes(model)[0])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapped, x, check_trace=False)
    with atomic_path(path) as tmp:
        torch.jit.save(traced, str(tmp))


def save_weights_file(model: nn.Module, path: str | Path) -> None:
    """The state dict alone as safetensors; metadata names the network (`create_model` name and kwargs)."""
    from safetensors.torch import save

    name, kwargs = getattr(model, "model_name", None), getattr(model, "model_kwargs", None)
    if name is None or kwargs is None:
        raise ValueError("the network was not built by cocofast.models.create_model (no model_name/model_kwargs)")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": WEIGHTS_FORMAT, "model_name": name, "model_kwargs": json.dumps(kwargs, sort_keys=True)}
    with atomic_path(path) as tmp:  # bytes into the prepared file keep its mode (save_file would recreate it)
        tmp.write_bytes(save(tensors, metadata=metadata))


def load_weights_file(path: str | Path, device="cpu", trusted=()) -> nn.Module:
    """The network saved by `save_weights_file`, rebuilt with create_model, in eval mode (an import path not
    in `trusted` is refused before anything is imported)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path}: not a safetensors file ({type(err).__name__}: {err})") from None
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: not a cocofast weights file (metadata format {metadata.get('format')!r}, "
                         f"expected {WEIGHTS_FORMAT!r})")
    check_model_code(str(metadata.get("model_name")), trusted, f"weights file {path}",
                     "load_weights_file(..., trusted=[{!r}])")
    model = create_model(metadata["model_name"], **json.loads(metadata["model_kwargs"]))
    model.load_state_dict(state)
    return model.to(device).eval()


# --- checks ----------------------------------------------------------------------------------------------
def onnx_max_error(model: nn.Module, path: str | Path, size: tuple[int, int], batch: int = 2) -> float:
    """Largest |ONNX Runtime - PyTorch| over the logits of one random batch of `size`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = example_input(model, size, batch, seed=1)
    with torch.no_grad():
        expected = LogitsOnly(model.eval())(x).numpy()
    got = session.run(["logits"], {"image": x.numpy()})[0]
    if got.shape != expected.shape:
        raise ValueError(f"{path}: ONNX logits have shape {got.shape} for input {tuple(x.shape)}, "
                         f"PyTorch's {expected.shape}")
    return float(np.abs(got - expected).max())


def torchscript_max_error(model: nn.Module, path: str | Path, size: tuple[int, int], batch: int = 2) -> float:
    """Largest |torch.jit.load(path) - PyTorch| over the logits of one random batch of `size`."""
    loaded = torch.jit.load(str(path), map_location="cpu")
    x = example_input(model, size, batch, seed=1)
    with torch.no_grad():
        expected, got = LogitsOnly(model.eval())(x), loaded(x)
    if got.shape != expected.shape:
        raise ValueError(f"{path}: TorchScript logits have shape {tuple(got.shape)}, PyTorch's {tuple(expected.shape)}")
    return float((got - expected).abs().max())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- from a checkpoint -----------------------------------------------------------------------------------
def network_from_checkpoint(checkpoint: str | Path, role: str = "student", trusted=()) -> tuple[nn.Module, dict]:
    """(network in eval mode, the checkpoint dict) for `role`; CheckpointError names what is wrong (an import
    path not in `trusted` is refused before anything is imported)."""
    ckpt = read_checkpoint(checkpoint)
    spec = model_spec(ckpt, role, checkpoint, trusted)
    try:
        model = create_model(spec["model_name"], **spec["model_kwargs"])
        model.load_state_dict(spec["state_dict"])
    except (ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {checkpoint}: its {role!r} network cannot be rebuilt: {err}") from None
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    for attr in ("in_channels", "num_classes"):  # a user's network need not declare what it was trained on
        if not hasattr(model, attr) and attr in config:
            setattr(model, attr, int(config[attr]))
    return model.eval(), ckpt


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, role: str = "student",
                      opset: int = DEFAULT_OPSET, trusted=()) -> dict:
    """Write the three files and export.json for `role` of `checkpoint` into `out_dir`; returns the manifest.

    Raises CheckpointError for an unusable checkpoint and ValueError when an exported file disagrees with
    PyTorch by more than PARITY_ATOL (the file is left in place for inspection; export.json is not written).
    """
    model, ckpt = network_from_checkpoint(checkpoint, role, trusted)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"onnx": out_dir / f"{role}.onnx", "torchscript": out_dir / f"{role}.torchscript.pt",
             "weights": out_dir / f"{role}.safetensors"}
    export_onnx(model, files["onnx"], opset=opset)
    export_torchscript(model, files["torchscript"])
    save_weights_file(model, files["weights"])

    errors = {}
    for size in example_sizes(model):
        key = f"{size[0]}x{size[1]}"
        errors[key] = {"onnx": onnx_max_error(model, files["onnx"], size),
                       "torchscript": torchscript_max_error(model, files["torchscript"], size)}
    worst = max(max(e.values()) for e in errors.values())
    if worst > PARITY_ATOL:
        raise ValueError(f"exported {role} disagrees with PyTorch by {worst:.3g} (> {PARITY_ATOL}): {errors}")
    manifest = {
        "checkpoint": str(checkpoint), "role": role,
        "model_name": model.model_name, "model_kwargs": model.model_kwargs,
        "input": {"name": "image", "dtype": "float32", "layout": "B, C, H, W",
                  "channels": int(model.in_channels), "multiple_of": int(getattr(model, "input_divisor", 1)),
                  "normalisation": checkpoint_normalisation(ckpt),
                  "note": "stored pixels scaled to [0, 1] as cocofast.data does in training"},
        "output": {"name": "logits", "layout": "B, K, H, W", "classes": int(model.num_classes)},
        "onnx_opset": opset, "torch": torch.__version__,
        "max_abs_error_vs_pytorch": errors,
        "files": {kind: {"path": path.name, "sha256": sha256_of(path)} for kind, path in files.items()},
    }
    atomic_write_text(json.dumps(manifest, indent=2) + "\n", out_dir / "export.json")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cocofast export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint written by cocofast training, e.g. RUN/student/best.pt")
    parser.add_argument("--out", required=True, help="folder for ROLE.onnx, ROLE.torchscript.pt, ROLE.safetensors")
    parser.add_argument("--role", default="student", help="which network of the checkpoint (default: student)")
    parser.add_argument("--trust-model-code", "--trust_model_code", action="append", metavar="FACTORY",
                        help=TRUST_HELP)
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, >= 17 (default {DEFAULT_OPSET})")
    args = parser.parse_args(argv)
    if args.opset < 17:
        parser.error(f"--opset {args.opset}: expected 17 or newer")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out}: exists and is not a folder")
    try:
        manifest = export_checkpoint(args.checkpoint, args.out, role=args.role, opset=args.opset,
                                     trusted=trusted_paths(args.trust_model_code))
    except (CheckpointError, OSError) as err:  # an unusable checkpoint, or --out cannot be written
        print(f"cocofast export: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"cocofast export: error: {err}", file=sys.stderr)
        return 1
    worst = max(max(e.values()) for e in manifest["max_abs_error_vs_pytorch"].values())
    names = ", ".join(f["path"] for f in manifest["files"].values())
    print(f"{args.checkpoint} ({manifest['model_name']}, {args.role}) -> {args.out}: {names}, export.json; "
          f"ONNX Runtime and TorchScript match PyTorch within {worst:.1e} at "
          f"{', '.join(manifest['max_abs_error_vs_pytorch'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
