"""Band assembly for the CRF: every row handed out once, with exactly the context asked for."""

from __future__ import annotations

import numpy as np
import pytest

from geoseg.tiling.bands import BandAssembler
from geoseg.tiling.blend import Stitcher
from geoseg.tiling.device_blend import add_tile
from geoseg.tiling.grid import TileGrid

PAD = 256


@pytest.mark.parametrize(
    ("height", "width", "band_rows", "halo"),
    [(300, 170, 64, 15), (300, 170, 1000, 15), (97, 131, 7, 0), (5, 7, 2, 3), (300, 50, 16, 40)],
)
def test_bands_cover_every_row_once_with_context(
    height: int, width: int, band_rows: int, halo: int
) -> None:
    rng = np.random.default_rng(1)
    grid = TileGrid(height, width, 64, 16, 16)
    field = rng.random((2, height + 2 * PAD, width + 2 * PAD)).astype(np.float32)
    valid = np.ones((height + 2 * PAD, width + 2 * PAD), dtype=bool)
    stitcher = Stitcher(grid, 2)
    assembler = BandAssembler(height, width, 2, band_rows, halo)
    seen = np.zeros(height, dtype=int)
    peak = 0
    # Reversed order: bottom blocks arrive first and must not be taken for complete top rows.
    for tile in grid.tiles()[::-1] if height < 100 else grid.tiles():
        r, c = tile.row_off + PAD, tile.col_off + PAD
        window = np.s_[r : r + tile.height, c : c + tile.width]
        for block in add_tile(stitcher, tile, field[(slice(None), *window)], valid[window]):
            for band in assembler.add(block):
                seen[band.row_off : band.row_off + band.rows] += 1
                top = band.context_row_off
                bottom = top + band.probs.shape[1]
                assert top == max(0, band.row_off - halo)
                assert bottom == min(height, band.row_off + band.rows + halo)
                expected = field[:, PAD + top : PAD + bottom, PAD : PAD + width]
                assert band.probs.dtype == np.float16  # the model's precision, half the bytes
                np.testing.assert_allclose(band.probs, expected, rtol=2**-11, atol=1e-6)
                assert band.valid.all()
            peak = max(peak, assembler.buffered_rows)
    np.testing.assert_array_equal(seen, 1)
    if height >= 300 and band_rows < height:
        # Bounded by the band, its context and one tile row, not by the scene height.
        assert peak <= band_rows + 2 * halo + 2 * grid.tile_height
