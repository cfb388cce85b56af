"""Sliding-window inference: exactness, blending against a float64 reference, readers, writers, the CLI."""
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from cocofast.data.slides import ArrayReader, DownscaledReader, PILReader, TiffReader, open_reader
from cocofast.data.writers import PngRowWriter, TiffRowWriter
import cocofast.segment
from cocofast.overlay import OUTLINE_COLOURS, outline_labels
from cocofast.segment import (DEFAULT_WINDOW, blended_bands, gaussian_importance, main, sliding_window_scores,
                              sliding_window_segment, trained_input)
from helpers import save_enet_checkpoint


def pointwise_net(in_channels=3, classes=3):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, classes, 1))


@pytest.mark.parametrize("shape, window, overlap", [((100, 130), 32, 0.25), ((64, 64), 64, 0.5),
                                                    ((50, 90), 128, 0.25), ((97, 41), (24, 16), 0.6),
                                                    ((40, 40), 17, 0.0)])
def test_sliding_window_equals_whole_image_for_a_pointwise_network(shape, window, overlap):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    net = pointwise_net()
    with torch.no_grad():
        whole = net(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)[0]
    raw = sliding_window_scores(net, image, window, overlap, batch_size=3, num_classes=3, activation=None)
    assert raw.shape == whole.shape and torch.allclose(raw, whole, atol=1e-5)
    probs = sliding_window_scores(net, image, window, overlap, batch_size=2, num_classes=3)
    assert torch.allclose(probs, whole.softmax(0), atol=1e-5)
    labels = sliding_window_segment(net, image, window, overlap, batch_size=4, num_classes=3)
    assert labels.dtype == np.uint8 and np.array_equal(labels, whole.argmax(0).numpy())


def reference_blend(net, image: np.ndarray, window: int, overlap: float) -> np.ndarray:
    """Whole-image float64 accumulation of every window, MONAI's window placement and Gaussian."""
    h, w, _ = image.shape
    stride = max(1, int(window * (1 - overlap)))
    starts = lambda n: sorted({min(i * stride, n - window) for i in range(-(-(n - window) // stride) + 1)})  # noqa: E731
    x = np.arange(window) - (window - 1) / 2
    g1 = np.exp(-(x**2) / (2 * (window / 8) ** 2))
    g = np.outer(g1, g1)
    g = np.maximum(g, max(g.min(), 1e-3))
    acc, norm = np.zeros((2, h, w)), np.zeros((h, w))
    for top in starts(h):
        for left in starts(w):
            crop = torch.from_numpy(image[top:top + window, left:left + window]).permute(2, 0, 1)[None].float() / 255
            with torch.no_grad():
                out = net(crop)[0].double().numpy()
            acc[:, top:top + window, left:left + window] += out * g
            norm[top:top + window, left:left + window] += g
    return acc / norm


def test_blending_of_a_network_with_context_matches_a_float64_reference():
    # 3x3 convolutions see zero padding at window borders, so windows disagree and the blend matters.
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Conv2d(4, 2, 3, padding=1))
    image = np.random.default_rng(1).integers(0, 256, (90, 75, 3), dtype=np.uint8)
    got = sliding_window_scores(net, image, 32, 0.4, batch_size=5, num_classes=2, activation=None)
    ref = reference_blend(net, image, 32, 0.4)
    assert np.abs(got.numpy() - ref).max() < 1e-5
    whole = net(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)[0].detach().numpy()
    assert np.abs(got.numpy() - whole).max() > 1e-3  # the check above is not vacuous


def test_matches_monai_gaussian_sliding_window_when_installed():
    monai = pytest.importorskip("monai")
    from monai.inferers import sliding_window_inference

    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Conv2d(4, 2, 3, padding=1))
    image = np.random.default_rng(2).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        ref = sliding_window_inference(x, (32, 32), 4, net, overlap=0.25, mode="gaussian", sigma_scale=0.125)[0]
    got = sliding_window_scores(net, image, 32, 0.25, batch_size=4, num_classes=2, activation=None)
    assert torch.allclose(got, ref, atol=1e-5), monai.__version__


def test_gaussian_weight_shape_peak_and_floor():
    g = gaussian_importance((64, 48))
    assert g.shape == (64, 48) and torch.allclose(g, g.flip(0)) and torch.allclose(g, g.flip(1))
    assert g.max().item() == pytest.approx(np.exp(-(0.5**2) / (2 * 8**2)) * np.exp(-(0.5**2) / (2 * 6**2)))
    assert g.min().item() == pytest.approx(1e-3)  # corners sit ~8 sigma out: clamped like MONAI


class CountingReader(ArrayReader):
    def __init__(self, array):
        super().__init__(array)
        self.max_rows = 0

    def read(self, top, left, height, width):
        self.max_rows = max(self.max_rows, height)
        return super().read(top, left, height, width)


def test_memory_is_one_band_of_windows():
    reader = CountingReader(np.zeros((1000, 60, 3), np.uint8))
    tops, rows = [], 0
    for top, scores in blended_bands(pointwise_net(classes=2), reader, 64, 0.25, 4, num_classes=2):
        assert scores.shape[1] <= 64 and top == rows  # bands arrive in order, each at most a window high
        tops.append(top)
        rows += scores.shape[1]
    assert rows == 1000 and len(tops) > 10 and reader.max_rows <= 64


# --- readers and writers ------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"rowsperstrip": 7}, {"tile": (32, 16), "compression": "zlib"},
                                     {"rowsperstrip": 5, "compression": "zlib"},
                                     {"planarconfig": "separate", "tile": (16, 16)}])
