"""cocofast.predict: a folder (or list) of images -> masks and outline overlays; failures reported, resumable."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from cocofast.io import atomic_save
from cocofast.overlay import OUTLINE_COLOURS, outline_labels
from cocofast.predict import FAILURES_FILE, main
from cocofast.segment import sliding_window_segment
from helpers import save_enet_checkpoint

SIZES = {"a": (40, 48), "b": (64, 64), "c": (56, 72)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_enet_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    images = {}
    for name, (h, w) in SIZES.items():
        images[name] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(images[name]).save(tmp_path / f"{name}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (tmp_path / "notes.txt").write_text("not an image: ignored\n")
    return tmp_path, images


def run(args, checkpoint):
    return main([*args, "--checkpoint", str(checkpoint), "--window", "32", "--overlap", "0.5", "--quiet"])


def test_folder_with_a_corrupt_file_writes_the_others_reports_it_and_resumes(tmp_path, folder, checkpoint, capsys):
    source, images = folder
    ckpt, model = checkpoint
    out = tmp_path / "out"
    assert run([str(source), "--out", str(out)], ckpt) == 1
    captured = capsys.readouterr()
    assert "3 segmented, 0 already done, 1 failed" in captured.out
    assert "broken.png" in captured.err and "a.png" not in captured.err
    assert "broken.png" in (out / FAILURES_FILE).read_text()
    for name, image in images.items():
        expected = sliding_window_segment(lambda x: model(x).logits, image, 32, 0.5, 4, num_classes=2)
        mask = np.asarray(Image.open(out / "masks" / f"{name}.png"))
        assert np.array_equal(mask, expected * 255)
        overlay = np.asarray(Image.open(out / "overlays" / f"{name}.png"))
        ring = outline_labels(expected)
        assert overlay.shape == image.shape and ring.any()
        assert np.array_equal(overlay[ring == 0], image[ring == 0])  # outlines only, nothing filled
        assert np.all(overlay[ring == 1] == OUTLINE_COLOURS[1])
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a.png", "b.png", "c.png"]
    assert (source / "broken.png").read_bytes().startswith(b"\x89PNG")  # inputs untouched

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert run([str(source), "--out", str(out)], ckpt) == 1  # broken.png still fails; the rest is skipped
    assert "0 segmented, 3 already done, 1 failed" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    (source / "broken.png").unlink()
    assert run([str(source), "--out", str(out)], ckpt) == 0
    assert not (out / FAILURES_FILE).exists()


def test_list_file_paths_are_relative_to_it_and_missing_ones_fail_alone(tmp_path, folder, checkpoint, capsys):
    source, _ = folder
    listing = source / "todo.txt"
    listing.write_text("# two images and a typo\nb.png\n\n" + str(source / "c.png") + "\nmissing.png\n")
    out = tmp_path / "out"
    code = run([str(listing), "--out", str(out), "--no-overlays", "--format", "tif", "--mask-values", "index"],
               checkpoint[0])
    assert code == 1 and "missing.png" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["b.tif", "c.tif"]
    mask = tifffile.imread(out / "masks" / "b.tif")
    assert mask.shape == SIZES["b"] and set(np.unique(mask)) <= {0, 1}
    assert not (out / "overlays").exists()


def test_bad_arguments_exit_2_before_writing_anything(tmp_path, folder, checkpoint, capsys):
    source, _ = folder
    ckpt, _ = checkpoint
    out = tmp_path / "out"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(source / "a.tif")  # same name as a.png
    assert run([str(source), "--out", str(out)], ckpt) == 2
    assert "a.png" in (err := capsys.readouterr().err) and "a.tif" in err
    (source / "a.tif").unlink()
    assert main([str(source), "--out", str(out), "--checkpoint", str(ckpt), "--window", "36"]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert run([str(tmp_path / "nowhere"), "--out", str(out)], ckpt) == 2
    assert "nowhere" in capsys.readouterr().err
    assert run([str(source), "--out", str(out), "--outline-width", "0"], ckpt) == 2
    assert "--outline-width" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run([str(empty), "--out", str(out)], ckpt) == 2
    assert "holds no images" in capsys.readouterr().err
    assert run([str(source), "--out", str(out), "--role", "teacher"], ckpt) == 2
    assert "'teacher'" in capsys.readouterr().err
    entry = {"model_name": "enet", "model_kwargs": {"in_channels": 3, "num_classes": 2, "width": 0.5},
             "state_dict": checkpoint[1].state_dict()}  # weights of a network half as wide
    atomic_save({"models": {"student": entry}}, tmp_path / "mismatch.pt")
    assert run([str(source), "--out", str(out)], tmp_path / "mismatch.pt") == 2
    assert "size mismatch" in capsys.readouterr().err
    assert not out.exists()
    listing = tmp_path / "list.txt"
    listing.write_text(f"{source / 'a.png'}\n{out / 'masks' / 'b.png'}\n")
    (out / "masks").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(out / "masks" / "b.png")
    assert run([str(listing), "--out", str(out)], ckpt) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == ["b.png", "masks"]


def test_downscaled_inference_writes_full_resolution_masks_and_overlays(tmp_path, folder, checkpoint):
    source, images = folder
    out = tmp_path / "out"
    assert run([str(source / "c.png"), "--out", str(out), "--downscale", "2"], checkpoint[0]) == 0
    mask = np.asarray(Image.open(out / "masks" / "c.png"))
    overlay = np.asarray(Image.open(out / "overlays" / "c.png"))
    assert mask.shape == SIZES["c"] and overlay.shape == images["c"].shape
    ring = outline_labels(mask // 255)
    assert np.array_equal(overlay[ring == 0], images["c"][ring == 0])
    assert np.array_equal(mask[::2, ::2].repeat(2, 0).repeat(2, 1)[:mask.shape[0], :mask.shape[1]], mask)


def test_predict_and_segment_write_the_same_mask_and_overlay_with_the_checkpoints_settings(
        tmp_path, folder, checkpoint, monkeypatch):
    import cocofast.segment
    from cocofast.segment import blended_bands
    from cocofast.segment import main as segment_main

    source, _ = folder
    _, model = checkpoint
    entry = {"model_name": "enet", "model_kwargs": {"in_channels": 3, "num_classes": 2, "width": 0.25},
             "state_dict": model.state_dict()}
    ckpt = tmp_path / "trained.pt"  # trained on 64 px patches resized to 32: window 32 at half resolution
    atomic_save({"models": {"student": entry}, "config": {"image_size": 32, "patch_size": 64}}, ckpt)
    windows = []

    def spy(predict_fn, reader, window, *args, **kwargs):
        windows.append((window, reader.height))
        return blended_bands(predict_fn, reader, window, *args, **kwargs)

    monkeypatch.setattr(cocofast.segment, "blended_bands", spy)
    out = tmp_path / "out"
    common = ["--checkpoint", str(ckpt), "--overlap", "0.5", "--quiet"]
    assert main([str(source / "c.png"), "--out", str(out), *common]) == 0
    assert segment_main([str(source / "c.png"), "--out", str(tmp_path / "m.png"),
                         "--overlay", str(tmp_path / "o.png"), *common]) == 0
    assert windows == [(32, SIZES["c"][0] // 2)] * 2
    mask = np.asarray(Image.open(out / "masks" / "c.png"))
    assert mask.shape == SIZES["c"] and np.array_equal(mask, np.asarray(Image.open(tmp_path / "m.png")))
    overlay = np.asarray(Image.open(out / "overlays" / "c.png"))
    assert np.array_equal(overlay, np.asarray(Image.open(tmp_path / "o.png")))
