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


# --- the end-to-end check: slides + annotations -> teacher -> student -> a held-out slide back -------
def polygons_of(collection, names):
    for feature in collection["features"]:
        geometry = feature["geometry"]
        cls = names[feature["properties"]["classification"]["name"]]
        for rings in [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]:
            yield cls, [np.asarray(r, float) for r in rings]


def rasterise_axis_aligned(collection, height, width, scale, names):
    """Labels of a GeoJSON of axis-aligned polygons (pixel boundaries) on a grid of `scale` level-0 pixels,
    by the even-odd rule with rays from each pixel centre to the left: a pixel is inside where an odd number
    of vertical edges lie left of its centre. Numpy only, independent of shapely."""
    out = np.zeros((height, width), np.int64)
    for k in set(names.values()):
        spans = np.zeros((height + 1, width + 1), np.int64)
        for cls, rings in polygons_of(collection, names):
            if cls != k:
                continue
            for ring in rings:
                ring = ring / scale
                assert np.array_equal(ring, np.round(ring))  # vertices on pixel corners
                a, b = ring[:-1], ring[1:]
                vertical = a[:, 0] == b[:, 0]
                assert (vertical | (a[:, 1] == b[:, 1])).all()
                x = a[vertical, 0].astype(int)
                y0 = np.minimum(a[vertical, 1], b[vertical, 1]).astype(int)
                y1 = np.maximum(a[vertical, 1], b[vertical, 1]).astype(int)
                np.add.at(spans, (y0, x), 1)  # the edge crosses rows y0 .. y1 - 1 at column boundary x
                np.add.at(spans, (y1, x), -1)
        crossing = np.cumsum(spans, axis=0)[:height]  # edges at each column boundary, per row
        inside = np.cumsum(crossing, axis=1)[:, :width] % 2 == 1  # edges at boundaries 0..c, left of c + 0.5
        out[inside] = k
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The sample SVS (GeoJSON) to train on, a TIFF with XML to validate on, a held-out TIFF with GeoJSON;
    teacher, paraphraser and student trained for an epoch each at 1 µm per pixel, then scored."""
    from cocofast.train import distill
    from test_slide_dataset import SVS_STROMA, SVS_TUMOUR, TIFF_STROMA, TIFF_TUMOUR, asap_xml, geojson, \
        pyramid_tiff, svs_crop

    root = tmp_path_factory.mktemp("slides")
    geojson(root / "train.geojson", SVS_TUMOUR, SVS_STROMA)
    pyramid_tiff(root / "val.tif", svs_crop(1500, 600))
    asap_xml(root / "val.xml", TIFF_TUMOUR, TIFF_STROMA)
    pyramid_tiff(root / "test.tif", svs_crop(1900, 700, size=1024))
    geojson(root / "test.geojson", TIFF_TUMOUR, TIFF_STROMA)
    (root / "slides.csv").write_text(f"slide,annotation\n{sample_svs()},train.geojson\nval.tif,val.xml\n"
                                     "test.tif,test.geojson\n")
    (root / "split.csv").write_text("slide,split\ncmu_small_region,train\nval,val\ntest,test\n")
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    args = ["--config", tiny, f"--run_dir={root / 'run'}", "--dataset=slides", f"--data_root={root / 'slides.csv'}",
            f"--slide_split={root / 'split.csv'}", "--slide_mpp=1", "--slide_classes=Tumor:1,Stroma:2,Hole:0",
            "--num_classes=3", "--teacher_epochs=1", "--student_epochs=1", "--train_samples=16"]
    assert distill.main(args) == 0
    return root, args


# The end-to-end test: about 30 s on 2 busy cores, training included; it stays in `make test` (the suite has room)
def test_slides_train_a_student_whose_regions_come_back_as_geojson_and_a_probability_pyramid(trained, capsys):
    import csv
    import json

    import tifffile

    from cocofast.checkpoint import read_checkpoint
    from cocofast.data.imageio import IGNORE
    from cocofast.train.config import parse_args
    from cocofast.train.data import build_dataset

    root, args = trained
    student = root / "run" / "student" / "best.pt"
    assert read_checkpoint(student)["config"]["slide_mpp"] == 1.0  # the resolution travels with the model
    with open(root / "run" / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"dice0", "dice1", "dice2"} <= set(rows[0]) and rows[0]["split"] == "test"
    # (b) no pixel of a held-out slide reaches training: the training set holds the SVS alone, and every patch
    # it draws, in any epoch, lies inside it
    cfg = parse_args(args)
    train = build_dataset(cfg, "train")
    assert [s.entry.image for s in train.slides] == [sample_svs()]
    for epoch in (0, 5):
        train.set_epoch(epoch)
        assert all(train.window(i)[0] == 0 for i in range(len(train)))
    assert {s.entry.image.name for s in build_dataset(cfg, "test").slides} == {"test.tif"}

    # segment the held-out slide at the checkpoint's resolution (no --mpp): mask, probabilities, GeoJSON
    out = root / "out"
    out.mkdir()
    assert segment.main([str(root / "test.tif"), "--checkpoint", str(student), "--out", str(out / "mask.png"),
                         "--mask-values", "index", "--probabilities", str(out / "p.tif"),
                         "--geojson", str(out / "exact.geojson"), "--geojson-tolerance", "0", "--quiet"]) == 0
    assert "downscale 1" in capsys.readouterr().out  # level 1 (0.998 µm per pixel) is the 1 µm per pixel level
    mask = np.asarray(Image.open(out / "mask.png")).astype(np.int64)
    assert mask.shape == (512, 512) and not (mask == IGNORE).any()
    # (c) the GeoJSON written back, rasterised (level-0 coordinates, 2 level-0 pixels per mask pixel), is the mask
    names = {"Tumor": 1, "Stroma": 2}
    exact = json.loads((out / "exact.geojson").read_text())
    assert exact["type"] == "FeatureCollection" and exact["features"]
    assert {f["properties"]["classification"]["name"] for f in exact["features"]} <= set(names)
    assert np.array_equal(rasterise_axis_aligned(exact, 512, 512, 2.0, names), mask)
    # (d) the probability map is a pyramid tifffile opens: per-class probabilities that sum to 1, argmax = mask
    with tifffile.TiffFile(out / "p.tif") as tif:
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(512, 512, 3), (256, 256, 3)]
        assert tif.pages[0].is_tiled and tif.pages[0].tags["XResolution"].value[0] > 0
        probs = levels[0].asarray()
    assert probs.dtype == np.uint8 and np.abs(probs.astype(int).sum(-1) - 255).max() <= 2
    chosen = np.take_along_axis(probs, mask[..., None], axis=-1)[..., 0].astype(int)
    assert (chosen >= probs.max(-1).astype(int) - 1).all()  # the mask's class is the most likely, to 1/255

    # simplified to one network pixel (Douglas-Peucker): fewer vertices, each one a vertex of the exact regions
    assert segment.main([str(root / "test.tif"), "--checkpoint", str(student), "--out", str(out / "m2.png"),
                         "--geojson", str(out / "simple.geojson"), "--quiet"]) == 0
    simple = json.loads((out / "simple.geojson").read_text())

    def vertices(collection):
        return {tuple(p) for _, rings in polygons_of(collection, names) for ring in rings for p in ring.tolist()}

    def count(collection):
        return sum(len(ring) for _, rings in polygons_of(collection, names) for ring in rings)

    kept, exact_vertices = vertices(simple), vertices(exact)
    assert simple["features"] and count(simple) < 0.8 * count(exact)
    assert len(kept & exact_vertices) >= 0.99 * len(kept)  # make_valid may add a crossing point or two


def test_predict_scores_its_masks_against_true_ones_per_image_and_overall(tmp_path, capsys):
    import csv

    ckpt = checkpoint_with(tmp_path / "m.pt")
    (tmp_path / "in").mkdir()
    (tmp_path / "truth").mkdir()
    rng = np.random.default_rng(0)
    truths = {}
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "in" / f"{name}.png")
        truths[name] = (rng.random((64, 80)) < 0.4).astype(np.uint8)
    Image.fromarray(truths["a"] * 255).save(tmp_path / "truth" / "a.png")  # 0/255 levels
    truth_b = truths["b"].copy()
    truth_b[:8] = 255  # class indices, the top rows not scored
    Image.fromarray(truth_b).save(tmp_path / "truth" / "b.png")
    out = tmp_path / "out"
    code = predict.main([str(tmp_path / "in"), "--checkpoint", str(ckpt), "--out", str(out), "--masks",
                         str(tmp_path / "truth"), "--quiet", "--no-overlays"])
    assert code == 1  # c has no true mask: scored are a and b, and c is named
    assert "not scored: c.png: no true mask c.* in" in capsys.readouterr().err
    with open(out / "scores.csv") as f:
        rows = {r["image"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"a.png", "b.png", "all images"}
    matrix_all = np.zeros((2, 2))
    for name in ("a", "b"):
        pred = (np.asarray(Image.open(out / "masks" / f"{name}.png")) > 0).astype(int)
        true = truths[name].astype(int)
        keep = np.ones_like(true, bool)
        if name == "b":
            keep[:8] = False
        matrix = np.zeros((2, 2))
        np.add.at(matrix, (true[keep], pred[keep]), 1)
        matrix_all += matrix
        for k in (0, 1):
            dice = 2 * matrix[k, k] / (matrix[k].sum() + matrix[:, k].sum())
            iou = matrix[k, k] / (matrix[k].sum() + matrix[:, k].sum() - matrix[k, k])
            assert float(rows[f"{name}.png"][f"dice{k}"]) == pytest.approx(dice)
            assert float(rows[f"{name}.png"][f"iou{k}"]) == pytest.approx(iou)
        assert int(rows[f"{name}.png"]["pixels"]) == keep.sum()
    k = 1
    assert float(rows["all images"]["dice1"]) == pytest.approx(
        2 * matrix_all[k, k] / (matrix_all[k].sum() + matrix_all[:, k].sum()))
    assert predict.main([str(tmp_path / "in"), "--checkpoint", str(ckpt), "--out", str(out), "--masks",
                         str(tmp_path / "nowhere")]) == 2


def test_glass_windows_are_not_run_and_come_out_background(tmp_path, capsys):
    from cocofast.segment import blended_bands

    calls = []

    def network(batch):
        calls.append(len(batch))
        return torch.stack([torch.zeros_like(batch[:, 0]), torch.ones_like(batch[:, 0]) * 5], 1)

    image = np.zeros((64, 256, 3), np.uint8)
    bands = list(blended_bands(network, image, 64, 0.0, 8, 2, skip=lambda y, x: x < 128))
    scores = torch.cat([s for _, s in bands], 1)
    assert sum(calls) == 2  # four windows, two of glass
    assert torch.allclose(scores[0, :, :128], torch.ones(64, 128))  # background, certain
    assert (scores[1, :, 128:] > 0.99).all()
    # on the sample slide: the glass left of the tissue is background, and fewer windows run
    ckpt = checkpoint_with(tmp_path / "m.pt", slide_mpp=2.0)
    out = tmp_path / "mask.png"
    assert segment.main([str(sample_svs()), "--checkpoint", str(ckpt), "--out", str(out), "--skip-glass",
                         "--quiet", "--mask-values", "index"]) == 0
    mask = np.asarray(Image.open(out))
    assert (mask[:, :150] == 0).mean() > 0.9, (mask[:, :150] == 0).mean()  # the left margin: glass, a strand or two


def test_predict_writes_probabilities_and_geojson_beside_each_mask(tmp_path):
    import json

    import tifffile

    ckpt = checkpoint_with(tmp_path / "m.pt", slide_classes="Tumor:1")
    (tmp_path / "in").mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(
        tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    args = [str(tmp_path / "in"), "--checkpoint", str(ckpt), "--out", str(out), "--downscale", "1", "--quiet"]
    assert predict.main(args) == 0
    assert not (out / "geojson").exists()
    assert predict.main(args + ["--probabilities", "--geojson"]) == 0  # the missing outputs are made
    with tifffile.TiffFile(out / "probabilities" / "a.tif") as tif:
        assert tif.series[0].levels[0].shape == (64, 80, 2)
    regions = json.loads((out / "geojson" / "a.geojson").read_text())
    assert {f["properties"]["classification"]["name"] for f in regions["features"]} <= {"Tumor"}


def test_geojson_rasterises_back_to_the_mask_and_probabilities_open_as_a_pyramid(tmp_path):
    """(c) and (d) of the end-to-end test without its training: an untrained network's salt and pepper is the
    hardest case for the traced boundaries."""
    import json

    import tifffile

    from test_slide_dataset import pyramid_tiff, svs_crop

    ckpt = checkpoint_with(tmp_path / "m.pt", slide_mpp=1.0, slide_classes="Tumor:1")
    slide = pyramid_tiff(tmp_path / "s.tif", svs_crop(1900, 700, size=1024))
    assert segment.main([str(slide), "--checkpoint", str(ckpt), "--out", str(tmp_path / "mask.png"), "--mask-values",
                         "index", "--probabilities", str(tmp_path / "p.tif"), "--probability-dtype", "float16",
                         "--geojson", str(tmp_path / "r.geojson"), "--geojson-tolerance", "0", "--quiet"]) == 0
    mask = np.asarray(Image.open(tmp_path / "mask.png")).astype(np.int64)
    assert mask.shape == (512, 512) and 0.05 < mask.mean() < 0.95
    regions = json.loads((tmp_path / "r.geojson").read_text())
    assert np.array_equal(rasterise_axis_aligned(regions, 512, 512, 2.0, {"Tumor": 1}), mask)
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(512, 512, 2), (256, 256, 2)] and levels[0].dtype == np.float16
        probs = levels[0].asarray().astype(np.float32)
    assert np.allclose(probs.sum(-1), 1, atol=2e-3)
    chosen = np.take_along_axis(probs, mask[..., None], axis=-1)[..., 0]
    assert (chosen >= probs.max(-1) - 1e-3).all()  # the mask's class is the most likely, to float16's step