def test_tiff_reader_reads_any_region(tmp_path, options):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)
    planar = options.get("planarconfig") == "separate"
    tifffile.imwrite(tmp_path / "a.tif", image.transpose(2, 0, 1) if planar else image, photometric="rgb", **options)
    reader = TiffReader(tmp_path / "a.tif", cache_bytes=1)
    assert (reader.height, reader.width, reader.channels) == (70, 50, 3)
    for top, left, h, w in [(0, 0, 70, 50), (3, 5, 17, 29), (60, 40, 30, 30), (-5, -5, 10, 10), (69, 0, 1, 50)]:
        expected = image[max(top, 0):top + h, max(left, 0):left + w]
        assert np.array_equal(reader.read(top, left, h, w), expected)
    reader.close()


def test_readers_for_png_levels_downscale_and_missing_codecs(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "g.png")
    reader = open_reader(tmp_path / "g.png")
    assert isinstance(reader, PILReader) and reader.channels == 1
    assert np.array_equal(reader.read(2, 3, 4, 5)[..., 0], image[2:6, 3:8])
    small = DownscaledReader(ArrayReader(image), 4)
    assert (small.height, small.width) == (5, 8)
    assert np.allclose(small.read(1, 2, 1, 1)[0, 0, 0], image[4:8, 8:12].mean())  # block means in stored units
    assert small.stored_dtype == np.uint8
    assert small.read(0, 7, 5, 1).shape == (5, 1, 1)  # the last column block is edge-padded 2 -> 4
    with pytest.raises(FileNotFoundError, match="nothere.tif"):
        open_reader(tmp_path / "nothere.tif")
    with pytest.raises(ValueError, match="level 1 requested"):
        tifffile.imwrite(tmp_path / "one.tif", image)
        TiffReader(tmp_path / "one.tif", level=1)
    # A tile that fails to decode (here: uncompressed data labelled LZW) names the file, the tile and the codec;
    # 'auto' then tries OpenSlide, whose failure at read time names the file too.
    tifffile.imwrite(tmp_path / "lzw.tif", np.zeros((32, 32, 3), np.uint8), tile=(16, 16), photometric="rgb")
    with tifffile.TiffFile(tmp_path / "lzw.tif", mode="r+b") as tif:
        tif.pages[0].tags["Compression"].overwrite(5)
    with pytest.raises(ValueError, match=r"lzw.tif: cannot decode tile 0 \(LZW data"):
        TiffReader(tmp_path / "lzw.tif")
    try:
        fallback = open_reader(tmp_path / "lzw.tif")
    except ValueError as err:
        assert "lzw.tif: no reader could open it" in str(err)
    else:
        with pytest.raises(ValueError, match=r"lzw.tif: OpenSlide cannot read"):
            fallback.read(0, 0, 32, 32)


