"""The one conversion rule: stored pixels -> network input, identical in FolderDataset and in segment."""
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from cocofast.data import DatasetError, FolderDataset, Normalisation, image_stats, network_input
from cocofast.data.slides import ArrayReader, DownscaledReader, open_reader
from cocofast.segment import blended_bands, checkpoint_normalisation


def test_parse_and_text_round_trip_and_bad_specs():
    for text in ("range", "range:0:4095", "percentile:1:99", "percentile:0.5:99.5",
                 "meanstd:0.5,0.4,0.3:0.2,0.2,0.25", "meanstd:0.5:0.25:0:4095"):
        assert Normalisation.parse(Normalisation.parse(text).text()) == Normalisation.parse(text)
    assert Normalisation.parse("percentile").percentiles == (1.0, 99.0)
    for bad in ("rang", "range:5:1", "range:0", "percentile:99:1", "meanstd:0.5", "meanstd:0.5:0", "range:a:b"):
        with pytest.raises(ValueError, match="normalisation"):
            Normalisation.parse(bad)


def test_the_rule_by_mode():
    u8 = np.array([[0, 51, 255]], np.uint8)
    assert np.allclose(network_input(u8, 1), [[[0, 0.2, 1]]])
    u16 = np.array([[0, 4095, 65535]], np.uint16)
    assert np.allclose(network_input(u16, 1), [[[0, 4095 / 65535, 1]]])
    assert np.allclose(network_input(u16, 1, Normalisation.parse("range:0:4095")), [[[0, 1, 1]]])  # clipped
    floats = np.array([[0.0, 0.25, 1.0]], np.float32)
    assert np.allclose(network_input(floats, 1), [[[0, 0.25, 1]]])
    assert np.allclose(network_input(floats * 255, 1, Normalisation.parse("range:0:255")), [[[0, 0.25, 1]]])
    rgb = np.stack([u8, u8 // 2, u8 // 4], -1)
    gray = network_input(rgb, 1)
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    assert np.allclose(gray, luma[None] / 255, atol=1e-6)
    assert network_input(u8, 3).shape == (3, 1, 3)
    std = network_input(rgb, 3, Normalisation.parse("meanstd:0.5:0.25"))
    assert np.allclose(std, (network_input(rgb, 3) - 0.5) / 0.25)
    ramp = np.arange(1000, dtype=np.uint16).reshape(20, 50)
    norm = Normalisation.parse("percentile:10:90")
    stats = image_stats(ArrayReader(ramp), norm, 1)
    assert np.allclose(stats[:, 0], np.percentile(ramp, [10, 90]))
    out = network_input(ramp, 1, norm, stats=stats)
    assert out.min() == 0 and out.max() == 1 and np.isclose(out[0, 10, 0], (500 - stats[0, 0]) / np.ptp(stats[:, 0]))
    with pytest.raises(ValueError, match="needs the image's statistics"):
        network_input(ramp, 1, norm)
    with pytest.raises(ValueError, match="5-channel image into the 2 channels"):
        network_input(np.zeros((4, 4, 5), np.uint8), 2)


def segment_input(path, in_channels, normalise):
    """What segment feeds the network for an image smaller than one window: the first batch."""
    reader = open_reader(path)
    norm = Normalisation.parse(normalise)
    seen = []

    def record(x):
        seen.append(x.clone())
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    stats = image_stats(reader, norm, in_channels)
    for _ in blended_bands(record, reader, (reader.height, reader.width), 0.0, 1, 2, in_channels=in_channels,
                           normalise=norm, stats=stats):
        pass
    return seen[0][0]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("normalise, in_channels", [("range", 1), ("percentile:2:98", 1), ("range:0:4095", 1),
                                                    ("meanstd:0.3:0.2:0:4095", 3)])
def test_16_bit_images_reach_training_and_segment_identically(tmp_path, suffix, normalise, in_channels):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4096, (40, 56), dtype=np.uint16)  # a 12-bit camera in a 16-bit file
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    path = tmp_path / "images" / f"a{suffix}"
    Image.fromarray(image).save(path) if suffix == ".png" else tifffile.imwrite(path, image, tile=(16, 16))
    Image.fromarray((image > 2048).astype(np.uint8)).save(tmp_path / "masks" / "a.png")
    ds = FolderDataset(tmp_path, in_channels=in_channels, normalise=normalise)
    trained_on = ds[0][0]
    segmented = segment_input(path, in_channels, normalise)
    assert trained_on.shape == segmented.shape == (in_channels, 40, 56)
    assert torch.allclose(trained_on, segmented, atol=1e-6)
    if normalise == "range":  # the old segment path clipped 16-bit PNGs to 8 bits: a white or black image
        assert torch.allclose(segmented[0], torch.from_numpy(image / 65535).float(), atol=1e-6)
    else:
        assert segmented.std() > 0.1  # not flattened into a sliver of [0, 1]


def test_percentile_bounds_belong_to_the_whole_image_not_the_patch(tmp_path):
    image = np.zeros((64, 64), np.uint16)
    image[:, 32:] = 30000  # the left patch alone is flat; its image is not
    image[:, :32] = np.arange(32, dtype=np.uint16) * 10
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", image)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "masks" / "a.png")
    ds = FolderDataset(tmp_path, in_channels=1, normalise="percentile:0:100", patch_size=32)
    left = ds[0][0]
    assert torch.allclose(left[0], torch.from_numpy(image[:32, :32] / 30000).float(), atol=1e-6)


def test_float_tiff_stored_as_0_255_is_refused_or_declared(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (32, 32, 3)).astype(np.float32)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "images" / "f.tif", image, photometric="rgb")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "masks" / "f.png")
    with pytest.raises(DatasetError, match=r"f.tif: float32 values span 0..255, outside the declared range 0..1"):
        FolderDataset(tmp_path)
    ds = FolderDataset(tmp_path, normalise="range:0:255")
    assert torch.allclose(ds[0][0], torch.from_numpy(image.transpose(2, 0, 1) / 255).float(), atol=1e-6)
    with pytest.warns(UserWarning, match="outside the declared range"):
        for _ in blended_bands(lambda x: torch.zeros(x.shape[0], 2, *x.shape[2:]), open_reader(
                tmp_path / "images" / "f.tif"), 32, 0.0, 1, 2):
            pass


def test_downscaled_reads_keep_stored_units_so_declared_ranges_still_apply():
    image = np.full((8, 8), 4095, np.uint16)
    small = DownscaledReader(ArrayReader(image), 2)
    band = small.read(0, 0, 4, 4)
    assert np.allclose(network_input(band, 1, Normalisation.parse("range:0:4095"), small.stored_dtype), 1)


def test_checkpoint_says_which_normalisation_it_was_trained_with():
    assert checkpoint_normalisation({"models": {}, "config": {"normalise": "percentile:1:99"}}) == "percentile:1:99"
    assert checkpoint_normalisation({"models": {}, "config": {"seed": 0}}) == "range"
    assert checkpoint_normalisation({"models": {}}) == "range"
