"""Blending: a partition of unity, exact streaming stitch, nodata excluded, bounded memory."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.tiling.blend import Block, Stitcher, classes_and_confidence, taper, tile_weights
from geoseg.tiling.device_blend import add_tile, blend_run, classify
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
        for block in add_tile(stitcher, tile, field[(slice(None), *window)], valid[window]):
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
            add_tile(stitcher, tile, ones, valid)
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
        add_tile(stitcher, tile, ones, valid)
    assert len(grid) == 32 * 32
    assert stitcher.cached_weights <= 9


def test_float16_read_only_tiles_are_weighed_in_float32() -> None:
    """The actors' float16 tiles arrive read-only (Ray's object store): weighed in float32, bit
    for bit what numpy computes, without a warning, the input untouched."""
    rng = np.random.default_rng(3)
    grid = TileGrid(height=2048, width=2048, tile_size=512, overlap=64)
    middle = next(t for t in grid.tiles() if t.grid_row == 1 and t.grid_col == 1)
    probs = rng.random((4, 512, 512)).astype(np.float16)
    probs.setflags(write=False)
    valid = np.ones((512, 512), bool)
    stitcher = Stitcher(grid, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (final, *_partial) = add_tile(stitcher, middle, probs, valid)
    # The tile's own core: rows and columns no neighbour covers.
    assert (final.row_off, final.col_off, *final.valid.shape) == (448, 448, 384, 384)
    weights = tile_weights(grid, middle)
    expected = np.multiply(probs, weights, dtype=np.float32)[:, 64:448, 64:448]
    assert final.probs.dtype == np.float32
    np.testing.assert_array_equal(final.probs, expected)
    assert stitcher.pending_cells == 8  # the frame: 4 edges and 4 corners wait for neighbours


def test_run_layout_of_four_tiles() -> None:
    """A run finishes its core rows between the outer overlaps; its frame is one overlap wide."""
    grid = TileGrid(height=2048, width=2048, tile_size=512, overlap=64)
    stitcher = Stitcher(grid, 1)
    run = [grid.tile(1, c) for c in range(1, 5)]  # offsets 384, 832, 1280, 1728 (step 448)
    layout = stitcher.layout(run)
    assert layout.footprint == (384, 384, 512, 2048 - 384)  # the last tile is clipped at 2048
    # Rows 448-832: only tile row 1. Columns from the end of tile 0 (448) to the scene's edge:
    # no tile right of the run (tile 4 is the last column).
    assert layout.final == (448, 448, 384, 2048 - 448)
    footprint_pixels = 512 * (2048 - 384)
    partial_pixels = sum(cell.rows * cell.cols for cell in layout.partial)
    assert partial_pixels == footprint_pixels - 384 * (2048 - 448)
    assert {cell.tiles for cell in layout.partial} == {1, 2}
    with pytest.raises(ValueError, match="consecutive tiles of one tile row"):
        stitcher.layout([grid.tile(1, 1), grid.tile(1, 3)])
    with pytest.raises(ValueError, match="consecutive tiles of one tile row"):
        stitcher.layout([grid.tile(1, 4), grid.tile(2, 0)])


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap", "align", "run"),
    [
        (723, 934, 256, 64, 16, 3),
        (101, 100, 32, 8, 8, 2),
        (300, 1, 64, 16, 16, 4),
        (5, 7, 16, 0, 16, 1),
    ],
)
def test_runs_blended_apart_stitch_what_single_tiles_stitch(
    height: int, width: int, tile: int, overlap: int, align: int, run: int
) -> None:
    """Runs of tiles blended where the model ran (final rectangle + partial cells handed to the
    stitcher) give the scene that tile-by-tile stitching gives; the final pixels bit for bit."""
    rng = np.random.default_rng(5)
    grid = TileGrid(height, width, tile, overlap, align)
    field = rng.random((3, height + 2 * PAD, width + 2 * PAD)).astype(np.float16)
    valid = rng.random((height + 2 * PAD, width + 2 * PAD)) > 0.1
    reference, _ = _stitch(grid, field, valid)
    stitcher = Stitcher(grid, 3)
    out = np.full_like(reference, np.nan)
    final_mask = np.zeros((height, width), bool)

    def place(row_off: int, col_off: int, probs: np.ndarray) -> None:
        target = out[:, row_off : row_off + probs.shape[1], col_off : col_off + probs.shape[2]]
        assert np.isnan(target).all(), "a pixel was handed back twice"
        target[...] = probs

    rows, cols = grid.shape
    for r in range(rows):
        for c0 in range(0, cols, run):
            tiles = [grid.tile(r, c) for c in range(c0, min(c0 + run, cols))]
            windows = [
                np.s_[t.row_off + PAD : t.row_off + PAD + t.height,
                      t.col_off + PAD : t.col_off + PAD + t.width]
                for t in tiles
            ]  # fmt: skip
            probs = torch.from_numpy(np.stack([field[(slice(None), *w)] for w in windows]))
            tile_valid = torch.from_numpy(np.stack([valid[w] for w in windows]))
            layout = stitcher.layout(tiles)
            blended = blend_run(
                grid, layout, tiles, probs, tile_valid,
                lambda t: torch.from_numpy(stitcher.weights_for(t)),
            )  # fmt: skip
            if layout.final is not None:
                assert blended.final is not None
                place(layout.final[0], layout.final[1], blended.final[0].numpy())
                fr, fc, fh, fw = layout.final
                final_mask[fr : fr + fh, fc : fc + fw] = True
            packed, packed_valid = blended.partial.numpy(), blended.partial_valid.numpy()
            assert packed.shape == (3, sum(c.rows * c.cols for c in layout.partial))
            for block in stitcher.add_partial(layout, packed, packed_valid):
                place(block.row_off, block.col_off, block.probs)
    assert not np.isnan(out).any(), "some part of the scene was never handed back"
    assert stitcher.pending_cells == 0
    assert final_mask.any()
    np.testing.assert_array_equal(out[:, final_mask], reference[:, final_mask])
    np.testing.assert_allclose(out, reference, atol=1e-6)


@pytest.mark.parametrize("nodata", [255, 65535])
def test_classes_and_confidence_follow_argmax_and_mark_nodata(nodata: int) -> None:
    rng = np.random.default_rng(7)
    probs = rng.random((5, 40, 60)).astype(np.float32)
    probs[:, 0, :10] = 0.5  # ties: the first class wins, as with argmax
    valid = rng.random((40, 60)) > 0.2
    dtype = "uint8" if nodata == 255 else "uint16"
    ids, confidence = classes_and_confidence(probs, valid, nodata, dtype)
    assert ids.dtype == np.dtype(dtype) and confidence.dtype == np.uint8
    np.testing.assert_array_equal(ids[valid], probs.argmax(axis=0)[valid])
    assert (ids[~valid] == nodata).all() and (confidence[~valid] == 0).all()
    assert (ids[0, :10][valid[0, :10]] == 0).all()
    expected = np.clip(np.rint(probs.max(axis=0) * 255), 1, 255).astype(np.uint8)
    np.testing.assert_array_equal(confidence[valid], expected[valid])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_host_and_device_classification_agree_exactly(dtype: type) -> None:
    """The driver's numpy classification and the actors' torch one give the same ids and
    confidence, ties (first class wins), halves of 1/255 (rounded to even) and nodata included."""
    rng = np.random.default_rng(17)
    probs = rng.random((4, 64, 96)).astype(dtype)
    probs[:, :8] = 0.25  # four-way ties
    probs[:, 8:16] = 0.1
    probs[1, 8:16] = probs[2, 8:16] = 0.45  # two-way ties between later classes
    probs[:, 16:24] = 0.0
    probs[3, 16:24] = (np.arange(96) + 0.5) / 255  # confidence exactly halfway between steps
    valid = rng.random((64, 96)) > 0.15
    for nodata, mask_dtype in ((255, "uint8"), (65535, "uint16")):
        ids, confidence = classes_and_confidence(probs, valid, nodata, mask_dtype)
        device_ids, device_confidence = classify(
            torch.from_numpy(probs), torch.from_numpy(valid), nodata
        )
        np.testing.assert_array_equal(ids, device_ids.numpy().astype(mask_dtype))
        np.testing.assert_array_equal(confidence, device_confidence.numpy())
        assert ids.dtype == np.dtype(mask_dtype)
        assert (ids[8:16][valid[8:16]] == 1).all()


def test_pending_cells_keep_no_view_of_a_runs_arrays() -> None:
    """A run's arrays arrive through Ray's object store, whose memory is reused once they are
    dropped: the cells waiting for the next tile row hold copies, so the blocks they hand back
    are the same when those arrays are overwritten meanwhile (and a view would have pinned the
    whole run's output in the store for a tile row)."""
    grid = TileGrid(height=900, width=600, tile_size=512, overlap=64)
    rng = np.random.default_rng(1)
    probs = {t: rng.random((1, 2, t.height, t.width), dtype=np.float32) for t in grid.tiles()}

    def blocks(overwrite: bool) -> list[Block]:
        stitcher = Stitcher(grid, 2)
        handed_back = []
        for tile in grid.tiles():
            layout = stitcher.layout([tile])
            blended = blend_run(
                grid, layout, [tile], torch.from_numpy(probs[tile]),
                torch.ones((1, tile.height, tile.width), dtype=torch.bool),
                lambda t: torch.from_numpy(stitcher.weights_for(t)),
            )  # fmt: skip
            packed, packed_valid = blended.partial.numpy(), blended.partial_valid.numpy()
            handed_back += stitcher.add_partial(layout, packed, packed_valid)
            if overwrite:
                packed[...], packed_valid[...] = np.nan, False
        assert stitcher.pending_cells == 0
        return handed_back

    kept, overwritten = blocks(overwrite=False), blocks(overwrite=True)
    assert len(overwritten) == len(kept) == 9  # the cells of the overlaps and the scene's edge
    for block, reference in zip(overwritten, kept, strict=True):
        assert (block.row_off, block.col_off) == (reference.row_off, reference.col_off)
        assert block.valid.all()
        np.testing.assert_array_equal(block.probs, reference.probs)
