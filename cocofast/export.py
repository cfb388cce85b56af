"""Deployable files of a trained network: ONNX, TorchScript and a weights-only safetensors file.

    cocofast export run/student/best.pt --out deploy/   [--role student] [--opset 17] [--pad edge] [--int8]

writes into DIR (all of them or, after any error, nothing; a new DIR is not left behind empty):
    ROLE.onnx             logits only, input "image" (B, C, H, W) float32, batch, height and width dynamic
    ROLE.torchscript.pt   the same network traced for torch.jit.load (no cocofast needed to run it)
    ROLE.safetensors      the state dict of the user's own module (the keys `model.load_state_dict` expects,
                          without cocofast's tap wrapper); its metadata names the network for `load_weights_file`
    ROLE.int8.onnx        with --int8: the ONNX graph quantised by ONNX Runtime (cocofast/quantise.py)
    export.json           what a deployment needs: the factory and exactly its arguments, the taps apart from
                          them, the training resolution and normalisation, the padding, what the checks measured

Any size in: by default (--pad edge) the exported graph pads H and W at the bottom and right up to the
network's multiple by repeating the edge pixels (what `cocofast segment` does to images smaller than its window;
unlike reflection it works for inputs smaller than the padding), runs the network and crops the logits back
to H x W. `--pad reflect` and `--pad zero` choose the other two; `--pad none` exports the bare network, whose
H and W must then be multiples of `input.network_multiple_of`.

The networks return SegOutput(logits, shallow, deep); the exported graph is `LogitsOnly`, which drops the taps.
Both files are checked against PyTorch (on the same padded input) before anything is kept: at two sizes that
are multiples of the network's divisor and, when the graph pads, one that is not.

Exporter choice: torch.onnx.export(dynamo=False), the TorchScript-based exporter, which exists in torch 2.4 to
2.13 and handles all three students with dynamic H/W. The dynamo exporter (torch.export + onnxscript) cannot
prove the networks' divisibility checks for symbolic sizes and has no ONNX translation for ENet's max-unpooling.
Neither exporter maps aten::max_unpool2d, so `exportable` swaps nn.MaxUnpool2d for the equivalent scatter
(max-unpooling writes every value at its pooled index, i.e. ScatterElements into a zero plane). FANet's strip
pooling (adaptive pooling to a fixed grid) has no ONNX form unless the grid divides the input, so the teacher
is refused with a one-line ExportError.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cocofast.checkpoint import (TRUST_HELP, CheckpointError, check_model_code, model_spec, read_checkpoint,
                                 trusted_paths)
from cocofast.io import atomic_path, atomic_write_text, file_sha256
from cocofast.models import SEGMENTATION_MODELS, TappedModel, create_model, is_import_path, logits_of
from cocofast.quiet import native_output_captured
from cocofast.segment import checkpoint_normalisation

WEIGHTS_FORMAT = "cocofast-weights"
DEFAULT_OPSET = 17
PARITY_ATOL = 1e-4
PAD_MODES = {"edge": "replicate", "reflect": "reflect", "zero": "constant"}  # export.json's name -> F.pad's
DEFAULT_PAD = "edge"
COCOFAST_KWARGS = ("taps", "chain", "input_divisor")  # create_model's own arguments, never the factory's


class ExportError(ValueError):
    """A network the exporters cannot take, or a role that is not a segmentation network; names the cause."""


class LogitsOnly(nn.Module):
    """A segmentation network that returns only its logits (B, K, H, W)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return logits_of(self.network(image))


def pad_to_multiple(image: torch.Tensor, multiple: int, pad: str = DEFAULT_PAD) -> torch.Tensor:
    """`image` padded at the bottom and right so H and W are multiples of `multiple` (pad: a PAD_MODES key)."""
    h, w = image.shape[-2], image.shape[-1]
    # The sizes stay traced values (not Python ints), so the exported graph computes the padding per input.
    bottom, right = (multiple - h % multiple) % multiple, (multiple - w % multiple) % multiple
    return F.pad(image, [0, right, 0, bottom], mode=PAD_MODES[pad])


class PaddedLogits(nn.Module):
    """Logits of any H x W: the input padded to the network's multiple, the logits cropped back to H x W."""

    def __init__(self, network: nn.Module, multiple: int, pad: str = DEFAULT_PAD):
        super().__init__()
        if pad not in PAD_MODES:
            raise ValueError(f"pad {pad!r}: expected one of {', '.join(PAD_MODES)}")
        self.network, self.multiple, self.pad = network, int(multiple), pad

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2], image.shape[-1]
        return self.network(pad_to_multiple(image, self.multiple, self.pad))[:, :, :h, :w]


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


