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
    cover = np.zeros((height, width), dtype=np.int32)
    for tile in grid.tiles():
        assert tile.row_off % align == 0 and tile.col_off % align == 0
        assert tile.height % align == 0 and tile.width % align == 0
        assert tile.row_off < height and tile.col_off < width
        cover[tile.row_off : tile.row_off + tile.height, tile.col_off : tile.col_off + tile.width] += 1
    assert cover.min() >= 1
    # Never more than two tiles per axis: at most four tiles on a pixel.
    assert cover.max() <= 4
    # No superfluous tile: dropping the last row (or column) of tiles would leave pixels uncovered.
    rows, cols = grid.shape
    assert rows == 1 or grid.row_offsets[-2] + grid.tile_height < height
    assert cols == 1 or grid.col_offsets[-2] + grid.tile_width < width


def test_known_offsets() -> None:
    grid = TileGrid(1000, 600, 256, 64, 16)
    assert grid.step == 192
    assert grid.row_offsets == (0, 192, 384, 576, 768)
    assert grid.col_offsets == (0, 192, 384)
    assert len(grid) == 15
    last = grid.tiles()[-1]
    # The last tile reaches past the edge (padded) instead of being shifted back off the grid.
    assert (last.row_off, last.col_off, last.height, last.width) == (768, 384, 256, 256)
    assert last.clipped(1000, 600) == (768, 384, 232, 216)


def test_scene_smaller_than_a_tile_gets_one_shrunk_aligned_tile() -> None:
    grid = TileGrid(5, 37, 512, 64, 16)
    assert grid.shape == (1, 1)
    assert (grid.tile_height, grid.tile_width) == (16, 48)


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