@pytest.mark.parametrize("suffix, channels", [(".png", 1), (".png", 3), (".tif", 1), (".tif", 3)])
def test_row_writers_round_trip(tmp_path, suffix, channels):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 70, channels), dtype=np.uint8)
    path = tmp_path / f"out{suffix}"
    writer = (PngRowWriter if suffix == ".png" else TiffRowWriter)(path, 300, 70, channels)
    for top in range(0, 300, 37):
        writer.write(image[top:top + 37])
    writer.close()
    back = np.asarray(Image.open(path)) if suffix == ".png" else tifffile.imread(path)
    assert np.array_equal(back.reshape(image.shape), image)


# --- command line -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_enet_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", roles=("student", "teacher"))


def test_cli_writes_mask_and_overlay_equal_to_the_library_call(tmp_path, checkpoint, capsys):
    path, model = checkpoint
    image = np.random.default_rng(3).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "slide.png")
    tifffile.imwrite(tmp_path / "slide.tif", image, tile=(32, 32), compression="zlib", photometric="rgb")
    args = ["--checkpoint", str(path), "--window", "64", "--overlap", "0.5", "--quiet"]
    assert main([str(tmp_path / "slide.png"), "--out", str(tmp_path / "mask.png"),
                 "--overlay", str(tmp_path / "overlay.png"), "--outline-width", "1", *args]) == 0
    assert "class 0" in capsys.readouterr().out
    expected = sliding_window_segment(lambda x: model(x).logits, image, 64, 0.5, 4, num_classes=2)
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    assert mask.shape == (80, 100) and np.array_equal(mask, expected * 255)
    overlay = np.asarray(Image.open(tmp_path / "overlay.png"))
    ring = outline_labels(expected, thickness=1)
    assert overlay.shape == (80, 100, 3) and ring.any()
    assert np.array_equal(overlay[ring == 0], image[ring == 0])  # outlines only: regions are not tinted
    assert np.all(overlay[ring == 1] == OUTLINE_COLOURS[1])
    assert main([str(tmp_path / "slide.tif"), "--out", str(tmp_path / "mask.tif"), "--mask-values", "index",
                 "--role", "teacher", *args]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "mask.tif"), expected)
    assert main([str(tmp_path / "slide.png"), "--out", str(tmp_path / "half.png"), "--downscale", "2", *args]) == 0
    assert np.asarray(Image.open(tmp_path / "half.png")).shape == (80, 100)


