"""Data: window arithmetic, joint transforms, the synthetic set, and folder validation by file."""
import numpy as np
import pytest
import tifffile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cocofast.data import (DatasetError, FolderDataset, SyntheticPathology, axis_starts, joint_flip, patch_grid,
                           random_joint_flip, resize_pair)
from cocofast.data.tiling import resolve_stride, stride_from_fraction


# --- tiling ---------------------------------------------------------------------------------------------
def test_paper_tiling_and_explicit_cases():
    assert patch_grid(2048, 2048, 1024) == [(0, 0), (0, 1024), (1024, 0), (1024, 1024)]
    assert axis_starts(1000, 256, 256) == [0, 256, 512, 744]  # last one flush with the border
    assert axis_starts(512, 256, 128) == [0, 128, 256]
    assert axis_starts(100, 128, 64) == [0]  # shorter than a window: one (padded) window
    assert axis_starts(256, 256, 1) == [0]
    assert patch_grid(300, 200, (100, 50), (100, 50)) == [(t, l) for t in (0, 100, 200) for l in (0, 50, 100, 150)]
    assert resolve_stride(1024) == 1024 and resolve_stride(1024, overlap=256) == 768
    assert resolve_stride(1024, stride=512) == 512
    assert stride_from_fraction(512, 0.25) == 384 and stride_from_fraction(3, 0.9) == 1
    for bad in (dict(stride=0), dict(overlap=1024), dict(overlap=-1), dict(stride=4, overlap=4)):
        with pytest.raises(ValueError):
            resolve_stride(1024, **bad)
    with pytest.raises(ValueError):
        stride_from_fraction(512, 1.0)


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 400), window=st.integers(1, 120), stride=st.integers(1, 130))
def test_axis_starts_cover_every_pixel_without_leaving_the_image(length, window, stride):
    stride = min(stride, window)
    starts = axis_starts(length, window, stride)
    assert starts[0] == 0 and starts == sorted(set(starts))
    if length <= window:
        assert starts == [0]
        return
    assert starts[-1] == length - window
    assert all(0 <= b - a <= stride for a, b in zip(starts, starts[1:]))
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + window] = True
    assert covered.all()


# --- joint transforms -------------------------------------------------------------------------------------
def test_flips_move_image_and_mask_together():
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(rng.integers(0, 3, (7, 9)))
    image = torch.stack([mask.float() * 10, -mask.float()])  # channel values are a function of the mask
    seen = set()
    for seed in range(16):
        im, mk = random_joint_flip(image, mask, np.random.default_rng(seed))
        assert torch.equal(im[0], mk.float() * 10) and torch.equal(im[1], -mk.float())
        seen.add((torch.equal(mk, mask.flip(-1)), torch.equal(mk, mask.flip(-2)), torch.equal(mk, mask)))
    assert len(seen) >= 3  # several different flips were drawn
    im, mk = joint_flip(image, mask, horizontal=True, vertical=True)
    assert torch.equal(mk, mask.flip(-1).flip(-2)) and torch.equal(im, image.flip(-1).flip(-2))


def test_resize_keeps_mask_labels_and_image_range():
    mask = torch.zeros(8, 8, dtype=torch.int64)
    mask[:, 4:] = 1
    image = torch.rand(3, 8, 8)
    im, mk = resize_pair(image, mask, 4)
    assert im.shape == (3, 4, 4) and mk.shape == (4, 4) and mk.dtype == torch.int64
    assert mk[:, :2].eq(0).all() and mk[:, 2:].eq(1).all()
    assert 0 <= im.min() and im.max() <= 1


