"""The built-in synthetic set and the validated folder data set."""
import numpy as np
import pytest
import torch
from PIL import Image

from cocofast.data import FolderDataset, SyntheticPathology, joint_flip
from cocofast.data.folder import tile_origins


def test_synthetic_is_deterministic_and_well_formed():
    a, b = SyntheticPathology(6, size=64, seed=3), SyntheticPathology(6, size=64, seed=3)
    for i in range(6):
        (xa, ma), (xb, mb) = a[i], b[i]
        assert torch.equal(xa, xb) and torch.equal(ma, mb)
        assert xa.shape == (3, 64, 64) and xa.dtype == torch.float32 and 0 <= xa.min() and xa.max() <= 1
        assert ma.shape == (64, 64) and ma.dtype == torch.int64 and set(ma.unique().tolist()) <= {0, 1}
    assert not torch.equal(a[0][0], SyntheticPathology(6, size=64, seed=4)[0][0])
    gray = SyntheticPathology(2, size=64, in_channels=1)[1][0]
    assert gray.shape == (1, 64, 64)


def test_synthetic_cancer_differs_from_normal_tissue():
    # Cancer regions carry more hematoxylin (darker, crowded nuclei): lower mean intensity.
    ds = SyntheticPathology(12, size=128, seed=0)
    cancer, normal = [], []
    for x, m in (ds[i] for i in range(12)):
        gray = x.mean(0)
        if (m == 1).any():
            cancer.append(gray[m == 1].mean())
        normal.append(gray[m == 0].mean())
    assert cancer and np.mean(cancer) < np.mean(normal) - 0.02


def test_joint_flips_move_image_and_mask_together():
    image = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    mask = image[0].astype(np.int64)
    for seed in range(8):
        im, mk = joint_flip(image, mask, np.random.default_rng(seed))
        assert np.array_equal(im[0].astype(np.int64), mk)
    flipped = SyntheticPathology(4, size=32, seed=1, flips=True)
    plain = SyntheticPathology(4, size=32, seed=1)
    for i in range(4):
        (xf, mf), (xp, mp) = flipped[i], plain[i]
        options = [(xp, mp), (xp.flip(-1), mp.flip(-1)), (xp.flip(-2), mp.flip(-2)), (xp.flip(-1, -2), mp.flip(-1, -2))]
        assert any(torch.equal(xf, a) and torch.equal(mf, b) for a, b in options)


def test_tile_origins_cover_the_image():
    assert tile_origins(2048, 1024, 1024) == [0, 1024]
    assert tile_origins(1000, 256, 256) == [0, 256, 512, 744]
    assert tile_origins(512, 256, 128) == [0, 128, 256]
    with pytest.raises(ValueError, match="larger than the image side"):
        tile_origins(100, 128, 128)


def _write(folder, name, array, mode=None):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(folder / name)


def test_folder_pairs_tiles_and_maps_mask_values(tmp_path):
    rng = np.random.default_rng(0)
    _write(tmp_path / "images", "a.png", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    _write(tmp_path / "masks", "a.png", mask)
    ds = FolderDataset(tmp_path, mask_values={0: 0, 255: 1}, patch_size=32)
    assert len(ds) == 4
    x, m = ds[1]  # top-right patch: all cancer
    assert x.shape == (3, 32, 32) and m.unique().tolist() == [1]
    assert FolderDataset(tmp_path, mask_values={0: 0, 255: 1}, in_channels=1, resize=16)[0][0].shape == (1, 16, 16)


def test_folder_reports_every_problem_by_file(tmp_path):
    img = np.zeros((32, 32, 3), np.uint8)
    _write(tmp_path / "images", "ok.png", img)
    _write(tmp_path / "masks", "ok.png", np.zeros((32, 32), np.uint8))
    _write(tmp_path / "images", "size.png", img)
    _write(tmp_path / "masks", "size.png", np.zeros((16, 32), np.uint8))
    _write(tmp_path / "images", "values.png", img)
    _write(tmp_path / "masks", "values.png", np.full((32, 32), 7, np.uint8))
    _write(tmp_path / "images", "broken.png", img)
    data = (tmp_path / "images" / "broken.png").read_bytes()
    (tmp_path / "images" / "broken.png").write_bytes(data[: len(data) // 2])
    _write(tmp_path / "masks", "broken.png", np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError) as err:
        FolderDataset(tmp_path, mask_values={0: 0, 255: 1})
    text = str(err.value)
    assert "size.png" in text and "16" in text
    assert "values.png" in text and "[7]" in text
    assert "broken.png" in text and "truncated" in text
    assert "ok.png" not in text
    _write(tmp_path / "images", "lonely.png", img)
    with pytest.raises(ValueError, match="lonely.png"):
        FolderDataset(tmp_path)


def test_folder_empty_and_missing(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        FolderDataset(tmp_path)
    with pytest.raises(ValueError, match="no such folder"):
        FolderDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="missing"):
        FolderDataset(pairs=[(tmp_path / "x.png", tmp_path / "y.png")])
