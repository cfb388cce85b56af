"""Slide annotations: QuPath GeoJSON, ASAP/Camelyon XML and label images, as class masks of any window.

Every annotation lives in level-0 slide pixel coordinates (x to the right, y down, the convention of QuPath
and ASAP). `read_annotations(path, classes, slide_size)` gives an `Annotations` object and the list of
problems it found, as (file, reason) pairs, so a data set can report every bad file at once:

  * GeoJSON (`.geojson`, `.json`): a FeatureCollection, a Feature or a list of Features (QuPath writes all
    three); Polygon and MultiPolygon geometries with holes (GeometryCollections keep their polygonal parts);
    the class is `properties.classification.name` (unclassified features use the name "Unclassified").
  * ASAP / Camelyon XML (`.xml`): every `Annotation` with its `Coordinates` (Polygon, Spline, Rectangle:
    the vertices as drawn); the class is its `PartOfGroup` ("_0", "_1", "_2", "Tumor" in Camelyon).
  * a label image (`.png`, `.tif`, ...): one class index per pixel, at any pyramid level: its downsample is
    the slide's level-0 size over its own (the two axes must agree within 1 %); 255 means unlabelled.

Class names become indices through `classes` ({"Tumor": 1, "Stroma": 2}); a name it lacks is a problem, not
a silent background. Where regions overlap, the later one in the file wins, which is how Camelyon's exclusion
group ("_2", mapped to the background class) cuts holes into tumour regions.

Geometry is shapely's (GEOS): `make_valid` repairs self-intersecting rings drawn by hand instead of letting
them rasterise to garbage, holes and multi-part regions are native, an STR-tree finds the few regions a
window touches among thousands, and `simplify` (used for GeoJSON output) keeps topology. Rasterising tests
pixel centres against the regions (`shapely.intersects_xy`), only inside each region's bounding box, so a
window costs its own pixels whatever the slide's size.
"""
from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, shape

from .imageio import IGNORE

GEOJSON_SUFFIXES = (".geojson", ".json")
XML_SUFFIXES = (".xml",)
UNCLASSIFIED = "Unclassified"
# A polygon may stick out of the slide by this fraction of its side before it counts as outside (drawing
# tools let a stroke run a little past the edge).
EDGE_TOLERANCE = 0.01


@dataclass(frozen=True)
class Region:
    label: int
    geometry: Polygon | MultiPolygon  # level-0 slide pixels
    name: str  # the class name the file gave


def parse_classes(text: str) -> dict[str, int]:
    """'Tumor:1,Stroma:2' -> {'Tumor': 1, 'Stroma': 2}; ValueError on anything else."""
    classes = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, sep, value = item.rpartition(":")
        if not sep or not name.strip() or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"expected 'NAME:CLASS,...' such as 'Tumor:1,Stroma:2', got {text!r}")
        classes[name.strip()] = int(value)
    return classes


def polygonal(geom) -> Polygon | MultiPolygon | None:
    """The area part of a geometry, repaired when invalid; None when it has no area."""
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom if not geom.is_empty and geom.area > 0 else None
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon)) and g.area > 0]
    return shapely.union_all(parts) if parts else None


class Annotations:
    """The regions of one slide (or its label image), rasterised window by window."""

    def __init__(self, path: Path, regions: list[Region], label_image=None):
        self.path, self.regions, self.label_image = path, regions, label_image
        self.tree = None  # built on first use, in each DataLoader worker (an STR-tree does not pickle)

    def __getstate__(self):
        return {**self.__dict__, "tree": None}

    def labels_present(self) -> set[int]:
        if self.label_image is not None:
            return set(self.label_image.present)
        return {r.label for r in self.regions}

    def rasterise(self, left: float, top: float, scale: float, height: int, width: int,
                  fill: int = IGNORE) -> np.ndarray:
        """(height, width) uint8 labels of the window whose pixel (r, c) covers level-0 x in
        [left + c * scale, left + (c + 1) * scale) and likewise y; a pixel takes the label of the last region
        containing its centre, `fill` where none does."""
        out = np.full((height, width), fill, np.uint8)
        if self.label_image is not None:
            return self.label_image.sample(left, top, scale, height, width, out)
        if not self.regions:
            return out
        if self.tree is None:
            self.tree = shapely.STRtree([r.geometry for r in self.regions])
            for region in self.regions:
                shapely.prepare(region.geometry)
        window = shapely.box(left, top, left + width * scale, top + height * scale)
        for i in sorted(self.tree.query(window, predicate="intersects")):
            region = self.regions[i]
            x0, y0, x1, y1 = region.geometry.bounds
            c0, c1 = _pixel_span(x0, x1, left, scale, width)
            r0, r1 = _pixel_span(y0, y1, top, scale, height)
            if c0 >= c1 or r0 >= r1:
                continue
            xs = left + (np.arange(c0, c1) + 0.5) * scale
            ys = top + (np.arange(r0, r1) + 0.5) * scale
            inside = shapely.intersects_xy(region.geometry, xs[None, :], ys[:, None])
            out[r0:r1, c0:c1][inside] = region.label
        return out