def test_cli_errors_name_what_is_wrong(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    out = ["--out", str(tmp_path / "m.png"), "--quiet"]
    assert main([str(tmp_path / "a.png"), "--checkpoint", str(path), "--role", "critic", *out]) == 2
    assert "'critic'" in (err := capsys.readouterr().err) and "student, teacher" in err
    assert main([str(tmp_path / "a.png"), "--checkpoint", str(path), "--window", "100", *out]) == 2
    assert "multiple of" in capsys.readouterr().err
    assert main([str(tmp_path / "b.png"), "--checkpoint", str(path), *out]) == 2
    assert "b.png" in capsys.readouterr().err
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    assert main([str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "plain.pt"), *out]) == 2
    assert "no 'models'" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_cli_refuses_to_overwrite_its_input(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    image = np.random.default_rng(5).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "s.png")
    before = (tmp_path / "s.png").read_bytes()
    for extra in (["--out", str(tmp_path / "s.png")], ["--out", str(tmp_path / "sub" / ".." / "s.png")],
                  ["--out", str(tmp_path / "m.png"), "--overlay", str(tmp_path / "s.png")],
                  ["--out", str(tmp_path / "m.png"), "--overlay", str(tmp_path / "m.png")]):
        assert main([str(tmp_path / "s.png"), "--checkpoint", str(path), "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert "refusing to overwrite" in err or "the same file" in err
    assert (tmp_path / "s.png").read_bytes() == before and not (tmp_path / "m.png").exists()


def test_cli_bad_arguments_and_inputs_exit_2_naming_the_culprit(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "fake.tif").write_text("not a TIFF at all")
    tifffile.imwrite(tmp_path / "cut.tif", np.zeros((128, 128, 3), np.uint8), tile=(32, 32), compression="zlib",
                     photometric="rgb")
    data = (tmp_path / "cut.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[:-40])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases = [(["--window", "0"], "--window 0: must be a positive"),
             (["--overlap", "1"], "--overlap 1.0: must be a fraction in [0, 1)"),
             (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
             (["--downscale", "0"], "--downscale 0: must be a positive integer"),
             (["--downscale", "-2"], "--downscale -2"),
             (["--role", "critic"], "no network for role 'critic'"),
             (["--level", "3"], "levels exist only in TIFF/SVS pyramids"),
             (["--mpp", "1"], "does not record its pixel size"),
             (["--mpp", "1", "--level", "1"], "give either --mpp or --level/--downscale"),
             (["--normalise", "rangy"], "--normalise: normalisation 'rangy'"),
             (["--out", str(locked / "m.png")], "cannot write there"),
             (["--out", str(tmp_path / "m.jpg")], "expected a .png, .tif or .tiff")]
    import os

    for extra, message in cases:
        if "cannot write" in message and os.geteuid() == 0:
            continue  # root writes anywhere
        args = [str(tmp_path / "a.png"), "--checkpoint", str(path), "--quiet", "--out", str(tmp_path / "m.png")]
        assert main(args + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    for name, message in (("fake.tif", "fake.tif: no reader could open it; TiffReader: not a readable TIFF"),
                          ("cut.tif", "cut.tif: no reader could open it; TiffReader: truncated TIFF")):
        assert main([str(tmp_path / name), "--checkpoint", str(path), "--quiet", "--out", str(tmp_path / "m.png")]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "file.png").write_text("a file where a folder should be")
    assert main([str(tmp_path / "a.png"), "--checkpoint", str(path), "--quiet",
                 "--out", str(tmp_path / "file.png" / "m.png")]) == 2
    assert "file.png is not a writable folder" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()
    locked.chmod(0o700)


# --- settings from the checkpoint's training config ----------------------------------------------------------
def save_checkpoint(path, model_name, kwargs, state_dict, config=None):
    from cocofast.io import atomic_save

    entry = {"model_name": model_name, "model_kwargs": kwargs, "state_dict": state_dict}
    atomic_save({"models": {"student": entry}, **({"config": config} if config is not None else {})}, path)
    return path


@pytest.fixture
def window_spy(monkeypatch):
    """The window (and input channels) every blended_bands call of segment_image was given."""
    calls = []

    def spy(predict_fn, reader, window, *args, **kwargs):
        calls.append({"window": window, "in_channels": kwargs.get("in_channels"), "height": reader.height})
        return blended_bands(predict_fn, reader, window, *args, **kwargs)

    monkeypatch.setattr(cocofast.segment, "blended_bands", spy)
    return calls


def test_window_defaults_to_the_training_image_size(tmp_path, checkpoint, capsys, window_spy):
    _, model = checkpoint
    ckpt = save_checkpoint(tmp_path / "c.pt", "enet", {"in_channels": 3, "num_classes": 2, "width": 0.25},
                           model.state_dict(), {"image_size": 64, "patch_size": 0, "normalise": "range"})
    image = np.random.default_rng(7).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "s.png")
    assert main([str(tmp_path / "s.png"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.png"),
                 "--overlap", "0.5", "--quiet"]) == 0
    assert "(window 64, downscale 1;" in capsys.readouterr().out
    assert [c["window"] for c in window_spy] == [64]
    expected = sliding_window_segment(lambda x: model(x).logits, image, 64, 0.5, 4, num_classes=2)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "m.png")), expected * 255)
    # an explicit flag wins over the config
    assert main([str(tmp_path / "s.png"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.png"),
                 "--window", "32", "--quiet"]) == 0
    assert "(window 32," in capsys.readouterr().out and window_spy[-1]["window"] == 32
    # no config at all: today's default
    bare = save_checkpoint(tmp_path / "bare.pt", "enet", {"in_channels": 3, "num_classes": 2, "width": 0.25},
                           model.state_dict())
    assert main([str(tmp_path / "s.png"), "--checkpoint", str(bare), "--out", str(tmp_path / "m.png"),
                 "--quiet"]) == 0
    assert f"(window {DEFAULT_WINDOW}, downscale 1;" in capsys.readouterr().out


def test_patches_resized_for_training_give_the_downscale(tmp_path, checkpoint, capsys, window_spy):
    _, model = checkpoint
    config = {"image_size": 64, "patch_size": 128, "in_channels": 3, "num_classes": 2}
    ckpt = save_checkpoint(tmp_path / "c.pt", "enet", {"in_channels": 3, "num_classes": 2, "width": 0.25},
                           model.state_dict(), config)
    trained = trained_input(cocofast.segment.read_checkpoint(ckpt), {"model_kwargs": {}})
    assert (trained.window, trained.downscale, trained.in_channels, trained.num_classes) == (64, 2, 3, 2)
    image = np.random.default_rng(8).integers(0, 256, (96, 130, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "s.png")
    assert main([str(tmp_path / "s.png"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.png"),
                 "--quiet"]) == 0
    assert "130x96" in (out := capsys.readouterr().out) and "(window 64, downscale 2;" in out
    assert window_spy[-1] == {"window": 64, "in_channels": 3, "height": 48}  # the network saw half the rows
    mask = np.asarray(Image.open(tmp_path / "m.png"))
    small = DownscaledReader(ArrayReader(image), 2)
    expected = sliding_window_segment(lambda x: model(x).logits, small, 64, 0.25, 4, num_classes=2)
    assert mask.shape == (96, 130)
    assert np.array_equal(mask, (expected.repeat(2, 0).repeat(2, 1)[:96, :130]) * 255)
    assert main([str(tmp_path / "s.png"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.png"),
                 "--downscale", "1", "--quiet"]) == 0  # explicit flags win
    assert "downscale 1;" in capsys.readouterr().out and window_spy[-1]["height"] == 96


def test_trained_input_falls_back_to_model_kwargs_then_model_attributes(tmp_path):
    net = torch.nn.Conv2d(3, 2, 1)
    net.num_classes = 4
    ckpt = {"models": {}, "config": {"image_size": 96, "patch_size": 192, "normalise": "percentile:1:99"}}
    got = trained_input(ckpt, {"model_kwargs": {"in_channels": 1}}, net)
    assert got == cocofast.segment.TrainedInput(96, 2, 1, 4, "percentile:1:99")
    assert trained_input({"models": {}}, {"model_kwargs": {}}) == cocofast.segment.TrainedInput(
        DEFAULT_WINDOW, 1, 3, 2, "range")
    with pytest.raises(ValueError, match=r"c.pt: training config 'image_size' is '64'"):
        trained_input({"models": {}, "config": {"image_size": "64"}}, {"model_kwargs": {}}, path="c.pt")
    with pytest.warns(UserWarning, match="not an integer ratio; segmenting at downscale 1"):
        assert trained_input({"models": {}, "config": {"image_size": 64, "patch_size": 96}},
                             {"model_kwargs": {}}).downscale == 1


def test_classes_of_an_import_path_network_come_from_the_config(tmp_path, capsys, window_spy):
    # torch.nn:Conv2d takes out_channels, not num_classes: only the training config says there are 3 classes.
    torch.manual_seed(4)
    kwargs = {"in_channels": 3, "out_channels": 3, "kernel_size": 1}
    from cocofast.models import create_model

    net = create_model("torch.nn:Conv2d", **kwargs).eval()
    ckpt = save_checkpoint(tmp_path / "c.pt", "torch.nn:Conv2d", kwargs, net.state_dict(),
                           {"image_size": 32, "num_classes": 3, "in_channels": 3})
    image = np.random.default_rng(9).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "s.png")
    assert main([str(tmp_path / "s.png"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.png"),
                 "--mask-values", "index", "--quiet", "--trust-model-code=torch.nn:Conv2d"]) == 0
    assert "class 2:" in capsys.readouterr().out and window_spy[-1]["window"] == 32
    with torch.no_grad():
        whole = net(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255).logits[0].argmax(0).numpy()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "m.png")), whole)  # pointwise: windows change nothing
