"""Metrics against hand-computed float64 references; the DDP all-reduce with two gloo processes."""
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cocofast.metrics import ConfusionMatrix, HD95Meter, hd95


def reference_scores(pred: np.ndarray, target: np.ndarray, k: int, ignore=None) -> dict:
    """The paper's ACC and mIoU by hand: float64 confusion matrix with rows = truth, columns = prediction."""
    keep = np.ones(target.shape, bool) if ignore is None else target != ignore
    p = np.zeros((k, k), np.float64)
    np.add.at(p, (target[keep], pred[keep]), 1.0)
    iou, dice = [], []
    for c in range(k):
        tp, row, col = p[c, c], p[c].sum(), p[:, c].sum()
        iou.append(tp / (row + col - tp) if row + col else math.nan)
        dice.append(2 * tp / (row + col) if row + col else math.nan)
    present = [v for v in iou if not math.isnan(v)]
    return {"matrix": p, "acc": np.trace(p) / p.sum(), "iou": iou, "miou": sum(present) / len(present),
            "dice": dice, "mdice": np.nanmean(dice)}


def test_confusion_matrix_matches_float64_reference_over_batches():
    rng = np.random.default_rng(0)
    cm = ConfusionMatrix(3, ignore_index=255)
    preds, targets = [], []
    for _ in range(5):  # accumulated over the whole set, not averaged per batch
        target = rng.integers(0, 3, (2, 17, 23))
        target[rng.random(target.shape) < 0.1] = 255
        noise = rng.integers(0, 3, target.shape)
        pred = np.where(rng.random(target.shape) < 0.7, np.where(target == 255, 0, target), noise)
        cm.update(torch.from_numpy(pred), torch.from_numpy(target))
        preds.append(pred)
        targets.append(target)
    ref = reference_scores(np.concatenate(preds), np.concatenate(targets), 3, ignore=255)
    assert cm.matrix.dtype == torch.int64
    assert np.array_equal(cm.matrix.numpy(), ref["matrix"])
    got = cm.compute()
    assert set(got) >= {"acc", "miou", "iou", "dice", "mdice"}
    for key in ("acc", "miou", "mdice"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12)
    assert got["iou"] == pytest.approx(ref["iou"], rel=1e-12)
    assert got["dice"] == pytest.approx(ref["dice"], rel=1e-12)


def test_absent_class_is_nan_and_left_out_of_the_means():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]))
    got = cm.compute()
    assert math.isnan(got["iou"][2]) and math.isnan(got["dice"][2])
    assert got["iou"][:2] == pytest.approx([1 / 2, 2 / 3])
    assert got["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert got["dice"][:2] == pytest.approx([2 / 3, 4 / 5]) and got["acc"] == pytest.approx(3 / 4)


def test_bad_input_is_refused_with_a_reason():
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 2, 4, 4).long(), torch.zeros(2, 4, 4).long())
    with pytest.raises(ValueError, match=r"target labels span \[0, 255\]"):
        cm.update(torch.zeros(4).long(), torch.tensor([0, 1, 255, 0]))
    with pytest.raises(ValueError, match="prediction labels span"):
        cm.update(torch.tensor([0, 2, 0, 0]), torch.zeros(4).long())
    with pytest.raises(ValueError, match="integer labels"):
        cm.update(torch.zeros(4), torch.zeros(4).long())
    with pytest.raises(ValueError, match="at least 2"):
        ConfusionMatrix(1)
    cm.all_reduce()  # without torch.distributed: marks the matrix final
    with pytest.raises(RuntimeError, match="twice"):
        cm.all_reduce()
    with pytest.raises(RuntimeError, match="reset"):
        cm.update(torch.zeros(4).long(), torch.zeros(4).long())
    cm.reset()
    cm.update(torch.zeros(4).long(), torch.zeros(4).long())


# --- HD95 ---------------------------------------------------------------------------------------------------
def brute_hd95(a: np.ndarray, b: np.ndarray) -> float:
    """Boundary = pixels of the region with a 4-neighbour outside it (or off the image); all-pairs distances."""
    def boundary(m):
        padded = np.pad(m, 1)
        inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        return np.argwhere(m & ~inner).astype(np.float64)
    pa, pb = boundary(a), boundary(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def test_hd95_against_brute_force_and_defined_values():
    rng = np.random.default_rng(0)
    for _ in range(4):
        pred = np.zeros((40, 50), np.int64)
        target = np.zeros((40, 50), np.int64)
        y, x = rng.integers(2, 20, 2)
        pred[y:y + 15, x:x + 20] = 1
        target[y + 3:y + 20, x - 2:x + 16] = 1
        target[rng.random(target.shape) < 0.01] = 1  # speckles make the tail matter
        assert hd95(pred, target, 1) == pytest.approx(brute_hd95(pred == 1, target == 1), rel=1e-12)
        assert hd95(pred, target, 0) == pytest.approx(brute_hd95(pred == 0, target == 0), rel=1e-12)
    square = np.zeros((30, 40), np.int64)
    square[5:10, 5:10] = 1
    shifted = np.roll(square, 4, axis=1)
    assert hd95(square, shifted, 1) == pytest.approx(4.0)
    assert hd95(square, shifted, 1, spacing=(2.0, 0.5)) == pytest.approx(2.0)
    empty = np.zeros_like(square)
    assert hd95(empty, empty, 1) == 0.0  # absent from both
    assert hd95(square, empty, 1) == pytest.approx(50.0)  # absent from one: the image diagonal
    assert hd95(empty, square, 1, spacing=(2.0, 1.0)) == pytest.approx(math.hypot(60, 40))
    ignored = square.copy()
    ignored[5:10, 5:10] = 255
    assert hd95(square, ignored, 1, ignore_index=255) == 0.0  # the only class-1 pixels are unlabelled


# --- DDP --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(rank: int):
    rng = np.random.default_rng(100 + rank)
    target = rng.integers(0, 3, (3, 20, 20))
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, 3, target.shape))
    return pred, target


def _ddp_worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pred, target = _shard(rank)
        cm = ConfusionMatrix(3)
        cm.update(torch.from_numpy(pred), torch.from_numpy(target))
        cm.all_reduce()
        meter = HD95Meter(3)
        meter.update(pred, target)
        meter.all_reduce()
        torch.save({"matrix": cm.matrix, "scores": cm.compute(), "hd95": meter.compute()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_gloo_processes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    shards = [_shard(r) for r in range(2)]
    pred = np.concatenate([s[0] for s in shards])
    target = np.concatenate([s[1] for s in shards])
    ref = reference_scores(pred, target, 3)
    per_image = np.array([[hd95(p, t, k) for k in range(3)] for p, t in zip(pred, target)])
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert np.array_equal(got["matrix"].numpy(), ref["matrix"])  # every rank holds the global matrix
        assert got["scores"]["miou"] == pytest.approx(ref["miou"], rel=1e-12)
        assert got["hd95"]["hd95"] == pytest.approx(per_image.mean(0).tolist(), rel=1e-12)
