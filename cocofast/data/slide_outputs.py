"""What segment and predict hand back besides the mask: a per-class probability pyramid and GeoJSON regions.

`ProbabilityPyramid` takes blended class probabilities band by band at the resolution the network ran at and
writes one tiled, zlib-compressed, pyramidal TIFF (uint8 as round(255 p), or float16), one sample per class,
every level half the one above down to 256 pixels, with resolution tags when the µm per pixel is known, so
QuPath, ASAP or tifffile open it as a pyramid. Rows go to a temporary memory-mapped file on disk beside the
output (page cache, not resident memory), from which the levels are built band by band and the TIFF written.

`RegionCollector` keeps labels, band by band, in a memory-mapped file and traces each class's pixel
boundaries into exact rings (`trace_regions`); `regions_geojson` simplifies every ring (Douglas-Peucker, to a
stated tolerance in level-0 pixels) and writes QuPath's GeoJSON: level-0 slide coordinates, one Feature per
connected region with `classification.name` and a colour.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon

PYRAMID_TILE = 256
PROBABILITY_DTYPES = ("uint8", "float16")
# QuPath's colours for the first classes (RGB), then a repeat
CLASS_COLOURS = [(200, 0, 0), (0, 150, 0), (0, 0, 200), (200, 150, 0), (150, 0, 200), (0, 150, 150)]


class ProbabilityPyramid:
    """Probabilities (K, n, W) in [0, 1], rows in order, -> a pyramidal TIFF at `path` on close()."""

    def __init__(self, path: str | os.PathLike, height: int, width: int, num_classes: int, dtype: str = "uint8",
                 mpp: float | None = None):
        if dtype not in PROBABILITY_DTYPES:
            raise ValueError(f"probability dtype must be one of {', '.join(PROBABILITY_DTYPES)}, got {dtype!r}")
        self.path, self.height, self.width, self.classes = Path(path), height, width, num_classes
        self.dtype, self.mpp = np.dtype(dtype), mpp
        self.tmp = tempfile.TemporaryDirectory(prefix=".probabilities-", dir=self.path.parent)
        self.levels = [np.lib.format.open_memmap(Path(self.tmp.name) / "0.npy", "w+", self.dtype,
                                                 (height, width, num_classes))]
        self.rows = 0

    def write(self, probabilities) -> None:
        probs = probabilities.cpu().numpy() if hasattr(probabilities, "cpu") else np.asarray(probabilities)
        n = probs.shape[1]
        if self.rows + n > self.height:
            raise ValueError(f"probability map is {self.height} rows high; got row {self.rows + n}")
        values = np.moveaxis(probs, 0, -1)
        if self.dtype == np.uint8:
            values = np.rint(np.clip(values, 0, 1) * 255)
        self.levels[0][self.rows:self.rows + n] = values.astype(self.dtype)
        self.rows += n

    def close(self) -> None:
        import tifffile

        try:
            if self.rows != self.height:
                raise ValueError(f"probability map closed after {self.rows} of {self.height} rows")
            while max(self.levels[-1].shape[:2]) > PYRAMID_TILE:
                self.levels.append(self._halve(self.levels[-1], len(self.levels)))
            tags = {}
            if self.mpp:
                tags = dict(resolution=(1e4 / self.mpp, 1e4 / self.mpp), resolutionunit="CENTIMETER")
            with tifffile.TiffWriter(self.path, bigtiff=self.levels[0].nbytes > 2**31) as tif:
                for i, level in enumerate(self.levels):
                    extra = dict(subifds=len(self.levels) - 1, **tags) if i == 0 else dict(subfiletype=1)
                    tif.write(_tiles(level), shape=level.shape, dtype=self.dtype, tile=(PYRAMID_TILE, PYRAMID_TILE),
                              photometric="minisblack", planarconfig="contig", compression="zlib",
                              metadata=None, **extra)
        finally:
            self.levels = []
            self.tmp.cleanup()

    def _halve(self, level: np.ndarray, index: int) -> np.ndarray:
        h, w = (level.shape[0] + 1) // 2, (level.shape[1] + 1) // 2
        out = np.lib.format.open_memmap(Path(self.tmp.name) / f"{index}.npy", "w+", self.dtype,
                                        (h, w, self.classes))
        for top in range(0, h, PYRAMID_TILE):
            block = level[2 * top:2 * (top + PYRAMID_TILE)].astype(np.float32)
            if block.shape[0] % 2:
                block = np.concatenate([block, block[-1:]])
            if block.shape[1] % 2:
                block = np.concatenate([block, block[:, -1:]], axis=1)
            mean = block.reshape(block.shape[0] // 2, 2, w, 2, self.classes).mean(axis=(1, 3))
            out[top:top + len(mean)] = np.rint(mean) if self.dtype == np.uint8 else mean
        return out


def _tiles(level: np.ndarray):
    height, width = level.shape[:2]
    for top in range(0, height, PYRAMID_TILE):
        rows = np.asarray(level[top:top + PYRAMID_TILE])
        for left in range(0, width, PYRAMID_TILE):
            tile = np.zeros((PYRAMID_TILE, PYRAMID_TILE, level.shape[2]), level.dtype)
            part = rows[:, left:left + PYRAMID_TILE]
            tile[:part.shape[0], :part.shape[1]] = part
            yield tile


class RegionCollector:
    """Labels (n, W), band by band, -> one polygonal region per class (background class 0 left out).

    The labels wait in a memory-mapped file on disk (one byte per network pixel); `regions` traces each
    class's pixel boundaries into rings (`trace_regions`), exact to the pixel."""

    def __init__(self, height: int, width: int, num_classes: int, background: int = 0, folder=None):
        self.classes = [k for k in range(num_classes) if k != background]
        self.tmp = tempfile.TemporaryDirectory(prefix=".regions-", dir=folder)
        self.labels = np.lib.format.open_memmap(Path(self.tmp.name) / "labels.npy", "w+", np.uint8, (height, width))

    def add(self, top: int, labels: np.ndarray) -> None:
        self.labels[top:top + len(labels)] = labels

    def regions(self) -> dict[int, Polygon | MultiPolygon]:
        """class -> its region in the labels' pixel coordinates (x right, y down); absent classes left out."""
        try:
            out = {}
            for k in self.classes:
                polygons = trace_regions(np.asarray(self.labels) == k)
                if polygons:
                    out[k] = MultiPolygon(polygons) if len(polygons) > 1 else polygons[0]
            return out
        finally:
            self.labels = None
            self.tmp.cleanup()


