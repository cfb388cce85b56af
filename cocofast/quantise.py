"""INT8 ONNX from an exported fp32 graph, with ONNX Runtime's own quantisation tools, and what it costs.

    quantise_static(fp32, int8, patches)      QDQ INT8: weights per output channel, activations per tensor,
                                              their ranges calibrated (MinMax) on `patches` of training data
    quantise_dynamic(fp32, int8)              weights INT8 ahead of time, activation ranges per run: for when
                                              no training data can be read to calibrate on
    compare(fp32, int8, dataset, classes)     per-class Dice and mIoU of both against the masks, their
                                              difference, and how many pixels' classes the two agree on

`int8_exporter` is what `cocofast export --int8` calls: it reads the training and validation splits the
checkpoint's config names (the same patches train/data.py builds), calibrates on the first N training patches,
falls back to dynamic quantisation (stated) when the data cannot be read, and scores both on the validation split.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cocofast.metrics import ConfusionMatrix
from cocofast.quiet import native_output_captured

DEFAULT_CALIBRATION = 32
# Synthetic splits: one generator at seeds far apart; must equal train/data.py's (tests/test_deploy.py checks).
SPLIT_SEED_OFFSETS = {"train": 0, "val": 1_000_003}


class _Patches:
    """onnxruntime.quantization's CalibrationDataReader protocol over (C, H, W) float32 patches, one per run."""

    def __init__(self, patches: Sequence[np.ndarray], input_name: str = "image"):
        self.patches, self.input_name, self.next = patches, input_name, 0

    def get_next(self) -> dict | None:
        if self.next >= len(self.patches):
            return None
        self.next += 1
        return {self.input_name: np.ascontiguousarray(self.patches[self.next - 1][None], dtype=np.float32)}

    def rewind(self) -> None:
        self.next = 0


@contextlib.contextmanager
def quiet():
    """The quantisation tools log a warning per BatchNorm they leave in float and print whole tensor types when
    shape inference gives up; none of it is actionable, so it is held back (errors still raise)."""
    logging.disable(logging.WARNING)
    try:
        with native_output_captured():
            yield
    finally:
        logging.disable(logging.NOTSET)


def preprocessed(fp32: Path, scratch: Path) -> Path:
    """ONNX Runtime's recommended pre-quantisation pass (shape inference, graph optimisation), or the graph
    itself when the pass cannot take it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = scratch / (fp32.stem + ".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)
        return out
    except Exception:  # noqa: BLE001 - an optional optimisation: the plain graph quantises too
        return fp32


def quantise_static(fp32: str | os.PathLike, int8: str | os.PathLike, patches: Sequence[np.ndarray]) -> None:
    """Static INT8 (QDQ) of the ONNX graph `fp32` into `int8`, activation ranges calibrated on `patches`."""
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not len(patches):
        raise ValueError("static quantisation needs at least one calibration patch")
    with tempfile.TemporaryDirectory(dir=Path(int8).parent) as scratch, quiet():
        source = preprocessed(Path(fp32), Path(scratch))
        quantize_static(str(source), str(int8), _Patches(patches), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)


def quantise_dynamic(fp32: str | os.PathLike, int8: str | os.PathLike) -> None:
    """Dynamic INT8 of `fp32` into `int8`: weights quantised now, activations' ranges measured per run."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # ONNX Runtime's CPU ConvInteger takes unsigned 8-bit weights only.
    with quiet():
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QUInt8)