# --- synthetic set ----------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_well_formed():
    a, b = SyntheticPathology(4, size=96, seed=3), SyntheticPathology(4, size=96, seed=3)
    for i in range(4):
        (xa, ma), (xb, mb) = a[i], b[i]
        assert torch.equal(xa, xb) and torch.equal(ma, mb)
        assert xa.shape == (3, 96, 96) and xa.dtype == torch.float32 and 0 <= xa.min() and xa.max() <= 1
        assert ma.shape == (96, 96) and ma.dtype == torch.int64 and set(ma.unique().tolist()) <= {0, 1}
    assert torch.equal(a[-1][0], a[3][0])
    assert not torch.equal(a[0][0], SyntheticPathology(4, size=96, seed=4)[0][0])
    gray = SyntheticPathology(2, size=64, in_channels=1, seed=3)[1][0]
    rgb = SyntheticPathology(2, size=64, in_channels=3, seed=3)[1][0]
    assert gray.shape == (1, 64, 64)
    assert torch.allclose(gray[0], 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2], atol=1e-6)
    with pytest.raises(IndexError):
        a[4]
    for bad in (dict(length=0), dict(length=2, size=8), dict(length=2, in_channels=2)):
        with pytest.raises(ValueError):
            SyntheticPathology(**bad)


def test_synthetic_keeps_drawn_patches_and_hands_out_copies(monkeypatch):
    import cocofast.data.synthetic as synthetic

    fresh = [SyntheticPathology(3, size=64, seed=2, flips=True) for _ in range(2)]
    fresh[1]._drawn = None  # draws every time
    calls, original = [], synthetic.render_patch
    monkeypatch.setattr(synthetic, "render_patch", lambda *a: calls.append(1) or original(*a))
    kept = fresh[0]
    for epoch in range(3):  # augmentation redrawn each epoch from the kept patch, bit for bit as drawn afresh
        for ds in fresh:
            ds.set_epoch(epoch)
        for i in range(3):
            (x, m), (y, n) = kept[i], fresh[1][i]
            assert torch.equal(x, y) and torch.equal(m, n) and m.dtype == torch.int64
            x.fill_(7.0)  # a caller changing its sample in place leaves the kept one alone
            m.fill_(1)
    assert len(calls) == 3 + 3 * 3  # the kept set drew each patch once, the other every time
    monkeypatch.setattr(SyntheticPathology, "MEMO_BYTES", 3 * 64 * 64 * 13 - 1)  # one byte short of 3 patches
    assert SyntheticPathology(3, size=64)._drawn is None


def test_synthetic_labels_follow_the_tissue():
    # Cancer carries more nuclear material (hematoxylin absorbs red light most): on average the
    # fraction of dark, red-poor pixels must be higher inside the mask than outside it.
    ds = SyntheticPathology(24, size=128, seed=0)
    inside, outside, cancer_pixels = [], [], 0
    for x, m in (ds[i] for i in range(len(ds))):
        nuclear = x[0] < 0.45
        cancer_pixels += int(m.sum())
        if m.any():
            inside.append(nuclear[m == 1].float().mean().item())
        if (m == 0).any():
            outside.append(nuclear[m == 0].float().mean().item())
    assert 0.15 < cancer_pixels / (24 * 128 * 128) < 0.7  # both classes well represented
    assert np.mean(inside) > 1.25 * np.mean(outside)


def test_synthetic_flips_are_seeded_by_epoch_and_reach_loader_workers():
    plain = SyntheticPathology(6, size=32, seed=1)
    flipped = SyntheticPathology(6, size=32, seed=1, flips=True)
    for i in range(6):
        (xf, mf), (xp, mp) = flipped[i], plain[i]
        options = [(xp, mp), (xp.flip(-1), mp.flip(-1)), (xp.flip(-2), mp.flip(-2)),
                   (xp.flip(-1, -2), mp.flip(-1, -2))]
        assert any(torch.equal(xf, a) and torch.equal(mf, b) for a, b in options)
    loader = torch.utils.data.DataLoader(flipped, batch_size=6, num_workers=1, persistent_workers=True)
    epochs = []
    for epoch in range(3):
        flipped.set_epoch(epoch)
        epochs.append(next(iter(loader))[1])
        direct = torch.stack([flipped[i][1] for i in range(6)])
        assert torch.equal(epochs[-1], direct)  # the running worker saw set_epoch
    assert not all(torch.equal(epochs[0], e) for e in epochs[1:])