def split_pinches(ring: list) -> list[list]:
    """A ring that passes one vertex twice (where diagonal pixels meet) as simple rings, cut at the vertex."""
    rings, stack, where = [], [], {}
    for vertex in ring:
        if vertex in where:
            i = where[vertex]
            rings.append(stack[i:])
            for passed in stack[i + 1:]:
                del where[passed]
            del stack[i + 1:]
        else:
            where[vertex] = len(stack)
            stack.append(vertex)
    return rings + [stack]


# Boundary directions E, S, W, N (x right, y down) and the right turn of each, for tracing.
_STEPS = np.array([(1, 0), (0, 1), (-1, 0), (0, -1)])
_RIGHT = np.array([1, 2, 3, 0])


def trace_regions(mask: np.ndarray) -> list[Polygon]:
    """The polygons (with holes) whose union is exactly the True pixels of `mask`, pixel (r, c) being the unit
    square [c, c + 1] x [r, r + 1]. Every boundary edge between a True and a False pixel is directed with the
    True pixel on its right; at each vertex an edge continues with the only edge leaving it or, where two
    leave (diagonal pixels), with the right turn, so diagonal neighbours are separate regions (4-connected);
    a ring that still meets itself there is cut into simple rings. Rings with the region outside (the other
    orientation) are holes, each given to the smallest outer ring around it."""
    h, w = mask.shape
    p = np.pad(mask, 1)
    above, below = p[:-1, 1:-1], p[1:, 1:-1]  # (h + 1, w): pixels either side of each horizontal edge
    left, right = p[1:-1, :-1], p[1:-1, 1:]  # (h, w + 1): either side of each vertical edge
    ey, ex = np.nonzero(below & ~above)  # east from (x, y)
    wy, wx = np.nonzero(above & ~below)  # west from (x + 1, y)
    sy, sx = np.nonzero(left & ~right)  # south from (x, y)
    ny, nx = np.nonzero(right & ~left)  # north from (x, y + 1)
    x0 = np.concatenate([ex, wx + 1, sx, nx])
    y0 = np.concatenate([ey, wy, sy, ny + 1])
    direction = np.concatenate([np.full(len(ex), 0), np.full(len(wx), 2), np.full(len(sx), 1), np.full(len(nx), 3)])
    if not len(x0):
        return []
    x1, y1 = x0 + _STEPS[direction, 0], y0 + _STEPS[direction, 1]
    start, end = y0 * (w + 1) + x0, y1 * (w + 1) + x1
    order = np.argsort(start, kind="stable")
    first = np.searchsorted(start[order], end)  # the first edge leaving each edge's end vertex
    count = np.searchsorted(start[order], end, side="right") - first
    nxt = order[first]
    two = np.flatnonzero(count == 2)  # a diagonal vertex: take the edge that turns right
    other = order[first[two] + 1]
    take_other = direction[other] == _RIGHT[direction[two]]
    nxt[two[take_other]] = other[take_other]

    rings, seen = [], np.zeros(len(nxt), bool)
    nxt_list, direction_list = nxt.tolist(), direction.tolist()
    xs, ys = x0.tolist(), y0.tolist()
    for begin in range(len(nxt_list)):
        if seen[begin]:
            continue
        ring, edge = [], begin
        while not seen[edge]:
            seen[edge] = True
            after = nxt_list[edge]
            if direction_list[after] != direction_list[edge]:  # a corner: the next edge starts here
                ring.append((xs[after], ys[after]))
            edge = after
        rings.extend(split_pinches(ring))
    sizes = np.array([len(r) for r in rings])
    coords = np.array([v for r in rings for v in r], dtype=np.float64)
    lines = shapely.linearrings(coords, indices=np.repeat(np.arange(len(rings)), sizes))
    # Region on the right of each edge, y down: outer rings run counter-clockwise by the shoelace sign in these
    # coordinates, holes the other way.
    is_outer = shapely.is_ccw(lines)
    outer = shapely.polygons(lines[is_outer])
    holes = lines[~is_outer]
    if not len(holes):
        return list(outer)
    # The centre of the background pixel left of each hole's first edge: inside the hole, in no island of it.
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])[~is_outer]
    a, b = coords[offsets], coords[offsets + 1]
    d = np.sign(b - a)
    px, py = a[:, 0] + 0.5 * d[:, 0] + 0.5 * d[:, 1], a[:, 1] + 0.5 * d[:, 1] - 0.5 * d[:, 0]
    hole_i, ring_i = shapely.STRtree(outer).query(shapely.points(px, py))
    shapely.prepare(outer)
    inside = shapely.contains_xy(outer[ring_i], px[hole_i], py[hole_i])
    hole_i, ring_i = hole_i[inside], ring_i[inside]
    pick = np.lexsort((shapely.area(outer[ring_i]), hole_i))  # per hole, the smallest ring around it first
    hole_i, ring_i = hole_i[pick], ring_i[pick]
    first = np.r_[True, hole_i[1:] != hole_i[:-1]]
    owned: dict[int, list] = {}
    for h, r in zip(hole_i[first].tolist(), ring_i[first].tolist()):
        owned.setdefault(r, []).append(holes[h])
    return [shapely.polygons(shell.exterior, holes=owned[i]) if i in owned else shell
            for i, shell in enumerate(outer)]


