"""Blending: a partition of unity, exact streaming stitch, nodata excluded, bounded memory."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.tiling.blend import Stitcher, taper, tile_weights, weigh
from geoseg.tiling.grid import TileGrid

PAD = 512  # the test fields extend this far past the scene on every side


def _stitch(grid: TileGrid, field: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, Stitcher]:
    """Feed tiles cut from a known field whose origin is at (-PAD, -PAD); return the stitch."""
    classes = field.shape[0]
    stitcher = Stitcher(grid, classes)
    out = np.full((classes, grid.height, grid.width), np.nan, dtype=np.float32)
    for tile in grid.tiles():
        r, c = tile.row_off + PAD, tile.col_off + PAD
        window = np.s_[r : r + tile.height, c : c + tile.width]
        for block in stitcher.add(tile, field[(slice(None), *window)], valid[window]):
            rows, cols = block.valid.shape
            target = out[
                :, block.row_off : block.row_off + rows, block.col_off : block.col_off + cols
            ]
            assert np.isnan(target).all(), "a block was handed back twice"
            target[...] = block.probs
    return out, stitcher


def test_taper_is_one_at_scene_border_and_zero_in_the_dead_margin() -> None:
    w = taper(128, 32, taper_start=True, taper_end=False)
    assert np.all(w[:8] == 0)  # dead margin: overlap // 4
    assert np.all(w[32:] == 1)
    assert np.all(np.diff(w[:32]) >= 0)
    assert np.all(taper(128, 32, False, False) == 1)


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    tiles=st.integers(2, 6),
    overlap_units=st.integers(0, 2),
)
def test_weights_are_a_partition_of_unity(
    height: int, width: int, tiles: int, overlap_units: int
) -> None:
    align = 16
    grid = TileGrid(
        height, width, tiles * align, min(overlap_units, (tiles - 1) // 2) * align, align
    )
    total = np.zeros((height, width))
    for tile in grid.tiles():
        r, c, h, w = tile.clipped(height, width)
        total[r : r + h, c : c + w] += tile_weights(grid, tile)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap", "align"),
    [
        (101, 100, 32, 8, 8),
        (723, 934, 256, 64, 16),
        (5, 7, 16, 0, 16),
        (1, 300, 64, 16, 16),
        (300, 1, 64, 16, 16),
    ],
)
def test_stitching_a_consistent_field_returns_it_exactly(
    height: int, width: int, tile: int, overlap: int, align: int
) -> None:
    rng = np.random.default_rng(0)
    grid = TileGrid(height, width, tile, overlap, align)
    field = rng.random((3, height + 2 * PAD, width + 2 * PAD)).astype(np.float32)
    valid = rng.random((height + 2 * PAD, width + 2 * PAD)) > 0.1
    out, stitcher = _stitch(grid, field, valid)
    assert not np.isnan(out).any(), "some part of the scene was never handed back"
    inside = np.s_[PAD : PAD + height, PAD : PAD + width]
    expected = field[(slice(None), *inside)] * valid[inside]
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert stitcher.pending_cells == 0


def test_nodata_pixels_get_no_weight() -> None:
    grid = TileGrid(64, 64, 32, 8, 8)
    field = np.ones((2, 64 + 2 * PAD, 64 + 2 * PAD), dtype=np.float32)
    valid = np.ones((64 + 2 * PAD, 64 + 2 * PAD), dtype=bool)
    valid[PAD + 10 : PAD + 20, PAD + 30 : PAD + 40] = False
    out, _ = _stitch(grid, field, valid)
    assert np.all(out[:, 10:20, 30:40] == 0)
    np.testing.assert_allclose(out[:, valid[PAD : PAD + 64, PAD : PAD + 64]], 1.0, atol=1e-6)


def test_pending_memory_does_not_grow_with_scene_height() -> None:
    """Row-major feeding keeps at most one band of cells pending, whatever the height."""

    def peak_pending(height: int) -> int:
        grid = TileGrid(height, 640, 128, 32, 16)
        stitcher = Stitcher(grid, 1)
        peak = 0
        ones = np.ones((1, 128, 128), np.float32)
        valid = np.ones((128, 128), bool)
        for tile in grid.tiles():
            stitcher.add(tile, ones, valid)
            peak = max(peak, stitcher.pending_cells)
        return peak

    assert peak_pending(640) == peak_pending(6400)


def test_weight_cache_does_not_grow_with_the_scene() -> None:
    """Weights are cached per kind of tile (neighbours, clipping), never per tile position."""
    grid = TileGrid(3000, 3000, 128, 32, 16)
    stitcher = Stitcher(grid, 1)
    ones = np.ones((1, 128, 128), np.float32)
    valid = np.ones((128, 128), bool)
    for tile in grid.tiles():
        stitcher.add(tile, ones, valid)
    assert len(grid) == 32 * 32
    assert stitcher.cached_weights <= 9


def test_weigh_is_the_float32_product_of_read_only_float16_tiles() -> None:
    """The actors' float16 tiles arrive read-only (Ray's object store): weighed in float32,
    bit for bit what numpy computes, without a warning, the inputs untouched."""
    rng = np.random.default_rng(3)
    probs = rng.random((4, 512, 512)).astype(np.float16)
    probs.setflags(write=False)
    grid = TileGrid(height=2048, width=2048, tile_size=512, overlap=64)
    middle = next(t for t in grid.tiles() if t.grid_row == 1 and t.grid_col == 1)
    weights = tile_weights(grid, middle)  # tapered on every side
    clipped = probs[:, 10:500, 3:]  # a strided view, as a tile clipped at the scene edge is
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = weigh(clipped, weights[10:500, 3:])
    assert out.dtype == np.float32
    assert out.shape == (4, 490, 509)
    np.testing.assert_array_equal(out, np.multiply(clipped, weights[10:500, 3:], dtype=np.float32))
    assert out[0, 0, 0] == np.float32(probs[0, 10, 3]) * weights[10, 3]
    assert weigh(probs.astype(np.float64), weights).dtype == np.float32
