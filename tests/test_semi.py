"""Semi-supervised training: the labelled subset is exact and reproducible, batches are half labelled, and
no unlabelled sample reaches the supervised loss or a loss that reads labels."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cocofast.train.student as student_mod
from cocofast.losses import get_loss
from cocofast.models import create_model
from cocofast.train.config import TrainConfig
from cocofast.train.runtime import Runtime
from cocofast.train.schedule import IterationLR
from cocofast.train.semi import (UNLABELLED, HalfLabelledSampler, PartlyLabelled, check_fraction,
                                 labelled_indices, labelled_rows)
from cocofast.train.networks import frozen
from cocofast.train.student import StudentStep


@pytest.mark.parametrize("length, fraction", [(10, 0.6), (7, 0.5), (160, 0.6), (3, 0.1), (101, 0.333)])
def test_labelled_count_is_exact_and_reproducible(length, fraction):
    chosen = labelled_indices(length, fraction, seed=5)
    assert len(chosen) == max(1, round(fraction * length))
    assert len(set(chosen)) == len(chosen) and all(0 <= i < length for i in chosen)
    assert chosen == labelled_indices(length, fraction, seed=5)


def test_labelled_subset_depends_on_the_seed_and_bad_fractions_are_refused():
    assert labelled_indices(100, 0.5, seed=0) != labelled_indices(100, 0.5, seed=1)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            labelled_indices(10, bad, seed=0)
    with pytest.raises(ValueError, match="labels all of them"):
        check_fraction(10, 0.97)


class Toy(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        return torch.full((1, 4, 4), float(i)), torch.full((4, 4), i % 2, dtype=torch.long)


def test_unlabelled_masks_are_replaced_in_the_dataset():
    view = PartlyLabelled(Toy(), [1, 4])
    assert torch.equal(view[1][1], Toy()[1][1]) and torch.equal(view[4][1], Toy()[4][1])
    for i in (0, 2, 3, 11):
        assert (view[i][1] == UNLABELLED).all()
        assert torch.equal(view[i][0], Toy()[i][0])  # the image is kept
    masks = torch.stack([view[i][1] for i in range(4)])
    assert labelled_rows(masks).tolist() == [False, True, False, False]


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_batch_is_half_labelled_and_resumes_exactly(world_size):
    labelled = labelled_indices(20, 0.3, seed=3)
    per_rank, global_batch = 4, 4 * world_size
    samplers = [HalfLabelledSampler(labelled, 20, world_size, r, seed=7, per_rank_batch=per_rank,
                                    global_batch=global_batch) for r in range(world_size)]
    for s in samplers:
        s.set_epoch(2)
    streams = [list(s) for s in samplers]
    for stream in streams:
        assert len(stream) == (20 // global_batch) * per_rank
        for b in range(0, len(stream), per_rank):
            batch = stream[b:b + per_rank]
            assert all(i in labelled for i in batch[:2]) and not any(i in labelled for i in batch[2:])
    if world_size == 2:  # within one global batch, the ranks draw different samples
        assert set(streams[0][:per_rank]).isdisjoint(streams[1][:per_rank])
    again = samplers[0]
    again.set_epoch(2)
    again.start_at(per_rank)
    assert list(again) == streams[0][per_rank:]
    again.set_epoch(3)
    assert list(again) != streams[0]


def test_odd_per_rank_batches_are_refused():
    with pytest.raises(ValueError, match="even per-process batch"):
        HalfLabelledSampler([0, 1], 10, 1, 0, seed=0, per_rank_batch=3, global_batch=3)


def test_unlabelled_rows_never_reach_the_supervised_loss_or_label_losses(monkeypatch):
    torch.manual_seed(0)
    cfg = TrainConfig(image_size=32, in_channels=3, losses="ifvd,kd", adversarial=False, amp="off")
    rt = Runtime(0, 1, 0, torch.device("cpu"), None)
    student = create_model("enet", in_channels=3, num_classes=2, width=0.25)
    teacher = frozen(create_model("enet", in_channels=3, num_classes=2, width=0.25))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    schedule = IterationLR(optimizer, 0.0, total_iters=10, iters_per_epoch=10)
    seen = {}

    def spy_supervised(kind, logits, masks):
        seen["supervised"] = masks.clone()
        return torch.nn.functional.cross_entropy(logits, masks)

    class SpyIFVD(type(get_loss("ifvd"))):
        def distill(self, s, t, labels):
            seen["ifvd"] = labels.clone()
            return super().distill(s, t, labels)

    class SpyKD(type(get_loss("kd"))):
        def distill(self, s, t, labels):
            seen["kd_batch"] = s[0].shape[0]
            return super().distill(s, t, labels)

    monkeypatch.setattr(student_mod, "supervised_loss", spy_supervised)
    step = StudentStep(cfg, rt, student, optimizer, schedule, torch.amp.GradScaler("cpu", enabled=False),
                       losses=[("ifvd", SpyIFVD()), ("kd", SpyKD())], teacher=teacher)
    images = torch.rand(4, 3, 32, 32)
    masks = (images[:, 0] > 0.5).long()
    masks[2:] = UNLABELLED
    terms = step(images, masks)
    assert seen["supervised"].shape[0] == 2 and (seen["supervised"] != UNLABELLED).all()
    assert torch.equal(seen["supervised"], masks[:2])
    assert seen["ifvd"].shape[0] == 2 and (seen["ifvd"] != UNLABELLED).all()
    assert seen["kd_batch"] == 4  # label-free distillation sees the whole batch
    assert {"loss_ce", "loss_ifvd", "loss_kd"} <= set(terms)


def test_the_student_starts_from_the_same_weights_whatever_the_losses(tmp_path):
    """Loading a teacher and paraphrasers must not shift the student's initialisation at a given seed."""
    from cocofast.train import distill
    from cocofast.train.checkpoint import load_checkpoint

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    common = ["--config", tiny, f"--run_dir={tmp_path}", "--stage=student", "--student_epochs=1",
              "--stop_after_iters=0", "--save_every_iters=0"]
    assert distill.main(["--config", tiny, f"--run_dir={tmp_path}", "--stage=teacher,paraphraser",
                         "--teacher_epochs=1"]) == 0
    firsts = {}
    for name, losses, adv in (("alone", "none", "false"), ("coco", "coco", "true"), ("kd", "kd", "false")):
        assert distill.main([*common, f"--student_name={name}", f"--losses={losses}", f"--adversarial={adv}",
                             "--student_lr=0", "--disc_lr=0"]) == 0
        firsts[name] = load_checkpoint(tmp_path / name / "last.pt")["models"]["student"]["state_dict"]
    for name in ("coco", "kd"):
        for key, value in firsts["alone"].items():
            if value.is_floating_point() and "running" not in key:
                assert torch.equal(value, firsts[name][key]), (name, key)