def multiple_of(model: nn.Module) -> int:
    """What the network's H and W must be divisible by."""
    return int(getattr(model, "input_divisor", 1))


def exportable(model: nn.Module, pad: str | None = DEFAULT_PAD) -> nn.Module:
    """An eval-mode copy of `model`, logits only, with layers the exporters cannot trace replaced; with `pad`
    (a PAD_MODES key; None for the bare network) it takes any H x W."""
    divisor = multiple_of(model)
    if isinstance(model, TappedModel):
        # Logits only: the wrapped network itself. (Its tap hooks are closures over the original wrapper, so a
        # deep copy of the wrapper would find its own taps never firing.)
        model = model.model
    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MaxUnpool2d):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, ScatterMaxUnpool2d(module))
    logits = LogitsOnly(model).eval()
    return PaddedLogits(logits, divisor, pad).eval() if pad is not None and divisor > 1 else logits


def reference_logits(model: nn.Module, image: torch.Tensor, pad: str | None = DEFAULT_PAD) -> torch.Tensor:
    """PyTorch's logits for `image`, on the input padded as the exported graph pads it, cropped back."""
    h, w = image.shape[-2:]
    padded = pad_to_multiple(image, multiple_of(model), pad) if pad is not None else image
    with torch.no_grad():
        return logits_of(model.eval()(padded))[:, :, :h, :w]


