"""cocofast.overlay: outlines (not filled regions), their width and colours, and band-by-band streaming."""
from __future__ import annotations

import numpy as np
import pytest

from cocofast.overlay import OUTLINE_COLOURS, OutlineStream, display_rgb, draw_outlines, outline_labels


def square_labels(size=40, top=10, bottom=30, left=8, right=28, cls=1):
    labels = np.zeros((size, size), np.uint8)
    labels[top:bottom, left:right] = cls
    return labels


def test_outline_is_a_ring_of_the_given_width_inside_the_region():
    labels = square_labels()
    ring = outline_labels(labels, thickness=3)
    inside = np.zeros_like(labels, bool)
    inside[13:27, 11:25] = True  # the square shrunk by 3 pixels on every side stays untouched
    assert np.all(ring[inside] == 0) and np.all(ring[labels == 0] == 0)
    assert np.all(ring[(labels == 1) & ~inside] == 1)
    assert outline_labels(labels, thickness=1).sum() == 20 * 20 - 18 * 18


def test_regions_touching_the_image_border_get_no_outline_along_it():
    labels = square_labels(top=0, bottom=20, left=0, right=40)
    ring = outline_labels(labels, thickness=2)
    assert np.all(ring[:18] == 0) and np.all(ring[18:20] == 1)


def test_draw_outlines_colours_only_the_outline_and_keeps_the_tissue():
    rgb = np.full((40, 40, 3), (200, 120, 180), np.uint8)  # H&E pink
    labels = square_labels(cls=2)
    labels[0:5, 0:5] = 1
    out = draw_outlines(rgb, labels, thickness=2)
    ring = outline_labels(labels, thickness=2)
    assert np.all(out[ring == 0] == rgb[ring == 0])  # filled interiors are not tinted
    assert np.all(out[ring == 2] == OUTLINE_COLOURS[2]) and np.all(out[ring == 1] == OUTLINE_COLOURS[1])
    with pytest.raises(ValueError, match="differ in size"):
        draw_outlines(rgb[:10], labels)


@pytest.mark.parametrize("band_rows", [1, 2, 7, 64])
def test_streamed_outlines_equal_the_whole_image(band_rows):
    rng = np.random.default_rng(band_rows)
    labels = (rng.random((50, 33)) < 0.3).astype(np.uint8) + (rng.random((50, 33)) < 0.1)
    stream, rows = OutlineStream(50, thickness=3), []
    for top in range(0, 50, band_rows):
        first, out = stream.push(labels[top:top + band_rows])
        assert first == sum(len(r) for r in rows)
        rows.append(out)
    assert np.array_equal(np.concatenate(rows), outline_labels(labels, thickness=3))
    with pytest.raises(ValueError, match="50 rows high"):
        stream.push(labels[:1])


def test_display_rgb_scales_any_dtype_to_uint8_rgb():
    gray16 = np.full((2, 3), 65535, np.uint16)
    assert np.array_equal(display_rgb(gray16), np.full((2, 3, 3), 255, np.uint8))
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0] = 128
    assert display_rgb(rgba).shape == (2, 3, 3) and display_rgb(rgba)[0, 0, 0] == 128
