"""Confusion-matrix metrics against a hand-computed float64 matrix, the DDP all-reduce, and HD95."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cocofast.metrics import ConfusionMatrix, hd95


def test_metrics_match_hand_computed_float64():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, (4, 9, 7))
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 3, target.shape))
    p = np.zeros((3, 3), np.float64)
    for t, q in zip(target.ravel(), pred.ravel()):
        p[t, q] += 1
    cm = ConfusionMatrix(3)
    cm.update(torch.from_numpy(pred[:2]), torch.from_numpy(target[:2]))
    cm.update(torch.from_numpy(pred[2:]), torch.from_numpy(target[2:]))
    got = cm.compute()
    iou = [p[k, k] / (p[k].sum() + p[:, k].sum() - p[k, k]) for k in range(3)]
    dice = [2 * p[k, k] / (p[k].sum() + p[:, k].sum()) for k in range(3)]
    assert got["acc"] == pytest.approx(np.trace(p) / p.sum(), abs=1e-15)
    assert got["iou"] == pytest.approx(iou, abs=1e-15) and got["miou"] == pytest.approx(np.mean(iou), abs=1e-15)
    assert got["dice"] == pytest.approx(dice, abs=1e-15)


def test_ignore_index_and_bad_labels():
    cm = ConfusionMatrix(2, ignore_index=255)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 255, 1]))
    assert cm.matrix.tolist() == [[1, 0], [0, 1]]
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([0, 2]), torch.tensor([0, 1]))
    absent = ConfusionMatrix(3)
    absent.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert np.isnan(absent.compute()["iou"][2]) and absent.compute()["miou"] == 1.0


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([rank, 1]), torch.tensor([0, 1]))
    cm.all_reduce()
    out[rank] = cm.matrix.tolist()
    dist.destroy_process_group()


def test_all_reduce_across_two_gloo_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(port, out), nprocs=2)
    # rank 0 saw (0→0, 1→1), rank 1 saw (0→1, 1→1): the sum is the same on both ranks.
    assert out[0] == out[1] == [[1, 1], [0, 2]]


def test_hd95_defined_values_and_a_known_distance():
    a = np.zeros((20, 20), int)
    assert hd95(a, a, 1) == 0.0
    b = a.copy()
    b[5:10, 5:10] = 1
    assert hd95(a, b, 1) == pytest.approx(np.hypot(20, 20))
    c = np.zeros_like(b)
    c[5:10, 8:13] = 1  # the same square shifted by 3 pixels
    assert hd95(b, c, 1) == pytest.approx(3.0)