def example_sizes(model: nn.Module, pad: str | None = None) -> tuple[tuple[int, int], ...]:
    """Different (H, W) to trace and check at: two multiples of the network's input divisor and, when the
    export pads, one size that is not a multiple in either direction."""
    d = multiple_of(model)
    side = d * max(1, -(-64 // d))
    sizes = ((side, side), (side + d, side + 2 * d))
    return sizes + ((side + 1, side + d + 3),) if pad is not None and d > 1 else sizes


def example_input(model: nn.Module, size: tuple[int, int], batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, int(model.in_channels), *size, generator=generator)


def user_module(model: nn.Module) -> nn.Module:
    """The module the user's factory (or cocofast's registry) built, inside cocofast's tap wrapper if any:
    its state dict has the keys the user's own class expects."""
    return model.model if isinstance(model, TappedModel) else model


def factory_kwargs(model_kwargs: dict) -> dict:
    """The arguments the factory itself takes: `model_kwargs` without create_model's own (taps, chain,
    input_divisor), which are cocofast's instructions on how to wrap the network."""
    return {k: v for k, v in model_kwargs.items() if k not in COCOFAST_KWARGS}


# --- the files -------------------------------------------------------------------------------------------
def export_onnx(model: nn.Module, path: str | Path, *, opset: int = DEFAULT_OPSET,
                pad: str | None = DEFAULT_PAD) -> None:
    """Write `model`'s logits as ONNX with dynamic batch, height and width; ExportError when it cannot be."""
    if opset < 17:
        raise ValueError(f"opset {opset}: cocofast exports opset 17 or newer")
    wrapped = exportable(model, pad)
    x = example_input(model, example_sizes(model)[0])
    axes = {0: "batch", 2: "height", 3: "width"}
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # The networks' input checks become constants in the trace (they hold for any size the graph feeds
        # them, padded or recorded in export.json); say nothing about them.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            with native_output_captured():
                torch.onnx.export(wrapped, (x,), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=["image"], output_names=["logits"],
                                  dynamic_axes={"image": axes, "logits": axes})
        except Exception as err:  # the exporter's errors have many types and quote whole graphs: keep line 1
            text = str(err).strip()
            reason = text.splitlines()[0].split(" Please feel free")[0][:200] if text else type(err).__name__
            if "adaptive" in text:
                reason = ("it pools to a fixed grid (adaptive pooling), which ONNX can express only for one "
                          f"input size that the grid divides ({reason})")
            raise ExportError(f"{getattr(model, 'model_name', type(model).__name__)} cannot be exported to ONNX "
                              f"with dynamic height and width: {reason}") from None
        import onnx

        onnx.checker.check_model(str(tmp))


def export_torchscript(model: nn.Module, path: str | Path, *, pad: str | None = DEFAULT_PAD) -> None:
    """Write `model`'s logits as a traced TorchScript module (shapes stay symbolic in the trace)."""
    wrapped = exportable(model, pad)
    x = example_input(model, example_sizes(model)[0])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapped, x, check_trace=False)
    with atomic_path(path) as tmp:
        torch.jit.save(traced, str(tmp))


def save_weights_file(model: nn.Module, path: str | Path) -> None:
    """The user module's state dict alone as safetensors (keys as its own class names them); metadata names
    the network (`create_model` name and kwargs, taps included) so `load_weights_file` can rebuild it."""
    from safetensors.torch import save

    name, kwargs = getattr(model, "model_name", None), getattr(model, "model_kwargs", None)
    if name is None or kwargs is None:
        raise ValueError("the network was not built by cocofast.models.create_model (no model_name/model_kwargs)")
    tensors = {k: v.detach().cpu().contiguous() for k, v in user_module(model).state_dict().items()}
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
    # Files written before the keys were the user module's own carry the tap wrapper's "model." prefix.
    target = model if all(k.startswith("model.") for k in state) and user_module(model) is not model \
        else user_module(model)
    problem = weights_mismatch(target, state)
    if problem:
        raise ValueError(f"{path}: {problem}")
    target.load_state_dict(state)
    return model.to(device).eval()


def weights_mismatch(module: nn.Module, state: dict) -> str | None:
    """One line saying how `state` does not fit `module` (None when it fits): counts, and the first example."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if not (missing or unexpected or reshaped):
        return None
    parts = []
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of {len(own)} tensors have other shapes (first: {k} is "
                     f"{tuple(state[k].shape)} in the weights, {tuple(own[k].shape)} in the network; a different "
                     f"width or channel count?)")
    if missing:
        parts.append(f"{len(missing)} the network needs are missing (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} are not the network's (first: {unexpected[0]})")
    return "the weights do not fit the network: " + "; ".join(parts)


# --- checks ----------------------------------------------------------------------------------------------
def onnx_max_error(model: nn.Module, path: str | Path, size: tuple[int, int], batch: int = 2,
                   pad: str | None = DEFAULT_PAD) -> float:
    """Largest |ONNX Runtime - PyTorch| over the logits of one random batch of `size`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = example_input(model, size, batch, seed=1)
    expected = reference_logits(model, x, pad).numpy()
    got = session.run(["logits"], {"image": x.numpy()})[0]
    if got.shape != expected.shape:
        raise ValueError(f"{path}: ONNX logits have shape {got.shape} for input {tuple(x.shape)}, "
                         f"PyTorch's {expected.shape}")
    return float(np.abs(got - expected).max())


def torchscript_max_error(model: nn.Module, path: str | Path, size: tuple[int, int], batch: int = 2,
                          pad: str | None = DEFAULT_PAD) -> float:
    """Largest |torch.jit.load(path) - PyTorch| over the logits of one random batch of `size`."""
    loaded = torch.jit.load(str(path), map_location="cpu")
    x = example_input(model, size, batch, seed=1)
    expected = reference_logits(model, x, pad)
    with torch.no_grad():
        got = loaded(x)
    if got.shape != expected.shape:
        raise ValueError(f"{path}: TorchScript logits have shape {tuple(got.shape)}, PyTorch's {tuple(expected.shape)}")
    return float((got - expected).abs().max())


# --- from a checkpoint -----------------------------------------------------------------------------------
def is_segmentation_network(model_name: str) -> bool:
    """Built-in segmentation networks and users' (import path, TorchScript); not paraphrasers or critics."""
    return model_name in SEGMENTATION_MODELS or is_import_path(model_name) or model_name == "torchscript"


def network_from_checkpoint(checkpoint: str | Path, role: str = "student", trusted=()) -> tuple[nn.Module, dict]:
    """(network in eval mode, the checkpoint dict) for `role`; CheckpointError names what is wrong (an import
    path not in `trusted` is refused before anything is imported), ExportError a role that is not a
    segmentation network."""
    ckpt = read_checkpoint(checkpoint)
    spec = model_spec(ckpt, role, checkpoint, trusted)
    if not is_segmentation_network(str(spec["model_name"])):
        usable = sorted(r for r, e in ckpt["models"].items()
                        if isinstance(e, dict) and is_segmentation_network(str(e.get("model_name"))))
        raise ExportError(f"checkpoint {checkpoint}: role {role!r} is a {spec['model_name']} (a network used only "
                          f"while distilling, not an image -> logits segmentation network); export takes "
                          f"{', '.join(map(repr, usable)) if usable else 'a student or teacher checkpoint'}")
    try:
        model = create_model(spec["model_name"], **spec["model_kwargs"])
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {checkpoint}: its {role!r} network cannot be rebuilt: {err}") from None
    problem = weights_mismatch(model, spec["state_dict"])
    if problem:
        raise CheckpointError(f"checkpoint {checkpoint}: role {role!r}: {problem} "
                              f"({spec['model_name']} with {factory_kwargs(spec['model_kwargs'])})")
    try:
        model.load_state_dict(spec["state_dict"])
    except RuntimeError as err:  # same names and shapes, yet refused (e.g. a non-tensor value): its first line
        raise CheckpointError(f"checkpoint {checkpoint}: role {role!r}: the weights do not load: "
                              f"{str(err).strip().splitlines()[0][:200]}") from None
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    for attr in ("in_channels", "num_classes"):  # a user's network need not declare what it was trained on
        if not hasattr(model, attr) and attr in config:
            setattr(model, attr, int(config[attr]))
    return model.eval(), ckpt


def training_resolution(ckpt: dict) -> dict:
    """What the network saw in training, from the checkpoint's config: µm per pixel (`slide_mpp`, which
    training on slides requires; None when the checkpoint does not record one), the patch side cut from the
    images (None: whole images), the side fed to the network, and the normalisation."""
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    mpp = config.get("slide_mpp")
    known = isinstance(mpp, (int, float)) and not isinstance(mpp, bool) and mpp > 0
    return {"mpp": float(mpp) if known else None,
            "patch_size": int(config["patch_size"]) if config.get("patch_size") else None,
            "image_size": int(config["image_size"]) if config.get("image_size") else None,
            "normalisation": checkpoint_normalisation(ckpt)}


def tap_record(model_kwargs: dict) -> dict | None:
    """The taps create_model was given (module paths of the user's module), apart from the factory's kwargs."""
    taps, chain = model_kwargs.get("taps"), model_kwargs.get("chain")
    if not taps and not chain:
        return None
    return {"shallow": taps[0] if taps else None, "deep": taps[1] if taps else None, "chain": chain}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, role: str = "student",
                      opset: int = DEFAULT_OPSET, trusted=(), pad: str | None = DEFAULT_PAD,
                      int8=None) -> dict:
    """Write the files and export.json for `role` of `checkpoint` into `out_dir`; returns the manifest.

    int8: None, or a callable (model, ckpt, fp32 ONNX path, INT8 path) -> dict for export.json's "int8"
    (`cocofast.quantise.int8_exporter`). Everything is written into a scratch folder beside `out_dir` and
    moved in only when every check passed, so an error leaves `out_dir` as it was (and no new empty folder).
    Raises CheckpointError for an unusable checkpoint, ExportError for a network that cannot be exported, and
    ValueError when an exported file disagrees with PyTorch by more than PARITY_ATOL.
    """
    model, ckpt = network_from_checkpoint(checkpoint, role, trusted)
    out_dir = Path(out_dir)
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=parent))
    try:
        manifest = write_exports(model, ckpt, checkpoint, role, scratch, opset=opset, pad=pad, int8=int8)
        out_dir.mkdir(exist_ok=True)
        names = [f["path"] for f in manifest["files"].values()] + ["export.json"]
        for name in names:  # export.json last: it is there only when every file it describes is
            os.replace(scratch / name, out_dir / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest


def write_exports(model: nn.Module, ckpt: dict, checkpoint, role: str, folder: Path, *, opset: int,
                  pad: str | None, int8) -> dict:
    files = {"onnx": folder / f"{role}.onnx", "torchscript": folder / f"{role}.torchscript.pt",
             "weights": folder / f"{role}.safetensors"}
    export_onnx(model, files["onnx"], opset=opset, pad=pad)
    export_torchscript(model, files["torchscript"], pad=pad)
    save_weights_file(model, files["weights"])

    errors = {}
    for size in example_sizes(model, pad):
        key = f"{size[0]}x{size[1]}"
        errors[key] = {"onnx": onnx_max_error(model, files["onnx"], size, pad=pad),
                       "torchscript": torchscript_max_error(model, files["torchscript"], size, pad=pad)}
    worst = max(max(e.values()) for e in errors.values())
    if worst > PARITY_ATOL:
        raise ValueError(f"exported {role} disagrees with PyTorch by {worst:.3g} (> {PARITY_ATOL}): {errors}")
    quantised = None
    if int8 is not None:
        files["int8_onnx"] = folder / f"{role}.int8.onnx"
        quantised = int8(model, ckpt, files["onnx"], files["int8_onnx"])
    divisor = multiple_of(model)
    padded = pad is not None and divisor > 1
    kwargs = dict(model.model_kwargs)
    manifest = {
        "checkpoint": str(checkpoint), "role": role,
        "model_name": model.model_name, "model_kwargs": factory_kwargs(kwargs),
        "taps": tap_record(kwargs),
        "weights": {"state_dict_of": f"{model.model_name}(**model_kwargs)",
                    "note": "keys are the module's own: model.load_state_dict(safetensors.torch.load_file(path))"},
        "training": training_resolution(ckpt),
        "input": {"name": "image", "dtype": "float32", "layout": "B, C, H, W", "channels": int(model.in_channels),
                  "multiple_of": 1 if padded else divisor, "network_multiple_of": divisor,
                  "padding": ({"mode": pad, "to_multiple_of": divisor, "where": "bottom and right",
                               "logits": "cropped back to the input's H x W"} if padded else None),
                  "normalisation": checkpoint_normalisation(ckpt),
                  "note": "stored pixels scaled to [0, 1] as cocofast.data does in training"},
        "output": {"name": "logits", "layout": "B, K, H, W", "classes": int(model.num_classes)},
        "onnx_opset": opset, "torch": torch.__version__,
        "max_abs_error_vs_pytorch": errors,
        **({"int8": quantised} if quantised is not None else {}),
        "files": {kind: {"path": path.name, "sha256": file_sha256(path)} for kind, path in files.items()},
    }
    atomic_write_text(json.dumps(manifest, indent=2) + "\n", folder / "export.json")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cocofast export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint written by cocofast training, e.g. RUN/student/best.pt")
    parser.add_argument("--out", required=True, help="folder for ROLE.onnx, ROLE.torchscript.pt, ROLE.safetensors")
    parser.add_argument("--role", default="student", help="which network of the checkpoint (default: student)")
    parser.add_argument("--trust-model-code", "--trust_model_code", action="append", metavar="FACTORY",
                        help=TRUST_HELP)
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, >= 17 (default {DEFAULT_OPSET})")
    parser.add_argument("--pad", choices=[*PAD_MODES, "none"], default=DEFAULT_PAD,
                        help="how the graph pads H and W up to the network's multiple, cropping the logits back: "
                             "edge (repeat edge pixels, default), reflect, zero; none: no padding, H and W must "
                             "be multiples")
    parser.add_argument("--int8", action="store_true",
                        help="also write ROLE.int8.onnx, quantised by ONNX Runtime (static, calibrated on training "
                             "patches; dynamic when the training data cannot be read) and its accuracy against "
                             "the fp32 network on the validation split")
    parser.add_argument("--calibration", type=int, default=None, metavar="N",
                        help="with --int8: training patches to calibrate on (default 32)")
    args = parser.parse_args(argv)
    if args.opset < 17:
        parser.error(f"--opset {args.opset}: expected 17 or newer")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out}: exists and is not a folder")
    if args.calibration is not None and (not args.int8 or args.calibration < 1):
        parser.error(f"--calibration {args.calibration}: needs --int8 and a positive count")
    int8 = None
    if args.int8:
        from cocofast.quantise import DEFAULT_CALIBRATION, int8_exporter

        int8 = int8_exporter(args.calibration or DEFAULT_CALIBRATION, log=print)
    try:
        manifest = export_checkpoint(args.checkpoint, args.out, role=args.role, opset=args.opset,
                                     trusted=trusted_paths(args.trust_model_code),
                                     pad=None if args.pad == "none" else args.pad, int8=int8)
    except (CheckpointError, ExportError, OSError) as err:  # an unusable checkpoint or network, or --out
        print(f"cocofast export: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"cocofast export: error: {err}", file=sys.stderr)
        return 1
    worst = max(max(e.values()) for e in manifest["max_abs_error_vs_pytorch"].values())
    names = ", ".join(f["path"] for f in manifest["files"].values())
    padding = manifest["input"]["padding"]
    takes = (f"any H x W ({padding['mode']}-padded to multiples of {padding['to_multiple_of']})" if padding
             else f"H, W multiples of {manifest['input']['multiple_of']}")
    print(f"{args.checkpoint} ({manifest['model_name']}, {args.role}) -> {args.out}: {names}, export.json; "
          f"takes {takes}; ONNX Runtime and TorchScript match PyTorch within {worst:.1e} at "
          f"{', '.join(manifest['max_abs_error_vs_pytorch'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