def regions_geojson(regions: dict[int, Polygon | MultiPolygon], scale: float, tolerance: float = 0.0,
                    names: dict[int, str] | None = None) -> str:
    """QuPath-style GeoJSON text of `regions` (label pixels) in level-0 coordinates (x scale), each ring
    simplified to `tolerance` level-0 pixels; one Feature per connected polygon. Vectorised over the parts:
    a noisy prediction has 10^5 of them."""
    features = []
    for k, region in sorted(regions.items()):
        parts = shapely.transform(shapely.get_parts(region), lambda xy: xy * scale)
        if tolerance > 0:
            parts = simplified(parts, tolerance)
        parts = parts[~shapely.is_empty(parts) & (shapely.area(parts) > 0)]
        name = (names or {}).get(k, f"class {k}")
        colour = list(CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)])
        properties = json.dumps({"objectType": "annotation", "classification": {"name": name, "color": colour}})
        features += [f'{{"type":"Feature","geometry":{g},"properties":{properties}}}'
                     for g in shapely.to_geojson(parts).tolist()]
    return '{"type":"FeatureCollection","features":[' + ",".join(features) + "]}"


def simplified(parts: np.ndarray, tolerance: float) -> np.ndarray:
    """Polygons with every ring simplified on its own (Douglas-Peucker, all rings at once), holes that
    collapse dropped, polygons whose outer ring collapses (thinner than the tolerance) dropped, and the rare
    polygon whose rings then cross repaired by make_valid. GEOS's topology-preserving simplifier does the same
    job but takes minutes on a noisy region with 10^5 holes."""
    rings, owner = shapely.get_rings(parts, return_index=True)
    rings = shapely.simplify(rings, tolerance)
    usable = (shapely.get_num_coordinates(rings) >= 4) & (shapely.area(shapely.polygons(rings)) > 0)
    shell = np.r_[True, owner[1:] != owner[:-1]]
    kept_parts = np.unique(owner[shell & usable])
    keep = usable & np.isin(owner, kept_parts)
    if not keep.any():
        return np.array([], dtype=object)
    polygons = shapely.polygons(rings[keep], indices=np.searchsorted(kept_parts, owner[keep]))
    broken = ~shapely.is_valid(polygons)
    for i in np.flatnonzero(broken):
        polygons[i] = polygonal_part(shapely.make_valid(polygons[i])) or Polygon()
    return shapely.get_parts(polygons)


