"""Segmentation metrics: one confusion matrix over the whole evaluation set (CoCo DistillNet §IV-C), and HD95.

    cm = ConfusionMatrix(num_classes=2)
    for logits, mask in loader:
        cm.update(logits.argmax(1), mask)
    cm.all_reduce()   # sums every DDP rank's matrix; a no-op without torch.distributed
    cm.compute()      # {"acc", "iou", "miou", "dice", "mdice"}

p[i, j] counts pixels of true class i predicted as class j, accumulated as int64 (exact at any data-set
size) and turned into ratios in float64:
    ACC    = Σ_i p_ii / Σ_ij p_ij
    IoU_k  = p_kk / (Σ_j p_kj + Σ_j p_jk − p_kk)        mIoU  = mean_k IoU_k
    Dice_k = 2 p_kk / (Σ_j p_kj + Σ_j p_jk)             mDice = mean_k Dice_k
A class absent from both prediction and target has no IoU or Dice: it is reported as NaN and left out
of the means. Pixels whose target equals `ignore_index` are not counted at all.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int | None = None, device: str | torch.device = "cpu"):
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.reduced = False

    def reset(self) -> None:
        self.matrix.zero_()
        self.reduced = False

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count one batch: `pred` and `target` are integer label tensors of the same shape."""
        if self.reduced:
            raise RuntimeError("this ConfusionMatrix was already all-reduced; call reset() before new updates")
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} and target shape {tuple(target.shape)} "
                             "differ; pass labels (e.g. logits.argmax(1)), not scores")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError(f"expected integer labels, got {pred.dtype} prediction and {target.dtype} target")
        pred = pred.reshape(-1).to(self.matrix.device, torch.int64)
        target = target.reshape(-1).to(self.matrix.device, torch.int64)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = pred[keep], target[keep]
        k = self.num_classes
        if target.numel():
            # One host sync for all four bounds (each .item() on a GPU waits for the device).
            t_lo, t_hi, p_lo, p_hi = torch.stack([target.min(), target.max(), pred.min(), pred.max()]).tolist()
            for name, lo, hi in (("target", t_lo, t_hi), ("prediction", p_lo, p_hi)):
                if lo < 0 or hi >= k:
                    extra = (f" (or ignore_index {self.ignore_index})"
                             if self.ignore_index is not None and name == "target" else "")
                    raise ValueError(f"{name} labels span [{lo}, {hi}], expected classes 0..{k - 1}{extra}")
        self.matrix += torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the matrices of all ranks (once). With NCCL the matrix must live on this rank's GPU; a CPU
        matrix is moved there and back."""
        if self.reduced:
            raise RuntimeError("all_reduce() called twice: the second call would count every pixel again")
        if dist.is_available() and dist.is_initialized():
            buffer = self.matrix
            if dist.get_backend() == "nccl" and buffer.device.type != "cuda":
                buffer = buffer.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            self.matrix.copy_(buffer)
        self.reduced = True
        return self

    def compute(self) -> dict:
        p = self.matrix.to("cpu", torch.float64)
        return scores_from_matrix(p.numpy())


def scores_from_matrix(p: np.ndarray) -> dict:
    """ACC, per-class IoU and Dice and their means (see the module docstring) from a float64 matrix."""
    p = np.asarray(p, dtype=np.float64)
    diag, rows, cols = np.diag(p), p.sum(1), p.sum(0)
    total = p.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(rows + cols > 0, diag / (rows + cols - diag), np.nan)
        dice = np.where(rows + cols > 0, 2 * diag / (rows + cols), np.nan)
    return {
        "acc": float(diag.sum() / total) if total > 0 else math.nan,
        "iou": iou.tolist(),
        "miou": _nanmean(iou),
        "dice": dice.tolist(),
        "mdice": _nanmean(dice),
    }


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


# ---------------------------------------------------------------------------------------------------------
# HD95

def hd95(pred, target, label: int, *, spacing: tuple[float, float] = (1.0, 1.0),
         ignore_index: int | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between the `label` regions of two 2-D label maps.

    Boundary pixels of each region (the region minus its erosion by a 4-connected cross; pixels on the
    image border count as boundary) are matched to the nearest boundary pixel of the other region with
    scipy's exact Euclidean distance transform; HD95 is the 95th percentile (linear interpolation) of both
    directed distance sets pooled together, as MedPy computes it for Synapse-style evaluation. Distances
    are in pixels times `spacing` (row, column).

    Defined values when the class is missing:
      * absent from both prediction and target: 0.0 (nothing to miss);
      * present in only one of them: the image diagonal in the same units, sqrt((H*sy)^2 + (W*sx)^2),
        the largest distance two pixels of the image can have, so averages stay finite and a miss costs
        the most. Pixels whose target is `ignore_index` belong to no class in either map.
    """
    from scipy.ndimage import binary_erosion, distance_transform_edt

    pred, target = _as_numpy(pred), _as_numpy(target)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"hd95 needs two 2-D label maps of one shape, got {pred.shape} and {target.shape}")
    a, b = pred == label, target == label
    if ignore_index is not None:
        valid = target != ignore_index
        a, b = a & valid, b & valid
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float(math.hypot(pred.shape[0] * spacing[0], pred.shape[1] * spacing[1]))
    edge_a = a & ~binary_erosion(a, border_value=0)
    edge_b = b & ~binary_erosion(b, border_value=0)
    a_to_b = distance_transform_edt(~edge_b, sampling=spacing)[edge_a]
    b_to_a = distance_transform_edt(~edge_a, sampling=spacing)[edge_b]
    return float(np.percentile(np.concatenate([a_to_b, b_to_a]), 95))