def session(path: str | os.PathLike, threads: int = 0, spin: bool = True):
    """An ONNX Runtime CPU session on `threads` threads (0: ONNX Runtime's choice). spin=False stops idle
    threads busy-waiting, which on a CPU shared with other work costs more than it saves."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def labels_of(sess, image: np.ndarray) -> np.ndarray:
    """The class of every pixel of a (C, H, W) patch."""
    logits = sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(image[None], np.float32)})[0]
    return logits[0].argmax(0)


def scores(cm: ConfusionMatrix) -> dict:
    found = cm.compute()
    as_float = lambda v: None if v != v else round(float(v), 6)  # noqa: E731 - NaN (class absent) as null
    return {"dice": [as_float(v) for v in found["dice"]], "miou": as_float(found["miou"])}


def compare(fp32: str | os.PathLike, int8: str | os.PathLike, dataset, num_classes: int, limit: int | None = None,
            threads: int = 0) -> dict:
    """Per-class Dice and mIoU of the fp32 and INT8 graphs on `dataset` ((image, mask) pairs), the difference
    (INT8 minus fp32) and the share of pixels where the two predict the same class."""
    import torch

    runs = {"fp32": session(fp32, threads), "int8": session(int8, threads)}
    matrices = {k: ConfusionMatrix(num_classes, ignore_index=getattr(dataset, "ignore_index", None)) for k in runs}
    agree = total = 0
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(count):
        image, mask = dataset[i]
        predicted = {k: labels_of(s, np.asarray(image)) for k, s in runs.items()}
        for k, labels in predicted.items():
            matrices[k].update(torch.from_numpy(labels), torch.as_tensor(mask))
        agree += int((predicted["fp32"] == predicted["int8"]).sum())
        total += predicted["fp32"].size
    fp, q = scores(matrices["fp32"]), scores(matrices["int8"])
    minus = lambda a, b: None if a is None or b is None else round(a - b, 6)  # noqa: E731
    return {"patches": count, "fp32": fp, "int8": q,
            "difference": {"dice": [minus(a, b) for a, b in zip(q["dice"], fp["dice"])],
                           "miou": minus(q["miou"], fp["miou"])},
            "pixel_agreement": round(agree / max(total, 1), 6)}


# --- from a checkpoint's training config -----------------------------------------------------------------
def split_dataset(config: dict, split: str):
    """The checkpoint config's `split` ('train' or 'val') without augmentation, as train/data.py builds it;
    None when the config does not say enough or the data is not there (the reason is not an error here:
    quantisation then falls back to dynamic and the accuracy is not measured)."""
    from cocofast.data import FolderDataset, SyntheticPathology

    try:
        if config.get("dataset", "synthetic") not in ("synthetic", "folder"):
            return None  # slides: their patches depend on annotations and tissue masks train/data.py reads
        if config.get("dataset", "synthetic") == "synthetic":
            length = config["train_samples"] if split == "train" else config["val_samples"]
            return SyntheticPathology(int(length), size=int(config["image_size"]),
                                      seed=int(config.get("data_seed", 0)) + SPLIT_SEED_OFFSETS[split],
                                      in_channels=int(config.get("in_channels", 3)))
        folder = Path(config["data_root"]) / split
        mapping = {int(v): int(c) for v, c in (item.split(":") for item in
                                                 str(config.get("mask_values") or "").split(",") if item.strip())}
        # As training: patch_stride tiles the training split only; scored patches hold each pixel once.
        return FolderDataset(folder, mask_values=mapping or None, num_classes=int(config["num_classes"]),
                             in_channels=int(config.get("in_channels", 3)),
                             patch_size=config.get("patch_size") or None,
                             stride=(config.get("patch_stride") or None) if split == "train" else None,
                             score_once=split != "train", resize=config.get("image_size"),
                             normalise=config.get("normalise") or "range")
    except (KeyError, TypeError, ValueError, OSError):
        return None


def int8_exporter(calibration: int = DEFAULT_CALIBRATION, log: Callable[[str], None] = lambda _: None):
    """The `int8` step of cocofast.export.export_checkpoint: (model, ckpt, fp32 path, int8 path) -> the record
    export.json keeps under "int8"."""

    def run(model, ckpt: dict, fp32: Path, int8: Path) -> dict:
        config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
        train = split_dataset(config, "train")
        if train is not None and len(train):
            patches = [np.asarray(train[i][0], np.float32) for i in range(min(calibration, len(train)))]
            quantise_static(fp32, int8, patches)
            method = {"method": "static (QDQ, per-channel INT8 weights, UINT8 activations, MinMax ranges)",
                      "calibration_patches": len(patches), "calibration_split": "train"}
        else:
            quantise_dynamic(fp32, int8)
            why = ("slide patches are not re-read for calibration" if config.get("dataset") == "slides" else
                   "the checkpoint's training data could not be read to calibrate on")
            method = {"method": f"dynamic ({why})", "calibration_patches": 0}
        record = {**method, "bytes": {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}}
        val = split_dataset(config, "val")
        if val is not None and len(val):
            record["validation"] = compare(fp32, int8, val, int(model.num_classes))
        else:
            record["validation"] = None
        log(describe(record))
        return record

    return run


def describe(record: dict) -> str:
    """One line for the console: method, sizes and the accuracy the INT8 graph costs."""
    size = record["bytes"]
    text = (f"INT8: {record['method'].split(' (')[0]}, {record['calibration_patches']} calibration patches; "
            f"{size['int8'] / 1e6:.2f} MB vs {size['fp32'] / 1e6:.2f} MB fp32")
    val = record.get("validation")
    if not val:
        return text + "; no validation split readable, accuracy not measured"
    dice = ", ".join(f"{a:.4f}" if a is not None else "n/a" for a in val["difference"]["dice"])
    return (text + f"; on {val['patches']} validation patches mIoU {val['int8']['miou']:.4f} vs "
            f"{val['fp32']['miou']:.4f} fp32 (difference {val['difference']['miou']:+.4f}; per-class Dice "
            f"difference {dice}); same class on {val['pixel_agreement']:.2%} of pixels")
