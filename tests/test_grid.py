"""TileGrid: coverage, alignment to the model stride, small scenes, invalid options."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.errors import ConfigError
from geoseg.tiling.grid import TileGrid


@settings(max_examples=200, deadline=None)
@given(
    height=st.integers(1, 700),
    width=st.integers(1, 700),
    align=st.sampled_from([1, 8, 16, 32]),
    tiles=st.integers(2, 8),
    overlap_units=st.integers(0, 3),
)
def test_grid_covers_every_pixel_on_the_stride_grid(
    height: int, width: int, align: int, tiles: int, overlap_units: int
) -> None:
    tile_size = tiles * align
    overlap = min(overlap_units, (tiles - 1) // 2) * align
    grid = TileGrid(height, width, tile_size, overlap, align)
    m = grid.margin
    cover = np.zeros((height + 2 * m, width + 2 * m), dtype=np.int32)  # origin at (-m, -m)
    for tile in grid.tiles():
        assert tile.row_off % align == 0 and tile.col_off % align == 0
        assert tile.height % align == 0 and tile.width % align == 0
        assert -m <= tile.row_off < height and -m <= tile.col_off < width
        rows = slice(tile.row_off + m, tile.row_off + m + tile.height)
        cols = slice(tile.col_off + m, tile.col_off + m + tile.width)
        cover[rows, cols] += 1
    # Every pixel, and the reflected context margin around the scene, is covered.
    assert cover.min() >= 1
    # Never more than two tiles per axis: at most four tiles on a pixel.
    assert cover.max() <= 4
    # No superfluous tile: dropping the last row (or column) of tiles would leave pixels uncovered.
    rows, cols = grid.shape
    assert rows == 1 or grid.row_offsets[-2] + grid.tile_height < height + m
    assert cols == 1 or grid.col_offsets[-2] + grid.tile_width < width + m


def test_known_offsets() -> None:
    grid = TileGrid(1000, 600, 256, 64, 16)
    assert grid.step == 192 and grid.margin == 64
    assert grid.row_offsets == (-64, 128, 320, 512, 704, 896)
    assert grid.col_offsets == (-64, 128, 320, 512)
    assert len(grid) == 24
    first, last = grid.tiles()[0], grid.tiles()[-1]
    assert first.clipped(1000, 600) == (0, 0, 192, 192)
    # The last tile reaches past the edge (padded) instead of being shifted back off the grid.
    assert (last.row_off, last.col_off, last.height, last.width) == (896, 512, 256, 256)
    assert last.clipped(1000, 600) == (896, 512, 104, 88)


def test_scene_smaller_than_a_tile_gets_one_shrunk_aligned_tile() -> None:
    grid = TileGrid(5, 37, 512, 64, 16)
    assert grid.shape == (1, 1)
    # 5 + 2 x 64 = 133 -> 144; 37 + 128 = 165 -> 176
    assert (grid.tile_height, grid.tile_width) == (144, 176)
    assert grid.tiles()[0].clipped(5, 37) == (0, 0, 5, 37)


@pytest.mark.parametrize(
    ("tile_size", "overlap", "align", "message"),
    [
        (100, 0, 16, "tile size 100 is not a positive multiple"),
        (256, 40, 16, "overlap 40 is not a non-negative multiple"),
        (256, 128, 16, "less than half the tile size"),
    ],
)
def test_invalid_grids_are_refused(tile_size: int, overlap: int, align: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TileGrid(1000, 1000, tile_size, overlap, align)