def _pixel_span(low: float, high: float, origin: float, scale: float, n: int) -> tuple[int, int]:
    """Window pixels [a, b) whose centres may fall in [low, high]."""
    a = max(0, math.floor((low - origin) / scale - 0.5))
    b = min(n, math.ceil((high - origin) / scale + 0.5))
    return a, b


class LabelImage:
    """A class-index image of the slide at some downsample, sampled at window pixel centres (nearest)."""

    def __init__(self, path: Path, height: int, width: int, downsample_x: float, downsample_y: float,
                 present: set[int]):
        self.path, self.height, self.width = path, height, width
        self.dx, self.dy, self.present = downsample_x, downsample_y, present

    def sample(self, left, top, scale, height, width, out):
        cols = np.floor((left + (np.arange(width) + 0.5) * scale) / self.dx).astype(np.int64)
        rows = np.floor((top + (np.arange(height) + 0.5) * scale) / self.dy).astype(np.int64)
        c_ok = (cols >= 0) & (cols < self.width)
        r_ok = (rows >= 0) & (rows < self.height)
        if not c_ok.any() or not r_ok.any():
            return out
        c0, c1 = cols[c_ok].min(), cols[c_ok].max() + 1
        r0, r1 = rows[r_ok].min(), rows[r_ok].max() + 1
        from .folder import mask_reader

        reader = mask_reader(self.path)  # opened per window, as FolderDataset reads its masks
        try:
            region = reader.read(int(r0), int(c0), int(r1 - r0), int(c1 - c0))[..., 0]
        finally:
            reader.close()
        picked = region[np.ix_(rows[r_ok] - r0, cols[c_ok] - c0)]
        out[np.ix_(r_ok, c_ok)] = picked.astype(np.uint8)
        return out


# --- reading -----------------------------------------------------------------------------------------------
def read_annotations(path: str | os.PathLike, classes: dict[str, int], slide_size: tuple[int, int],
                     num_classes: int | None = None) -> tuple[Annotations | None, list[tuple[str, str]]]:
    """(Annotations, problems) of the file at `path` for a slide of level-0 `slide_size` (width, height).

    Problems (unparsable file, unknown class name, a region outside the slide, a region without area, a label
    image of the wrong shape or with values outside 0..num_classes-1 and 255) are (file, reason) pairs; the
    Annotations are None when there is any.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        return None, [(str(path), "annotation file does not exist")]
    if suffix in GEOJSON_SUFFIXES + XML_SUFFIXES:
        try:
            shapes = geojson_shapes(path) if suffix in GEOJSON_SUFFIXES else asap_shapes(path)
        except ValueError as err:
            return None, [(str(path), str(err))]
        regions, problems = [], []
        width, height = slide_size
        limit = shapely.box(-EDGE_TOLERANCE * width, -EDGE_TOLERANCE * height, (1 + EDGE_TOLERANCE) * width,
                            (1 + EDGE_TOLERANCE) * height)
        for where, name, geom in shapes:
            if name not in classes:
                problems.append((str(path), f"{where}: class {name!r} is not in the class mapping "
                                            f"({', '.join(sorted(classes)) or 'empty'})"))
                continue
            area = polygonal(geom)
            if area is None:
                problems.append((str(path), f"{where}: has no area (a point, a line or a degenerate polygon)"))
                continue
            if not limit.contains(area):
                x0, y0, x1, y1 = area.bounds
                problems.append((str(path), f"{where}: spans x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}, outside "
                                            f"the {width}x{height} slide (level-0 pixels)"))
                continue
            regions.append(Region(classes[name], area, name))
        return (None if problems else Annotations(path, regions)), problems
    return read_label_image(path, slide_size, num_classes)


def geojson_shapes(path: Path) -> list[tuple[str, str, object]]:
    """(where, class name, shapely geometry) of every feature of a GeoJSON file; ValueError if it does not parse."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not readable GeoJSON ({type(err).__name__}: {err})") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        raise ValueError("expected a GeoJSON FeatureCollection, a Feature or a list of Features")
    if not isinstance(features, list):
        raise ValueError("'features' is not a list")
    shapes = []
    for i, feature in enumerate(features):
        where = f"feature {i}"
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise ValueError(f"{where} is not a GeoJSON Feature")
        props = feature.get("properties") or {}
        cls = props.get("classification") if isinstance(props, dict) else None
        name = cls.get("name") if isinstance(cls, dict) else cls if isinstance(cls, str) else None
        name = name or UNCLASSIFIED
        try:
            geom = shape(feature.get("geometry"))
        except Exception as err:  # shapely raises GeometryTypeError, ValueError, TypeError, AttributeError
            raise ValueError(f"{where}: geometry does not parse ({type(err).__name__}: {err})") from None
        shapes.append((where, name, geom))
    return shapes


