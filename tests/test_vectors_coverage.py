"""Sieve, hole filling, coverage simplification and attributes of geoseg.vectorize (pure).

The sieve is checked against a brute-force raster implementation of its documented rule, and
every option against the one property that makes strip-wise processing trustworthy: the result
is the same, vertex for vertex, whatever the strip size.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import shapely
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyproj import CRS

from geoseg.errors import ConfigError, InputError
from geoseg.measure import Quantity, parse_area, parse_length, row_pixel_areas_m2
from geoseg.vectorize import (
    CoverageOptions,
    PolygonLayer,
    StripPolygonizer,
    edge_match,
    normal_form,
    polygonize,
    vectorize_strips,
)

UTM = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4_000_000.0)
UTM_WKT = CRS.from_epsg(32633).to_wkt()
GEO = Affine(1e-4, 0.0, 12.0, 0.0, -1e-4, 60.0)
GEO_WKT = CRS.from_epsg(4326).to_wkt()
NODATA = 0


def run(
    mask: np.ndarray,
    strip_rows: int,
    options: CoverageOptions | None = None,
    confidence: np.ndarray | None = None,
    transform: Affine = UTM,
    crs_wkt: str = UTM_WKT,
) -> PolygonLayer:
    h, w = mask.shape
    strips = (
        (
            r,
            mask[r : r + strip_rows],
            None if confidence is None else confidence[r : r + strip_rows],
        )
        for r in range(0, h, strip_rows)
    )
    return vectorize_strips(
        strips, transform, w, h, NODATA, crs_wkt, options, with_confidence=confidence is not None
    )


def signature(layer: PolygonLayer) -> tuple[object, ...]:
    """Everything a user sees, exactly (WKB of the geometries, not just their areas)."""
    return (
        layer.class_ids.tolist(),
        layer.pixel_counts.tolist(),
        [g.wkb for g in layer.geometries],
        np.nan_to_num(layer.confidence_mean, nan=-1.0).round(12).tolist(),
        layer.area_m2.round(6).tolist(),
    )


def assert_clean_coverage(layer: PolygonLayer, covered_area: float | None = None) -> None:
    """Valid polygons, no overlaps (pairwise intersections ~0), no gaps (union = sum)."""
    geoms = layer.geometries
    assert all(isinstance(g, shapely.Polygon) for g in geoms)
    assert shapely.is_valid(geoms).all()
    total = float(shapely.area(geoms).sum())
    union = shapely.union_all(geoms).area if len(geoms) else 0.0
    assert union == pytest.approx(total, rel=1e-9, abs=1e-6)
    a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    pairs = a < b
    overlap = shapely.area(shapely.intersection(geoms[a[pairs]], geoms[b[pairs]])).sum()
    assert overlap == pytest.approx(0.0, abs=1e-6)
    if covered_area is not None:
        assert total == pytest.approx(covered_area, rel=1e-9)


# --------------------------------------------------------------------------- raster reference


def _components(m: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """4-connected components: label image and (class, size, first pixel) per component."""
    h, w = m.shape
    lab = np.full((h, w), -1, np.int64)
    comps: list[tuple[int, int, int]] = []
    for r in range(h):
        for c in range(w):
            if m[r, c] == NODATA or lab[r, c] >= 0:
                continue
            k, v, n = len(comps), m[r, c], 0
            lab[r, c] = k
            queue = deque([(r, c)])
            while queue:
                y, x = queue.popleft()
                n += 1
                for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= yy < h and 0 <= xx < w and lab[yy, xx] < 0 and m[yy, xx] == v:
                        lab[yy, xx] = k
                        queue.append((yy, xx))
            comps.append((int(v), n, r * w + c))
    return lab, comps


def reference_sieve(mask: np.ndarray, threshold: int) -> np.ndarray:
    """The documented sieve rule, applied literally on the raster, one region at a time."""
    m = mask.copy()
    while True:
        lab, comps = _components(m)
        adj: dict[int, dict[int, int]] = {}
        for a, b in ((lab[:, :-1], lab[:, 1:]), (lab[:-1], lab[1:])):
            differ = (a != b) & (a >= 0) & (b >= 0)
            for x, y in zip(a[differ].tolist(), b[differ].tolist(), strict=True):
                adj.setdefault(x, {})[y] = adj.setdefault(x, {}).get(y, 0) + 1
                adj.setdefault(y, {})[x] = adj.setdefault(y, {}).get(x, 0) + 1
        small = [k for k, (_, n, _) in enumerate(comps) if n < threshold and adj.get(k)]
        if not small:
            return m
        k = min(small, key=lambda i: (comps[i][1], comps[i][2]))
        nb = adj[k]
        target = max(nb, key=lambda j: (nb[j], comps[j][1], -comps[j][2]))
        m[lab == k] = comps[target][0]


@st.composite
def masks(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """Small blocky masks with speckle and some nodata, and a strip size."""
    h, w = draw(st.integers(1, 18)), draw(st.integers(1, 18))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    k = draw(st.integers(1, 4))
    blocks = rng.integers(0, 5, (h // k + 1, w // k + 1))
    mask = np.repeat(np.repeat(blocks, k, 0), k, 1)[:h, :w].astype(np.uint8)
    speckle = rng.random((h, w)) < draw(st.floats(0.0, 0.4))
    mask[speckle] = rng.integers(0, 5, int(speckle.sum()))
    return mask, draw(st.integers(1, h))


# --------------------------------------------------------------------------- region tracking


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=masks())
def test_adjacency_and_sums_match_brute_force(case: tuple[np.ndarray, int]) -> None:
    """Shared edge lengths per class pair and per-region value sums, any strip size."""
    mask, strip_rows = case
    h, w = mask.shape
    values = np.arange(h * w, dtype=np.float64).reshape(h, w)
    sp = StripPolygonizer(Affine.identity(), w, h, NODATA, track_regions=True)
    regions = []
    for r in range(0, h, strip_rows):
        regions += sp.add_strip(r, mask[r : r + strip_rows], [values[r : r + strip_rows]])
    regions += sp.finish()
    class_of = {p.region_id: p.class_id for p in regions}
    got: dict[tuple[int, int], int] = {}
    for a, b, n in zip(*(x.tolist() for x in sp.adjacency()), strict=True):
        key = tuple(sorted((class_of[a], class_of[b])))
        got[key] = got.get(key, 0) + n  # type: ignore[index]
    want: dict[tuple[int, int], int] = {}
    for a, b in ((mask[:, :-1], mask[:, 1:]), (mask[:-1], mask[1:])):
        differ = (a != b) & (a != NODATA) & (b != NODATA)
        for x, y in zip(a[differ].tolist(), b[differ].tolist(), strict=True):
            key = (min(x, y), max(x, y))
            want[key] = want.get(key, 0) + 1
    assert got == want
    lab, comps = _components(mask)
    by_first = {f: values[lab == k].sum() for k, (_, _, f) in enumerate(comps)}
    for p in regions:
        ys, xs = np.nonzero(
            shapely.contains_xy(p.geometry, *np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5))
        )
        assert p.sums == (by_first[int(ys[0]) * w + int(xs[0])],)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=masks())
def test_sums_without_adjacency_skip_nodata_values(case: tuple[np.ndarray, int]) -> None:
    """Regions' sums with ``adjacency=False`` (what a run without a sieve makes): NaN values on
    nodata pixels never reach a region, and there is no adjacency graph to ask for."""
    mask, strip_rows = case
    h, w = mask.shape
    values = np.arange(h * w, dtype=np.float64).reshape(h, w)
    values[mask == NODATA] = np.nan
    sp = StripPolygonizer(Affine.identity(), w, h, NODATA, track_regions=True, adjacency=False)
    regions = []
    for r in range(0, h, strip_rows):
        regions += sp.add_strip(r, mask[r : r + strip_rows], [values[r : r + strip_rows]])
    regions += sp.finish()
    lab, comps = _components(mask)
    by_first = {f: values[lab == k].sum() for k, (_, _, f) in enumerate(comps)}
    assert len(regions) == len(comps)
    for p in regions:
        ys, xs = np.nonzero(
            shapely.contains_xy(p.geometry, *np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5))
        )
        assert p.sums == (by_first[int(ys[0]) * w + int(xs[0])],)
    with pytest.raises(InputError, match="adjacency=True"):
        sp.adjacency()


# --------------------------------------------------------------------------- sieve


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=masks(), threshold=st.integers(1, 12))
def test_sieve_equals_raster_reference_for_any_strip_size(
    case: tuple[np.ndarray, int], threshold: int
) -> None:
    mask, strip_rows = case
    options = CoverageOptions(min_area=Quantity(threshold, "px"))
    layer = run(mask, strip_rows, options)
    want = polygonize(reference_sieve(mask, threshold), UTM, NODATA)
    assert sorted(zip(layer.class_ids.tolist(), layer.pixel_counts.tolist(), strict=True)) == (
        sorted((p.class_id, p.pixel_count) for p in want)
    )
    for class_id in set(layer.class_ids.tolist()):
        got = shapely.union_all(layer.geometries[layer.class_ids == class_id])
        ref = shapely.union_all([p.geometry for p in want if p.class_id == class_id])
        assert got.symmetric_difference(ref).area == pytest.approx(0.0, abs=1e-6)
    # A removed region leaves no gap: the valid pixels are all still covered.
    assert_clean_coverage(layer, covered_area=float((mask != NODATA).sum()) * 100.0)
    assert signature(layer) == signature(run(mask, mask.shape[0], options))


def test_sieve_merges_into_longest_boundary_and_joins_same_class_neighbours() -> None:
    mask = np.full((6, 9), 1, dtype=np.uint8)
    mask[:, 5:] = 2
    mask[2:4, 4:6] = 3  # 4 px of class 3 on the seam: 3 edges with class 1, 3 with class 2
    mask[2:4, 3] = 3  # now 6 px: 4 edges to class 1 (left + top/bottom), 3 to class 2
    layer = run(mask, 2, CoverageOptions(min_area=Quantity(7, "px")))
    # Class 3 shares 6 edges with class 1 and 4 with class 2: it becomes class 1.
    assert sorted(zip(layer.class_ids.tolist(), layer.pixel_counts.tolist(), strict=True)) == [
        (1, 26 + 6),
        (2, 22),
    ]
    # A speck between two class-1 regions (equal boundaries everywhere, the earlier of the two
    # largest neighbours wins) turns class 1 and so joins both into one region.
    bridge = np.array([[1, 1, 2, 1, 1], [1, 1, 3, 1, 1], [1, 1, 2, 1, 1]], dtype=np.uint8)
    layer = run(bridge, 1, CoverageOptions(min_area=Quantity(2, "px")))
    assert layer.class_ids.tolist() == [1] and layer.pixel_counts.tolist() == [15]
    assert not layer.geometries[0].interiors


def test_sieve_keeps_a_small_region_with_only_nodata_around() -> None:
    mask = np.zeros((5, 5), dtype=np.uint8)
    mask[2, 2] = 4
    layer = run(mask, 2, CoverageOptions(min_area=Quantity(10, "px")))
    assert layer.pixel_counts.tolist() == [1]


def test_sieve_in_m2_geographic_uses_ground_areas() -> None:
    # At 60°N a 1e-4° pixel is about 11.1 m x 5.6 m = 62 m²: 3 px ≈ 186 m² < 200 m² < 4 px.
    mask = np.full((8, 8), 1, dtype=np.uint8)
    mask[1, 1:4] = 2
    mask[5, 1:5] = 3
    layer = run(mask, 3, CoverageOptions(min_area=Quantity(200, "m2")), None, GEO, GEO_WKT)
    assert sorted(layer.class_ids.tolist()) == [1, 3]
    area = row_pixel_areas_m2(GEO, GEO_WKT, 0, 1, 8)[0]
    assert 3 * area < 200 < 4 * area
    # Ground area is geodesic: a pixel here is far from 1e-8 square degrees.
    assert layer.area_m2.sum() == pytest.approx(64 * area, rel=1e-3)


# --------------------------------------------------------------------------- hole filling


def test_fill_holes_merges_small_enclosed_regions_and_nodata() -> None:
    mask = np.full((10, 12), 1, dtype=np.uint8)
    mask[2:4, 2:4] = 2  # 4 px hole of class 2: filled
    mask[6, 2] = NODATA  # 1 px nodata hole: filled (covered by the polygon)
    mask[2:7, 6:11] = 3  # 25 px: kept ...
    mask[4, 8] = 2  # ... with its own 1 px hole, which it fills
    layer = run(mask, 3, CoverageOptions(fill_holes_below=Quantity(10, "px")))
    by_class = dict(zip(layer.class_ids.tolist(), layer.geometries, strict=True))
    assert sorted(by_class) == [1, 3]
    assert len(by_class[1].interiors) == 1  # only the 25 px hole of class 3 remains
    assert shapely.Polygon(by_class[1].interiors[0]).area == 25 * 100
    assert not by_class[3].interiors
    counts = dict(zip(layer.class_ids.tolist(), layer.pixel_counts.tolist(), strict=True))
    assert counts == {1: 120 - 25 - 1, 3: 25}  # the nodata pixel is covered, not counted
    assert_clean_coverage(layer, covered_area=120 * 100.0)


def test_fill_holes_nested_outermost_first() -> None:
    mask = np.full((9, 9), 1, dtype=np.uint8)
    mask[2:7, 2:7] = 2
    mask[4, 4] = 3  # hole in 2, which is a hole in 1
    small = run(mask, 2, CoverageOptions(fill_holes_below=Quantity(2, "px")))
    assert sorted(small.pixel_counts.tolist()) == [25, 56]
    big = run(mask, 2, CoverageOptions(fill_holes_below=Quantity(30, "px")))
    assert big.class_ids.tolist() == [1] and big.pixel_counts.tolist() == [81]
    assert not big.geometries[0].interiors


# --------------------------------------------------------------------------- simplification


def _blobs(h: int, w: int, classes: int, seed: int) -> np.ndarray:
    """Smooth class blobs (bilinear upsampling of random fields, argmax), no nodata."""
    rng = np.random.default_rng(seed)
    fields = rng.random((classes, h // 16 + 2, w // 16 + 2))
    ys, xs = np.linspace(0, fields.shape[1] - 1.001, h), np.linspace(0, fields.shape[2] - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    f = fields[:, y0][:, :, x0] * (1 - fy) * (1 - fx) + fields[:, y0 + 1][:, :, x0] * fy * (1 - fx)
    f += fields[:, y0][:, :, x0 + 1] * (1 - fy) * fx + fields[:, y0 + 1][:, :, x0 + 1] * fy * fx
    return (f.argmax(axis=0) + 1).astype(np.uint8)


@pytest.mark.parametrize("tolerance", [Quantity(1, "px"), Quantity(25, "m")])
def test_simplify_keeps_a_clean_coverage(tolerance: Quantity) -> None:
    mask = _blobs(160, 200, 6, seed=3)
    exact = run(mask, 160)
    layer = run(mask, 37, CoverageOptions(simplify=tolerance))
    assert len(layer) == len(exact)
    assert shapely.get_num_coordinates(layer.geometries).sum() < 0.6 * (
        shapely.get_num_coordinates(exact.geometries).sum()
    )
    assert_clean_coverage(layer)
    # The frame stays put (no nodata): the union is the whole image, so no gap opened.
    assert shapely.union_all(layer.geometries).area == pytest.approx(160 * 200 * 100.0)
    # Each polygon moves by a fraction of a pixel per vertex, not more.
    pixel_tol = 1.0 if tolerance.unit == "px" else 2.5
    moved = shapely.area(shapely.symmetric_difference(layer.geometries, exact.geometries))
    perimeter_px = shapely.length(exact.geometries) / 10.0
    assert (moved / 100.0 <= perimeter_px * pixel_tol).all()
    assert signature(layer) == signature(run(mask, 160, CoverageOptions(simplify=tolerance)))


def test_all_options_are_independent_of_strip_size() -> None:
    rng = np.random.default_rng(11)
    mask = _blobs(120, 90, 4, seed=5)
    speckle = rng.random(mask.shape) < 0.08
    mask[speckle] = rng.integers(0, 5, int(speckle.sum()))
    confidence = rng.integers(1, 256, mask.shape).astype(np.uint8)
    options = CoverageOptions(
        min_area=Quantity(300, "m2"),
        fill_holes_below=Quantity(40, "px"),
        simplify=Quantity(1, "px"),
    )
    results = {rows: signature(run(mask, rows, options, confidence)) for rows in (1, 7, 64, 120)}
    assert len({repr(r) for r in results.values()}) == 1
    assert_clean_coverage(run(mask, 7, options, confidence))


# --------------------------------------------------------------------------- attributes


def test_confidence_mean_is_exact_per_region_and_fid_order_is_raster_order() -> None:
    rng = np.random.default_rng(2)
    mask = _blobs(70, 50, 3, seed=9)
    mask[30:35, :] = NODATA
    confidence = rng.integers(1, 256, mask.shape).astype(np.uint8)
    layer = run(mask, 9, None, confidence)
    rows, cols = np.mgrid[0:70, 0:50]
    x, y = UTM @ (cols.ravel() + 0.5, rows.ravel() + 0.5)
    centres = shapely.points(x, y)
    first_pixels = []
    for geometry, mean, count in zip(
        layer.geometries, layer.confidence_mean, layer.pixel_counts, strict=True
    ):
        inside = shapely.contains(geometry, centres)
        assert inside.sum() == count
        assert mean == pytest.approx(confidence.ravel()[inside].mean() / 255, rel=1e-12)
        first_pixels.append(int(np.flatnonzero(inside)[0]))
    assert first_pixels == sorted(first_pixels)  # fid order: first pixel in raster order
    # Metric CRS: perimeters are plain lengths (holes included), areas plain areas.
    np.testing.assert_allclose(layer.perimeter_m, shapely.length(layer.geometries))
    np.testing.assert_allclose(layer.area_m2, layer.pixel_counts * 100.0)


def test_quantities_parse_and_reject() -> None:
    assert parse_area("20px") == Quantity(20, "px")
    assert parse_area("500m2") == Quantity(500, "m2")
    assert parse_area("0.5 ha") == Quantity(5000, "m2")
    assert parse_length("1px") == Quantity(1, "px")
    assert parse_length("2m") == Quantity(2, "m")
    for bad in ("20", "m2", "5 acres", "-3px"):
        with pytest.raises(ConfigError):
            parse_area(bad)
    with pytest.raises(ConfigError):
        parse_length("2m2")
    with pytest.raises(ConfigError):
        CoverageOptions(simplify=Quantity(1, "m2"))


def _pixel_polygons(mask: np.ndarray) -> np.ndarray:
    """Pixel-space polygons of a mask, as GDAL draws them."""
    polygonizer = StripPolygonizer(
        Affine.identity(), mask.shape[1], mask.shape[0], NODATA, pixel_space=True
    )
    polygons = polygonizer.add_strip(0, mask) + polygonizer.finish()
    return np.array([p.geometry for p in polygons], dtype=object)


def test_normal_form_drops_every_collinear_vertex_and_nothing_else() -> None:
    # The ring starts in the middle of an edge and has a collinear vertex on two more edges.
    ring = [(1, 0), (2, 0), (2, 1), (2, 2), (0, 2), (0, 1), (0, 0), (1, 0)]
    hole_ring = [(0.5, 2.5), (0.5, 3.5), (1.5, 3.5), (1.5, 2.5)]
    (square,) = normal_form(np.array([shapely.Polygon(ring)], dtype=object))
    assert shapely.get_coordinates(square).tolist() == [[0, 0], [0, 2], [2, 2], [2, 0], [0, 0]]
    # Anything not drawn in pixel space goes through GEOS, with the same result on this one.
    tilted = shapely.Polygon([(0, 0), (2, 2), (4, 4), (0, 4)], [hole_ring])
    (exact,) = normal_form(np.array([tilted], dtype=object))
    assert shapely.get_num_coordinates(exact) == 4 + 5
    assert shapely.equals(exact, tilted)
    # So does a MultiPolygon (never made from a mask, whose regions are 4-connected).
    pair = shapely.MultiPolygon([shapely.Polygon(ring), shapely.box(5, 5, 6, 6)])
    (both,) = normal_form(np.array([pair], dtype=object))
    assert shapely.get_num_coordinates(both) == 5 + 5
    assert shapely.equals(both, pair)
    # On a real coverage: what GEOS's simplify(g, 0) + normalize gives, vertex for vertex.
    mask = _blobs(120, 150, 5, seed=8)
    mask[np.random.default_rng(8).random(mask.shape) < 0.05] = 2
    geoms = _pixel_polygons(mask)
    ours = normal_form(geoms)
    geos = shapely.normalize(shapely.simplify(geoms, 0.0, preserve_topology=False))
    assert len(geoms) > 100
    assert shapely.equals_exact(ours, geos, tolerance=0).all()


def test_edge_match_inserts_the_t_junctions_only() -> None:
    # A wide region on top of two narrow ones, and a tall one left of two short ones.
    top = shapely.box(0, 0, 2, 1)
    below = [shapely.box(0, 1, 1, 2), shapely.box(1, 1, 2, 2)]
    tall = shapely.box(2, 0, 3, 2)
    right = [shapely.box(3, 0, 4, 1), shapely.box(3, 1, 4, 2)]
    geoms = normal_form(np.array([top, *below, tall, *right], dtype=object))
    matched = edge_match(geoms)
    assert shapely.equals(matched, geoms).all()
    added = [
        {tuple(c) for c in shapely.get_coordinates(m)}
        - {tuple(c) for c in shapely.get_coordinates(g)}
        for m, g in zip(matched, geoms, strict=True)
    ]
    # The tall one gains the corner where the three on its left meet and the one where the two
    # on its right meet.
    assert added == [{(1.0, 1.0)}, set(), set(), {(2.0, 1.0), (3.0, 1.0)}, set(), set()]


def test_edge_match_makes_the_coverage_edge_matched_like_segmentize() -> None:
    mask = _blobs(90, 110, 6, seed=4)
    mask[np.random.default_rng(4).random(mask.shape) < 0.04] = 1
    mask[30:50, 40:70] = NODATA  # a hole ring in its neighbours
    geoms = normal_form(_pixel_polygons(mask))
    matched = edge_match(geoms)
    assert shapely.equals(matched, geoms).all()
    # Edge-matched: every vertex of the coverage on a polygon's boundary is one of its vertices.
    vertices = shapely.points(np.unique(shapely.get_coordinates(matched), axis=0))
    for polygon in matched:
        on_boundary = vertices[shapely.intersects(shapely.boundary(polygon), vertices)]
        own = {tuple(c) for c in shapely.get_coordinates(polygon)}
        assert {tuple(c) for c in shapely.get_coordinates(on_boundary)} <= own
    # Coverage simplification cannot tell it from a vertex at every pixel corner.
    dense = shapely.segmentize(geoms, 1.0)
    assert shapely.get_num_coordinates(matched).sum() < shapely.get_num_coordinates(dense).sum()
    assert shapely.equals_exact(
        shapely.normalize(shapely.coverage_simplify(matched, 1.0)),
        shapely.normalize(shapely.coverage_simplify(dense, 1.0)),
        tolerance=0,
    ).all()
