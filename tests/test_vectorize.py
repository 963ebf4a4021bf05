"""Tests for geoseg.vectorize: strip-wise polygonizing must equal whole-mask rasterio shapes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import rasterio.features
import shapely
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapely.geometry import shape

from geoseg.vectorize import RegionPolygon, StripPolygonizer, polygonize

UTM = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4_000_000.0)
GEOGRAPHIC = Affine(1e-4, 0.0, 12.3456, 0.0, -1e-4, 45.6789)
ROTATED = Affine(2.0, 0.5, 1000.0, 0.25, -2.0, 5000.0)


def _pixel_area(transform: Affine) -> float:
    return abs(transform.a * transform.e - transform.b * transform.d)


def _reference(mask: np.ndarray, transform: Affine, nodata: int) -> list[tuple[int, float]]:
    """(class, area) of each polygon of whole-mask rasterio shapes, the behaviour to match."""
    data = (
        mask if mask.dtype in (np.uint8, np.int16, np.uint16, np.int32) else mask.astype(np.int32)
    )
    return [
        (int(value), shape(geom).area)
        for geom, value in rasterio.features.shapes(
            data, mask=mask != nodata, connectivity=4, transform=transform
        )
    ]


def assert_matches_shapes(
    mask: np.ndarray, transform: Affine, nodata: int, strip_rows: int
) -> list[RegionPolygon]:
    """Polygonizes in strips and checks the result against whole-mask shapes."""
    out = polygonize(mask, transform, nodata, strip_rows=strip_rows)
    ref = _reference(mask, transform, nodata)
    pixel_area = _pixel_area(transform)

    assert len(out) == len(ref)
    # Same multiset of (class, size): sizes compared in pixels (exact), then areas to 1e-6 rel.
    assert Counter((p.class_id, p.pixel_count) for p in out) == Counter(
        (c, round(a / pixel_area)) for c, a in ref
    )
    got = sorted((p.class_id, p.geometry.area) for p in out)
    want = sorted(ref)
    for (gc, ga), (wc, wa) in zip(got, want, strict=True):
        assert gc == wc
        assert ga == pytest.approx(wa, rel=1e-6)
    for p in out:
        assert isinstance(p.geometry, shapely.Polygon)
        assert p.geometry.is_valid, shapely.is_valid_reason(p.geometry)
        assert p.pixel_count * pixel_area == pytest.approx(p.geometry.area, rel=1e-6)
    # Pixel counts add up to the class histogram of the mask.
    valid = mask[mask != nodata]
    classes, counts = np.unique(valid, return_counts=True)
    per_class: Counter[int] = Counter()
    for p in out:
        per_class[p.class_id] += p.pixel_count
    assert per_class == {int(c): int(n) for c, n in zip(classes, counts, strict=True)}
    return out


# --------------------------------------------------------------------------- property test


@st.composite
def blob_masks(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    """Small masks painted from rectangles, rings (with holes), disks and noise patches."""
    h = draw(st.integers(1, 40))
    w = draw(st.integers(1, 40))
    nodata = draw(st.sampled_from([0, 7]))
    palette = [c for c in range(draw(st.integers(1, 4)) + 1) if c != nodata][:4]
    values = st.sampled_from([*palette, nodata])
    dtype = draw(st.sampled_from([np.uint8, np.int16, np.uint16, np.int32, np.int64]))
    mask = np.full((h, w), draw(values), dtype=dtype)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(draw(st.integers(0, 10))):
        kind = draw(st.sampled_from(["rect", "ring", "disk", "noise"]))
        y0, y1 = sorted(draw(st.tuples(st.integers(0, h), st.integers(0, h))))
        x0, x1 = sorted(draw(st.tuples(st.integers(0, w), st.integers(0, w))))
        value = draw(values)
        if kind == "rect":
            mask[y0:y1, x0:x1] = value
        elif kind == "ring":
            t = draw(st.integers(1, 3))
            ring = np.zeros((h, w), dtype=bool)
            ring[y0:y1, x0:x1] = True
            ring[y0 + t : y1 - t, x0 + t : x1 - t] = False
            mask[ring] = value
        elif kind == "disk":
            r = draw(st.floats(0.5, 12.0))
            mask[(yy - (y0 + y1) / 2) ** 2 + (xx - (x0 + x1) / 2) ** 2 <= r * r] = value
        else:
            patch = rng.random((y1 - y0, x1 - x0)) < draw(st.floats(0.05, 0.6))
            mask[y0:y1, x0:x1][patch] = value
    strip_rows = draw(st.integers(1, h))
    return mask, nodata, strip_rows


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=blob_masks(), transform=st.sampled_from([Affine.identity(), UTM, GEOGRAPHIC]))
def test_matches_whole_mask_shapes(case: tuple[np.ndarray, int, int], transform: Affine) -> None:
    mask, nodata, strip_rows = case
    assert_matches_shapes(mask, transform, nodata, strip_rows)


# --------------------------------------------------------------------------- explicit cases


def test_ring_enclosing_other_class_across_three_strips() -> None:
    mask = np.zeros((9, 9), dtype=np.uint8)
    mask[1:8, 1:8] = 1
    mask[3:6, 3:6] = 2  # 3x3 island of class 2 inside the class-1 ring
    out = assert_matches_shapes(mask, Affine.identity(), nodata=0, strip_rows=3)
    ring = next(p for p in out if p.class_id == 1)
    assert ring.pixel_count == 49 - 9
    assert ring.geometry.area == 40
    assert len(ring.geometry.interiors) == 1
    assert shapely.Polygon(ring.geometry.interiors[0]).area == 9
    island = next(p for p in out if p.class_id == 2)
    assert island.geometry.area == 9
    # The ring's outer boundary spans all three strips: one polygon, not three pieces.
    assert len(out) == 2


def test_regions_are_returned_as_soon_as_complete() -> None:
    mask = np.zeros((9, 9), dtype=np.uint8)
    mask[1:8, 1:8] = 1
    mask[4, 3:6] = 2  # island strictly inside the middle strip (rows 3..5)
    sp = StripPolygonizer(Affine.identity(), 9, 9, nodata=0)
    assert sp.add_strip(0, mask[0:3]) == []  # the ring touches the seam: still open
    second = sp.add_strip(3, mask[3:6])
    assert [(p.class_id, p.pixel_count) for p in second] == [(2, 3)]
    third = sp.add_strip(6, mask[6:9])
    # Row 8 is nodata, so the ring cannot grow any more: it is returned before finish().
    assert [(p.class_id, p.pixel_count) for p in third] == [(1, 46)]
    assert sp.finish() == []


@pytest.mark.parametrize("strip_rows", [1, 2, 3, 5, 8])
def test_u_shape_joins_in_bottom_strip(strip_rows: int) -> None:
    mask = np.zeros((8, 7), dtype=np.uint8)
    mask[0:8, 0:2] = 1  # left arm
    mask[0:8, 5:7] = 1  # right arm
    mask[6:8, :] = 1  # joined at the bottom
    mask[0:6, 2:5] = 2  # class 2 between the arms, open at the top
    out = assert_matches_shapes(mask, UTM, nodata=0, strip_rows=strip_rows)
    assert sorted((p.class_id, p.pixel_count) for p in out) == [(1, 38), (2, 18)]


def test_pieces_join_only_later_and_nested_u() -> None:
    """Two open pieces of one region stay apart for several strips, plus an inverted U."""
    mask = np.zeros((12, 9), dtype=np.uint8)
    mask[:, 0] = 1
    mask[:, 8] = 1
    mask[11, :] = 1  # joins the arms in the last row only
    mask[2, 2:7] = 3  # inverted U of class 3: splits into two pieces below row 2
    mask[2:9, 2] = 3
    mask[2:9, 6] = 3
    for strip_rows in (1, 2, 4):
        out = assert_matches_shapes(mask, Affine.identity(), 0, strip_rows)
        assert sorted((p.class_id, p.pixel_count) for p in out) == [(1, 31), (3, 17)]


def test_diagonal_checkerboard_does_not_merge_at_corners() -> None:
    yy, xx = np.mgrid[0:10, 0:10]
    mask = ((yy + xx) % 2 + 1).astype(np.uint8)
    for strip_rows in (1, 3, 10):
        out = assert_matches_shapes(mask, UTM, nodata=0, strip_rows=strip_rows)
        assert len(out) == 100
        assert all(p.pixel_count == 1 for p in out)


def test_diagonal_staircase_of_one_class_is_many_regions() -> None:
    mask = np.eye(6, dtype=np.uint8) * 5  # class 5 on the diagonal, nodata elsewhere
    out = assert_matches_shapes(mask, Affine.identity(), nodata=0, strip_rows=1)
    assert len(out) == 6


def test_single_row_image() -> None:
    mask = np.array([[1, 1, 2, 0, 2, 2, 2, 3]], dtype=np.int32)
    out = assert_matches_shapes(mask, UTM, nodata=0, strip_rows=1)
    assert sorted((p.class_id, p.pixel_count) for p in out) == [(1, 2), (2, 1), (2, 3), (3, 1)]


def test_all_nodata_gives_no_polygons() -> None:
    mask = np.full((20, 15), 255, dtype=np.uint8)
    assert polygonize(mask, UTM, nodata=255, strip_rows=4) == []


def test_nodata_rows_between_strips() -> None:
    mask = np.ones((10, 6), dtype=np.uint8)
    mask[4:6] = 0
    out = assert_matches_shapes(mask, UTM, nodata=0, strip_rows=2)
    assert len(out) == 2


@pytest.mark.parametrize("transform", [UTM, GEOGRAPHIC, ROTATED], ids=["utm", "geo", "rotated"])
def test_areas_and_coordinates_in_map_units(transform: Affine) -> None:
    mask = np.zeros((30, 25), dtype=np.uint16)
    mask[2:27, 3:20] = 4
    mask[10:15, 8:12] = 0  # a nodata hole
    out = assert_matches_shapes(mask, transform, nodata=0, strip_rows=7)
    (poly,) = out
    assert poly.pixel_count == 25 * 17 - 5 * 4
    assert poly.geometry.area == pytest.approx(poly.pixel_count * _pixel_area(transform))
    # The outline's corners are the transformed pixel corners.
    vertices = np.asarray(poly.geometry.exterior.coords)
    scale = max(abs(transform.c), abs(transform.f))
    for col, row in [(3, 2), (20, 2), (20, 27), (3, 27)]:
        x, y = transform @ (col, row)
        assert np.hypot(vertices[:, 0] - x, vertices[:, 1] - y).min() <= 1e-12 * scale


def test_wide_dtype_is_cast_and_out_of_range_rejected() -> None:
    mask = np.full((4, 4), 2**40, dtype=np.int64)  # nodata beyond int32 is fine: masked out
    mask[1:3, 1:3] = 70_000
    (poly,) = polygonize(mask, UTM, nodata=2**40, strip_rows=1)
    assert (poly.class_id, poly.pixel_count) == (70_000, 4)
    mask[0, 0] = 2**35
    with pytest.raises(ValueError, match="int32"):
        polygonize(mask, UTM, nodata=2**40)


# --------------------------------------------------------------------------- misuse


def test_strips_out_of_order_name_expected_row_off() -> None:
    sp = StripPolygonizer(UTM, 5, 10, nodata=0)
    sp.add_strip(0, np.ones((4, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="expected row_off=4"):
        sp.add_strip(5, np.ones((2, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="expected row_off=4"):
        sp.add_strip(0, np.ones((2, 5), dtype=np.uint8))


def test_finish_with_missing_rows_raises() -> None:
    sp = StripPolygonizer(UTM, 5, 10, nodata=0)
    sp.add_strip(0, np.ones((4, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="row_off=4"):
        sp.finish()


@pytest.mark.parametrize(
    "strip",
    [np.ones((2, 4), np.uint8), np.ones((0, 5), np.uint8), np.ones((2, 5), np.float32)],
    ids=["wrong-width", "no-rows", "float"],
)
def test_bad_strip_raises(strip: np.ndarray) -> None:
    sp = StripPolygonizer(UTM, 5, 10, nodata=0)
    with pytest.raises(ValueError):
        sp.add_strip(0, strip)


def test_strip_past_height_and_after_finish_raise() -> None:
    sp = StripPolygonizer(UTM, 5, 3, nodata=0)
    with pytest.raises(ValueError, match="past the mask height"):
        sp.add_strip(0, np.ones((4, 5), dtype=np.uint8))
    sp.add_strip(0, np.ones((3, 5), dtype=np.uint8))
    assert len(sp.finish()) == 1
    with pytest.raises(ValueError):
        sp.add_strip(3, np.ones((1, 5), dtype=np.uint8))
    with pytest.raises(ValueError):
        sp.finish()


# --------------------------------------------------------------------------- size


def _blob_mask(h: int, w: int, classes: int, seed: int) -> np.ndarray:
    """Random blobs: argmax of smoothed noise fields, upsampled 4x, ~5% nodata (0)."""
    rng = np.random.default_rng(seed)
    ch, cw = h // 4 + 1, w // 4 + 1

    def smooth(a: np.ndarray, r: int = 3) -> np.ndarray:
        # Box blur along both axes via cumulative sums (no scipy in the environment).
        for axis in (0, 1):
            p = np.pad(a, [(r, r) if ax == axis else (0, 0) for ax in (0, 1)], mode="edge")
            c = np.cumsum(p, axis=axis)
            c = np.insert(c, 0, 0.0, axis=axis)
            n = a.shape[axis]
            hi = c.take(np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis)
            a = hi - c.take(np.arange(n), axis=axis)
        return a

    fields = np.stack([smooth(rng.random((ch, cw))) for _ in range(classes)])
    coarse = (fields.argmax(axis=0) + 1).astype(np.uint8)
    holes = smooth(rng.random((ch, cw)))
    coarse[holes > np.quantile(holes, 0.95)] = 0
    return np.repeat(np.repeat(coarse, 4, axis=0), 4, axis=1)[:h, :w]


def test_large_blob_mask_matches_whole_mask_shapes() -> None:
    mask = _blob_mask(2000, 2000, classes=4, seed=7)
    out = polygonize(mask, UTM, nodata=0, strip_rows=256)
    ref = _reference(mask, UTM, 0)
    assert len(out) == len(ref) > 1000
    pixel_area = _pixel_area(UTM)
    assert Counter((p.class_id, p.pixel_count) for p in out) == Counter(
        (c, round(a / pixel_area)) for c, a in ref
    )
    assert all(p.geometry.area == pytest.approx(p.pixel_count * pixel_area) for p in out)