# --- folder data set --------------------------------------------------------------------------------------
def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_tiles_maps_and_reads_every_format(tmp_path):
    yy, xx = np.mgrid[0:64, 0:96]
    image = np.stack([yy * 2 + xx, 200 - xx * 2, yy * 3], -1).astype(np.uint8)  # smooth: JPEG keeps it close
    mask = np.zeros((64, 96), np.uint8)
    mask[:, 48:] = 255
    _png(tmp_path / "images" / "a.png", image)
    _png(tmp_path / "masks" / "a.png", mask)
    tifffile.imwrite(tmp_path / "images" / "b.tif", image)
    tifffile.imwrite(tmp_path / "masks" / "b.tiff", mask)
    Image.fromarray(image).save(tmp_path / "images" / "c.jpg", quality=95)
    _png(tmp_path / "masks" / "c.png", mask)
    ds = FolderDataset(tmp_path, mask_values={0: 0, 255: 1}, patch_size=32)
    assert len(ds) == 3 * 6  # 64x96 -> 2 x 3 patches per image
    x, m = ds[2]  # a.png, top row, third patch (columns 64..95): all cancer
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and m.unique().tolist() == [1]
    assert torch.allclose(x, torch.from_numpy(image[:32, 64:96].transpose(2, 0, 1) / 255.0).float())
    assert torch.equal(ds[6 + 2][0], x)  # the TIFF holds the same pixels
    assert (ds[12][0] - ds[0][0]).abs().mean() < 0.02  # JPEG: close, not equal
    overlapping = FolderDataset(tmp_path, mask_values={0: 0, 255: 1}, patch_size=32, overlap=16)
    assert len(overlapping) == 3 * (3 * 5)
    gray = FolderDataset(tmp_path, mask_values={0: 0, 255: 1}, in_channels=1, resize=16)
    assert gray[0][0].shape == (1, 16, 16) and gray[0][1].shape == (16, 16)
    # Class-index masks and a list file that names the pairs.
    _png(tmp_path / "idx" / "m.png", (mask // 255).astype(np.uint8))
    (tmp_path / "list.txt").write_text("# image mask\nimages/a.png, idx/m.png\n\n")
    listed = FolderDataset(list_file=tmp_path / "list.txt")
    assert len(listed) == 1 and torch.equal(listed[0][1], torch.from_numpy(mask // 255).long())
    assert len(FolderDataset(pairs=[(tmp_path / "images" / "a.png", tmp_path / "idx" / "m.png")])) == 1


def test_folder_flips_are_joint_and_deterministic(tmp_path):
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 2, (16, 16), dtype=np.uint8)
    _png(tmp_path / "images" / "a.png", np.repeat(mask[:, :, None] * 200, 3, axis=2).astype(np.uint8))
    _png(tmp_path / "masks" / "a.png", mask)
    ds = FolderDataset(tmp_path, flips=True, seed=5)
    draws = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        x, m = ds[0]
        assert torch.equal((x[0] > 0.5).long(), m)
        assert torch.equal(ds[0][1], m)  # same (seed, epoch, index) -> same draw
        draws.append(m)
    assert not all(torch.equal(draws[0], d) for d in draws[1:])


def test_folder_reports_every_problem_naming_each_file(tmp_path):
    img = np.zeros((32, 32, 3), np.uint8)
    ok_mask = np.zeros((32, 32), np.uint8)
    images, masks = tmp_path / "images", tmp_path / "masks"
    _png(images / "ok.png", img)
    _png(masks / "ok.png", ok_mask)
    _png(images / "size.png", img)
    _png(masks / "size.png", np.zeros((16, 32), np.uint8))
    _png(images / "values.png", img)
    _png(masks / "values.png", np.full((32, 32), 7, np.uint8))
    _png(images / "cut.png", img)
    data = (images / "cut.png").read_bytes()
    (images / "cut.png").write_bytes(data[: len(data) - 20])
    _png(masks / "cut.png", ok_mask)
    (images / "junk.png").write_text("not an image")
    _png(masks / "junk.png", ok_mask)
    _png(images / "lonely.png", img)
    tifffile.imwrite(images / "tiff.tif", np.zeros((32, 32, 3), np.uint8))
    data = (images / "tiff.tif").read_bytes()
    (images / "tiff.tif").write_bytes(data[:1000])
    _png(masks / "tiff.png", ok_mask)
    Image.fromarray(img).save(images / "jpeg.jpg")
    data = (images / "jpeg.jpg").read_bytes()
    (images / "jpeg.jpg").write_bytes(data[:-10])
    _png(masks / "jpeg.png", ok_mask)
    _png(images / "twice.png", img)
    Image.fromarray(img).save(images / "twice.tif")
    _png(masks / "twice.png", ok_mask)
    with pytest.raises(DatasetError) as err:
        FolderDataset(tmp_path, mask_values={0: 0, 255: 1})
    problems = dict((path.split("/")[-2] + "/" + path.split("/")[-1], why) for path, why in err.value.problems)
    assert "images/twice.tif" in problems and "ambiguous" in problems["images/twice.tif"]
    assert "images/lonely.png" in problems and "no mask" in problems["images/lonely.png"]
    # Layout problems are reported first, alone; fix them and the pixel-level problems come out.
    (images / "lonely.png").unlink()
    (images / "twice.tif").unlink()
    with pytest.raises(DatasetError) as err:
        FolderDataset(tmp_path, mask_values={0: 0, 255: 1})
    problems = {path.split("/")[-2] + "/" + path.split("/")[-1]: why for path, why in err.value.problems}
    assert set(problems) == {"masks/size.png", "masks/values.png", "images/cut.png", "images/junk.png",
                             "images/tiff.tif", "images/jpeg.jpg"}
    assert "16" in problems["masks/size.png"] and "7" in problems["masks/values.png"]
    assert "truncated PNG" in problems["images/cut.png"] and "truncated TIFF" in problems["images/tiff.tif"]
    assert "truncated JPEG" in problems["images/jpeg.jpg"] and "not a readable" in problems["images/junk.png"]
    text = str(err.value)
    assert "6 problem(s)" in text and all(name in text for name in ("size.png", "values.png", "junk.png"))
    assert "ok.png" not in text


def test_folder_empty_missing_and_bad_arguments(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        FolderDataset(tmp_path)
    with pytest.raises(DatasetError, match="folder does not exist"):
        FolderDataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="y.png: does not exist"):
        FolderDataset(pairs=[(tmp_path / "y.png", tmp_path / "y.png")])
    (tmp_path / "list.txt").write_text("a.png\n")
    with pytest.raises(DatasetError, match=r"list.txt:1: expected 'IMAGE MASK'"):
        FolderDataset(list_file=tmp_path / "list.txt")
    with pytest.raises(ValueError, match="exactly one"):
        FolderDataset(tmp_path, list_file=tmp_path / "list.txt")
    with pytest.raises(ValueError, match="maps 255 to 3"):
        FolderDataset(tmp_path, mask_values={0: 0, 255: 3})
    _png(tmp_path / "images" / "a.png", np.zeros((16, 16, 3), np.uint8))
    _png(tmp_path / "masks" / "a.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(DatasetError, match="smaller than the 32x32 patch"):
        FolderDataset(tmp_path, patch_size=32)


# --- pixels decoded in the check, unmapped values, bounded memory -----------------------------------------
def _corrupt_png_idat(path):
    """Flip bytes inside the first IDAT chunk and fix its CRC, so only the zlib stream is damaged."""
    import struct
    import zlib

    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT")
    length = struct.unpack(">I", data[at - 4:at])[0]
    for i in range(at + 4 + length // 3, at + 4 + length // 3 + 16):
        data[i] ^= 0xFF
    data[at + 4 + length:at + 8 + length] = struct.pack(">I", zlib.crc32(bytes(data[at:at + 4 + length])))
    path.write_bytes(bytes(data))


def test_check_decodes_pixels_so_corrupt_data_names_its_file(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    _png(tmp_path / "images" / "idat.png", image)
    _corrupt_png_idat(tmp_path / "images" / "idat.png")
    tifffile.imwrite(tmp_path / "images" / "zlib.tif", image, tile=(16, 16), compression="zlib", photometric="rgb")
    with tifffile.TiffFile(tmp_path / "images" / "zlib.tif") as tif:
        offset = tif.pages[0].dataoffsets[5]
    data = bytearray((tmp_path / "images" / "zlib.tif").read_bytes())
    data[offset:offset + 40] = bytes(40)  # a tile's zlib stream overwritten
    (tmp_path / "images" / "zlib.tif").write_bytes(bytes(data))
    for name in ("idat", "zlib"):
        _png(tmp_path / "masks" / f"{name}.png", np.zeros((64, 64), np.uint8))
    with pytest.raises(DatasetError) as err:
        FolderDataset(tmp_path)
    problems = {p.split("/")[-1]: why for p, why in err.value.problems}
    assert set(problems) == {"idat.png", "zlib.tif"}
    assert "cannot decode" in problems["idat.png"] and "tile 5" in problems["zlib.tif"]
    # Without the check, loading still names the file instead of dying somewhere in a worker.
    ds = FolderDataset(tmp_path, check_pixels=False, check_mask_values=False)
    for i in range(len(ds)):
        with pytest.raises(ValueError, match=r"(idat.png|zlib.tif): cannot decode"):
            ds[i]


def test_unmapped_values_fail_when_loaded_even_without_the_check(tmp_path):
    mask = np.zeros((16, 16), np.int32)
    mask[:4] = 100_000  # only a 32-bit mask can store it; unmapped
    mask[4:8] = 255
    _png(tmp_path / "images" / "a.png", np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "masks" / "a.tif", mask)
    with pytest.raises(DatasetError, match=r"a.tif: mask values 100000 are not in the mapping \{0: 0, 255: 1\}"):
        FolderDataset(tmp_path, mask_values={0: 0, 255: 1})
    ds = FolderDataset(tmp_path, mask_values={0: 0, 255: 1}, check_mask_values=False)
    with pytest.raises(ValueError, match=r"a.tif: mask values 100000 are not in the mapping"):
        ds[0]  # used to return labels from uninitialised memory
    mask[:4] = 0
    tifffile.imwrite(tmp_path / "masks" / "a.tif", mask)
    labels = FolderDataset(tmp_path, mask_values={0: 0, 255: 1}, check_mask_values=False)[0][1]
    assert labels.dtype == torch.int64 and labels[4:8].eq(1).all() and labels[:4].eq(0).all()
    # A uint8 mask with an unmapped value (the lookup-table path) fails the same way.
    _png(tmp_path / "masks" / "a.png", np.full((16, 16), 9, np.uint8))
    (tmp_path / "masks" / "a.tif").unlink()
    with pytest.raises(ValueError, match=r"a.png: mask values 9"):
        FolderDataset(tmp_path, check_mask_values=False)[0]
    assert FolderDataset(tmp_path, num_classes=2, ignore_index=9)[0][1].eq(9).all()


def test_checks_and_samples_read_tiled_tiffs_by_region_in_bounded_memory(tmp_path, monkeypatch):
    from cocofast.data import folder
    from cocofast.data.slides import TiffReader

    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    mask = (rng.random((256, 256)) < 0.5).astype(np.uint8) * 255
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", image, tile=(32, 32), compression="zlib", photometric="rgb")
    tifffile.imwrite(tmp_path / "masks" / "a.tif", mask, tile=(32, 32), compression="zlib")
    largest = []
    read = TiffReader.read

    def counting(self, top, left, height, width):
        out = read(self, top, left, height, width)
        largest.append(out.shape[0] * out.shape[1])
        return out

    monkeypatch.setattr(TiffReader, "read", counting)
    monkeypatch.setattr(folder, "CHECK_BAND_PIXELS", 256 * 40)
    ds = FolderDataset(tmp_path, mask_values={0: 0, 255: 1}, patch_size=64)
    assert max(largest) <= 256 * 40  # the check scanned bands, never the whole image or mask
    largest.clear()
    x, m = ds[5]
    assert max(largest) == 64 * 64 and torch.equal(m, torch.from_numpy(mask[64:128, 64:128] // 255).long())
    assert torch.allclose(x, torch.from_numpy(image[64:128, 64:128].transpose(2, 0, 1) / 255).float())
    with pytest.raises(DatasetError, match=r"a.tif: loading a sample decodes 256x256 pixels, more than "
                                           r"max_pixels=10,000"):
        FolderDataset(tmp_path, mask_values={0: 0, 255: 1}, max_pixels=10_000)
    assert len(FolderDataset(tmp_path, mask_values={0: 0, 255: 1}, max_pixels=10_000, patch_size=64)) == 16


# --- augmentation ----------------------------------------------------------------------------------------
def test_augmentation_is_joint_seeded_and_off_by_default(tmp_path):
    from cocofast.data import Augmentation, augment_pair

    rng = np.random.default_rng(3)
    mask = rng.integers(0, 2, (24, 24), dtype=np.uint8)
    image = np.stack([mask * 150 + 50, mask * 40 + 100, 200 - mask * 90], -1).astype(np.uint8)
    _png(tmp_path / "images" / "a.png", image)
    _png(tmp_path / "masks" / "a.png", mask)
    plain = FolderDataset(tmp_path)
    assert torch.allclose(plain[0][0], torch.from_numpy(image.transpose(2, 0, 1) / 255).float())
    colour = Augmentation(flips=True, hed=0.05, brightness=0.2, contrast=0.2)
    ds = FolderDataset(tmp_path, augment=colour, seed=1)
    x0, m0 = ds[0]
    assert torch.equal(ds[0][0], x0)  # same (seed, epoch, index), same draw
    ds.set_epoch(1)
    x1, m1 = ds[0]
    assert not torch.equal(x1, x0)
    for x, m in ((x0, m0), (x1, m1)):  # the colour moved, the geometry still matches the mask
        assert m.shape == (24, 24) and 0 <= x.min() and x.max() <= 1
        assert (x[0][m == 1].mean() - x[0][m == 0].mean()) > 0.2
    image_t, mask_t = torch.rand(3, 8, 8), torch.zeros(8, 8, dtype=torch.int64)
    same = augment_pair(image_t, mask_t, np.random.default_rng(0), Augmentation(hed=0.0))
    assert torch.equal(same[0], image_t)
    with pytest.raises(ValueError, match="HED stain jitter needs RGB"):
        FolderDataset(tmp_path, in_channels=1, augment=Augmentation(hed=0.05))
    with pytest.raises(ValueError, match="brightness must be in"):
        Augmentation(brightness=1.5)


def test_hed_jitter_is_exact_at_identity_and_matches_scikit_image_when_installed():
    from cocofast.data.transforms import RGB_FROM_HED, hed_jitter

    # Colours mixed from non-negative stain amounts (rgb2hed clips negative ones, so others do not round-trip).
    stains = np.random.default_rng(4).uniform(0.0, 0.08, (16, 16, 3))
    rgb = np.exp((stains * np.log(1e-6)) @ RGB_FROM_HED.numpy())
    as_tensor = torch.from_numpy(rgb.transpose(2, 0, 1)).float()
    identity = hed_jitter(as_tensor, np.ones(3), np.zeros(3))
    assert np.abs(identity.numpy().transpose(1, 2, 0) - rgb).max() < 1e-4
    more_haematoxylin = hed_jitter(as_tensor, np.array([1.3, 1.0, 1.0]), np.zeros(3))
    assert (more_haematoxylin[0] < as_tensor[0] - 1e-3).float().mean() > 0.9  # haematoxylin absorbs red most
    skimage_color = pytest.importorskip("skimage.color")
    scale, shift = np.array([1.05, 0.97, 1.0]), np.array([0.01, -0.02, 0.0])
    expected = np.clip(skimage_color.hed2rgb(skimage_color.rgb2hed(rgb) * scale + shift), 0, 1)
    got = hed_jitter(as_tensor, scale, shift)
    assert np.abs(got.numpy().transpose(1, 2, 0) - expected).max() < 1e-4