def asap_shapes(path: Path) -> list[tuple[str, str, object]]:
    """(where, group name, polygon) of every Annotation of an ASAP / Camelyon XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as err:
        raise ValueError(f"not readable XML ({type(err).__name__}: {err})") from None
    found = root.iter("Annotation")
    shapes = []
    for i, ann in enumerate(found):
        where = f"Annotation {i} ({ann.get('Name', 'unnamed')})"
        points = []
        for coord in ann.iter("Coordinate"):
            try:
                points.append((float(coord.get("Order", len(points))), float(coord.get("X")),
                               float(coord.get("Y"))))
            except (TypeError, ValueError):
                raise ValueError(f"{where}: a Coordinate without numeric Order/X/Y") from None
        points.sort()
        ring = [(x, y) for _, x, y in points]
        if len(ring) < 3:
            raise ValueError(f"{where}: {len(ring)} coordinates, a polygon needs at least 3")
        shapes.append((where, ann.get("PartOfGroup") or UNCLASSIFIED, Polygon(ring)))
    if not shapes:
        raise ValueError("no Annotation elements (expected ASAP_Annotations/Annotations/Annotation)")
    return shapes


def read_label_image(path: Path, slide_size: tuple[int, int], num_classes: int | None):
    from .folder import CHECK_BAND_PIXELS, mask_reader, single_channel

    try:
        reader = mask_reader(path)
    except ValueError as err:
        return None, [(str(path), f"label image does not open ({str(err).removeprefix(f'{path}: ')})")]
    width, height = slide_size
    dx, dy = width / reader.width, height / reader.height
    if abs(dx / dy - 1) > 0.01:
        reader.close()
        return None, [(str(path), f"label image is {reader.width}x{reader.height}, not the slide's {width}x{height} "
                                  "at any one downsample")]
    present: set[int] = set()
    rows = max(1, CHECK_BAND_PIXELS // reader.width)
    try:
        for top in range(0, reader.height, rows):
            band = single_channel(reader.read(top, 0, rows, reader.width), path)
            present.update(np.unique(band).tolist())
    except ValueError as err:
        return None, [(str(path), str(err).removeprefix(f"{path}: "))]
    finally:
        reader.close()
    allowed = set(range(num_classes)) | {IGNORE} if num_classes else set(range(256))
    bad = sorted(v for v in present if v not in allowed)
    if bad:
        return None, [(str(path), f"label values {', '.join(map(str, bad[:8]))} are not classes "
                                  f"0..{num_classes - 1} or {IGNORE} (unlabelled)")]
    present.discard(IGNORE)
    label = LabelImage(path, reader.height, reader.width, dx, dy, {int(v) for v in present})
    return Annotations(path, [], label), []
