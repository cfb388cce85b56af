"""Networks and losses register where they are defined; training takes any registered segmentation network."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cocofast.losses import LOSSES, DistillLoss, Reads, get_loss, parse_losses, register_loss
from cocofast.losses.kd import KDLoss
from cocofast.models import SEGMENTATION_MODELS, MobileUNet, create_model, list_models, register_model
from cocofast.models.registry import MODELS
from cocofast.train.config import ConfigError, parse_args


def test_a_network_registered_by_decorator_is_a_student_training_accepts():
    try:
        @register_model("tiny_registered")
        class Tiny(MobileUNet):
            pass

        @register_model("tiny_part", segmentation=False)
        class Part(nn.Module):
            pass

        assert "tiny_registered" in SEGMENTATION_MODELS and "tiny_part" not in SEGMENTATION_MODELS
        assert list_models()[-2:] == ["tiny_registered", "tiny_part"]
        cfg = parse_args(["--student_model=tiny_registered", "--student_width=0.25"])
        assert isinstance(create_model(cfg.student_model, width=0.25), Tiny)
        with pytest.raises(ConfigError, match="unknown segmentation network 'tiny_part'"):
            parse_args(["--student_model=tiny_part"])
    finally:
        MODELS.pop("tiny_registered", None)
        MODELS.pop("tiny_part", None)
    assert "tiny_registered" not in SEGMENTATION_MODELS
    assert SEGMENTATION_MODELS == ("fanet", "mobile_unet", "erfnet", "enet")


def test_a_loss_registered_by_decorator_is_parsed_and_built_by_name():
    try:
        @register_loss("mean_gap")
        class MeanGap(DistillLoss):
            reads = Reads("logits")

            def distill(self, student, teacher, labels):
                return (student[0].mean() - teacher[0].mean()).abs()

        assert LOSSES["mean_gap"] is MeanGap
        (spec,) = parse_losses("mean_gap:2")
        loss = spec.build()
        assert isinstance(loss, MeanGap) and loss.weight == 2.0 and get_loss("mean_gap").weight == 1.0
        assert float(loss([torch.ones(1, 2, 4, 4)], [torch.zeros(1, 2, 4, 4)])) == 2.0
    finally:
        LOSSES.pop("mean_gap", None)
    # The built-in losses register themselves the same way, in their own modules.
    assert LOSSES["kd"] is KDLoss
    with pytest.raises(TypeError, match="DistillLoss subclass"):
        register_loss("not_a_loss")(torch.nn.Module)