class HD95Meter:
    """Mean HD95 per class over images (each image scored alone), all-reducible like ConfusionMatrix."""

    def __init__(self, num_classes: int, ignore_index: int | None = None, spacing=(1.0, 1.0)):
        self.num_classes, self.ignore_index, self.spacing = num_classes, ignore_index, spacing
        self.sums = torch.zeros(num_classes, dtype=torch.float64)
        self.count = torch.zeros(1, dtype=torch.float64)
        self.reduced = False

    def update(self, pred, target) -> None:
        """pred, target: (H, W) or (B, H, W) label maps."""
        if self.reduced:
            raise RuntimeError("this HD95Meter was already all-reduced")
        pred, target = _as_numpy(pred), _as_numpy(target)
        if pred.ndim == 2:
            pred, target = pred[None], target[None]
        for p, t in zip(pred, target):
            for k in range(self.num_classes):
                self.sums[k] += hd95(p, t, k, spacing=self.spacing, ignore_index=self.ignore_index)
            self.count += 1

    def all_reduce(self) -> "HD95Meter":
        if self.reduced:
            raise RuntimeError("all_reduce() called twice")
        if dist.is_available() and dist.is_initialized():
            both = torch.cat([self.sums, self.count])
            if dist.get_backend() == "nccl":
                both = both.cuda()
            dist.all_reduce(both)
            self.sums.copy_(both[:-1].cpu())
            self.count.copy_(both[-1:].cpu())
        self.reduced = True
        return self

    def compute(self) -> dict:
        per_class = (self.sums / self.count).tolist() if self.count.item() else [math.nan] * self.num_classes
        return {"hd95": per_class, "mhd95": float(np.mean(per_class))}


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ---------------------------------------------------------------------------------------------------------
# scoring mask files (cocofast predict --masks)

def read_labels(path, num_classes: int, levels=None):
    """Yield (n, W) int64 class bands of a mask file; values are class indices (255: not scored) or the
    levels `cocofast segment` writes (k * 255 // (K - 1)), told apart by the values the file holds."""
    from cocofast.data.folder import CHECK_BAND_PIXELS, mask_reader, single_channel

    spread = np.array([k * 255 // max(num_classes - 1, 1) for k in range(num_classes)])
    levels = spread if levels is None else np.asarray(levels)
    def bands():  # two passes, a band at a time: memory is one band, whatever the mask's size
        reader = mask_reader(path)
        try:
            rows = max(1, CHECK_BAND_PIXELS // reader.width)
            for top in range(0, reader.height, rows):
                yield single_channel(reader.read(top, 0, rows, reader.width), path)
        finally:
            reader.close()

    present = set()
    for band in bands():
        present.update(np.unique(band).tolist())
    if present <= set(levels.tolist()) and not present <= set(range(num_classes)):
        lut = {int(v): k for k, v in enumerate(levels)}
    elif present <= set(range(num_classes)) | {255}:
        lut = {**{k: k for k in range(num_classes)}, 255: -1}
    else:
        shown = ", ".join(str(v) for v in sorted(present - set(range(num_classes)) - set(levels.tolist()))[:8])
        raise ValueError(f"{path}: mask values {shown} are neither classes 0..{num_classes - 1} (255: not scored) "
                         f"nor the levels {', '.join(map(str, levels))} cocofast writes")
    table = np.full(256 if all(v < 256 for v in present) else max(present) + 1, -1, np.int64)
    for value, cls in lut.items():
        table[value] = cls
    for band in bands():
        yield table[band.astype(np.int64)]


def score_mask_files(pairs, num_classes: int, levels=None) -> list[dict]:
    """Per-image and overall ("all images", pooled pixels) Dice and IoU per class of (name, predicted mask,
    true mask) files; rows for a CSV. A true pixel 255 (class indices) is not scored."""
    from cocofast.data.imageio import read_header

    rows, total = [], np.zeros((num_classes, num_classes), np.int64)
    for name, predicted, truth in pairs:
        matrix = np.zeros_like(total)
        sizes = []
        for path in (predicted, truth):
            try:
                head = read_header(path)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
            sizes.append((head.width, head.height))
        if sizes[0] != sizes[1]:
            raise ValueError(f"{truth}: the true mask is {sizes[1][0]}x{sizes[1][1]}, the prediction {predicted} "
                             f"{sizes[0][0]}x{sizes[0][1]}")
        pred_bands, true_bands = read_labels(predicted, num_classes, levels), read_labels(truth, num_classes)
        for p, t in zip(pred_bands, true_bands):
            keep = (t >= 0) & (p >= 0)
            matrix += np.bincount(t[keep] * num_classes + p[keep], minlength=num_classes ** 2).reshape(
                num_classes, num_classes)
        total += matrix
        rows.append(score_row(name, matrix))
    rows.append(score_row("all images", total))
    return rows


def score_row(name: str, matrix: np.ndarray) -> dict:
    scores = scores_from_matrix(matrix)
    row = {"image": name, "pixels": int(matrix.sum())}
    row.update({f"dice{k}": v for k, v in enumerate(scores["dice"])})
    row.update({f"iou{k}": v for k, v in enumerate(scores["iou"])})
    row.update({"mdice": scores["mdice"], "miou": scores["miou"]})
    return row