def polygonal_part(geom):
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    found = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
    return shapely.union_all(found) if found else None


# --- what segment_image asks for -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SlideOutputs:
    """The outputs of `cocofast.segment.segment_image` beyond the mask and overlay.

    probabilities: a pyramidal TIFF of per-class probabilities at the resolution the network ran at;
    geojson: the predicted regions as QuPath GeoJSON (level-0 coordinates), simplified to `tolerance` level-0
    pixels (None: one network pixel); skip_glass: windows with no tissue on the thumbnail (`tissue_method`,
    `tissue_threshold`, None: Otsu) are not run through the network but given the background class.
    """

    probabilities: Path | None = None
    probability_dtype: str = "uint8"
    geojson: Path | None = None
    tolerance: float | None = None
    class_names: dict = field(default_factory=dict)
    skip_glass: bool = False
    tissue_method: str = "saturation"
    tissue_threshold: float | None = None


class BandOutputs:
    """Receives each band's probabilities and labels (network resolution) for the files SlideOutputs names."""

    def __init__(self, stack, outputs: SlideOutputs, height: int, width: int, num_classes: int, scale: float,
                 mpp: float | None):
        from cocofast.io import atomic_path

        self.outputs, self.scale = outputs, scale
        self.pyramid = self.regions = None
        if outputs.probabilities is not None:
            self.pyramid = ProbabilityPyramid(stack.enter_context(atomic_path(outputs.probabilities)), height, width,
                                              num_classes, outputs.probability_dtype, mpp)
        if outputs.geojson is not None:
            self.geojson_path = stack.enter_context(atomic_path(outputs.geojson))
            self.regions = RegionCollector(height, width, num_classes, folder=Path(outputs.geojson).parent)

    def add(self, top: int, probabilities, labels: np.ndarray) -> None:
        if self.pyramid is not None:
            self.pyramid.write(probabilities)
        if self.regions is not None:
            self.regions.add(top, labels)

    def close(self) -> None:
        if self.pyramid is not None:
            self.pyramid.close()
        if self.regions is not None:
            tolerance = self.scale if self.outputs.tolerance is None else self.outputs.tolerance
            Path(self.geojson_path).write_text(regions_geojson(self.regions.regions(), self.scale, tolerance,
                                                               self.outputs.class_names))


def glass_windows(image, outputs: SlideOutputs, scale: float, window: tuple[int, int], reader: str = "auto"):
    """skip(y, x) for `blended_bands`: True when the window at (y, x) (network pixels, `scale` level-0 pixels
    each) holds no tissue on the slide's thumbnail, one thumbnail pixel of margin included."""
    from .tissue import tissue_mask

    tissue = tissue_mask(image, outputs.tissue_method, outputs.tissue_threshold, reader)
    ratio = scale / tissue.scale  # thumbnail pixels per network pixel
    mask = tissue.mask

    def skip(y: int, x: int) -> bool:
        r0, c0 = max(int(y * ratio) - 1, 0), max(int(x * ratio) - 1, 0)
        r1, c1 = int(np.ceil((y + window[0]) * ratio)) + 1, int(np.ceil((x + window[1]) * ratio)) + 1
        return not mask[r0:r1, c0:c1].any()

    return skip
