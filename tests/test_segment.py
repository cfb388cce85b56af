"""Sliding-window inference: equal to whole-image inference where windows cannot matter, bounded memory."""
import numpy as np
import pytest
import torch
from PIL import Image

from cocofast.segment import gaussian_weight, load_model, main, sliding_window_segment


def pointwise_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1)).eval()


@pytest.mark.parametrize("shape,window,overlap", [((70, 45), 32, 0.25), ((64, 64), 64, 0.0), ((20, 90), 32, 0.5)])
def test_sliding_window_equals_whole_image_for_a_pointwise_network(shape, window, overlap):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
    model = pointwise_model()
    got = sliding_window_segment(lambda x: model(x), image, window=window, overlap=overlap, batch_size=3,
                                 num_classes=3)
    with torch.no_grad():
        whole = model(torch.from_numpy(image.transpose(2, 0, 1)[None] / 255.0).float()).argmax(1)[0].numpy()
    assert got.shape == shape and np.array_equal(got, whole)


def test_gaussian_weight_peaks_in_the_middle():
    w = gaussian_weight(33)
    assert w[16, 16] == 1.0 and w.min() > 0 and w[0, 0] < w[8, 8] < w[16, 16]


def test_cli_from_a_checkpoint(tmp_path):
    from cocofast.models import create_model

    model = create_model("enet", in_channels=3, num_classes=2, width=0.25)
    torch.save({"models": {"student": {"model_name": "enet", "model_kwargs": dict(model.model_kwargs),
                                       "state_dict": model.state_dict()}}}, tmp_path / "ckpt.pt")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 80, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    main([str(tmp_path / "x.png"), "--checkpoint", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "m.png"),
          "--overlay", str(tmp_path / "o.png"), "--window", "64"])
    mask = np.asarray(Image.open(tmp_path / "m.png"))
    assert mask.shape == (100, 80) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (100, 80, 3)
    with pytest.raises(ValueError, match="roles present: \\['student'\\]"):
        load_model(tmp_path / "ckpt.pt", role="teacher")
