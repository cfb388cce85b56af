"""Slides back out: the training resolution travels in the checkpoint, and segment/predict refuse ambiguous
scales and say when colour is dropped."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cocofast import predict, segment
from cocofast.io import atomic_save
from cocofast.models import create_model
from test_slides import sample_svs


def checkpoint_with(path: Path, in_channels: int = 3, **config) -> Path:
    """A width-0.25 ENet under 'student', with a training config holding `config`."""
    torch.manual_seed(0)
    kwargs = {"in_channels": in_channels, "num_classes": 2, "width": 0.25}
    model = create_model("enet", **kwargs).eval()
    entry = {"model_name": "enet", "model_kwargs": kwargs, "state_dict": model.state_dict()}
    atomic_save({"models": {"student": entry}, "config": {"image_size": 64, "in_channels": in_channels,
                                                          "num_classes": 2, **config}}, path)
    return path


def test_level_with_mpp_is_refused_even_level_0(tmp_path, capsys):
    ckpt = checkpoint_with(tmp_path / "m.pt")
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    for flags in (["--level", "0", "--mpp", "2"], ["--mpp", "2", "--level", "1"], ["--downscale", "1", "--mpp", "2"]):
        assert segment.main([str(image), "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.png"), *flags]) == 2
        assert "give either --mpp or --level/--downscale" in capsys.readouterr().err
        assert predict.main([str(image), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), *flags]) == 2
        assert "give either --mpp or --level/--downscale" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_the_training_mpp_is_the_default_scale(tmp_path, capsys):
    ckpt = checkpoint_with(tmp_path / "m.pt", slide_mpp=2.0)
    out = tmp_path / "mask.png"
    assert segment.main([str(sample_svs()), "--checkpoint", str(ckpt), "--out", str(out), "--quiet"]) == 0
    assert "downscale 4" in capsys.readouterr().out  # 0.499 µm per pixel -> 2.0: block means of 4 x 4
    assert Image.open(out).size == (2220, 2967)
    # an explicit --downscale wins over the checkpoint's resolution
    assert segment.main([str(sample_svs()), "--checkpoint", str(ckpt), "--out", str(out), "--downscale", "8",
                         "--quiet"]) == 0
    assert "downscale 8" in capsys.readouterr().out
    # an image without a pixel size: the message names the flags that choose the scale
    png = tmp_path / "plain.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(png)
    assert segment.main([str(png), "--checkpoint", str(ckpt), "--out", str(tmp_path / "p.png"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "does not record its pixel size" in err and "2.0 µm per pixel (the resolution the network was " \
                                                      "trained at" in err
    assert "--downscale" in err and "--mpp" in err
    assert segment.main([str(png), "--checkpoint", str(ckpt), "--out", str(tmp_path / "p.png"), "--downscale", "1",
                         "--quiet"]) == 0


def test_an_rgb_image_for_a_gray_network_is_said_aloud(tmp_path):
    ckpt = checkpoint_with(tmp_path / "gray.pt", in_channels=1)
    image = tmp_path / "rgb.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    with pytest.warns(UserWarning, match=r"rgb.png: an RGB image turned to gray .* takes 1 channel"):
        assert segment.main([str(image), "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.png"),
                             "--quiet"]) == 0
