"""The actor's step (SegmentationWorker.predict, no Ray): batches blended where the model ran,
run by run, give the scene that stitching every tile on the driver gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from geoseg.engine.actors import SegmentationWorker
from geoseg.tiling.blend import Stitcher, classes_and_confidence
from geoseg.tiling.device_blend import add_tile
from geoseg.tiling.grid import TileGrid

PAD = 128  # the field extends this far past the scene: every tile is cut from it


def test_batches_blended_in_the_actor_match_tile_by_tile_stitching(rgb_model: Path) -> None:
    torch.set_num_threads(2)
    worker = SegmentationWorker(str(rgb_model), "cpu", "fp32", threads=2)
    height, width = 300, 410
    grid = TileGrid(height, width, tile_size=128, overlap=32, align=8)
    rows, cols = grid.shape
    assert (rows, cols) == (4, 5)  # batches of 4 below span tile rows
    rng = np.random.default_rng(11)
    field = rng.integers(0, 256, (3, height + 2 * PAD, width + 2 * PAD), dtype=np.uint8)
    valid = np.ones((height + 2 * PAD, width + 2 * PAD), dtype=bool)
    valid[PAD + 40 : PAD + 90, PAD + 200 : PAD + 260] = False  # nodata inside tiles
    # The top-right tile (rows -32..96, columns 352..480) is all nodata: it skips the model.
    valid[: PAD + 96, PAD + 352 :] = False

    def cut(array: np.ndarray, tile_list: list) -> np.ndarray:  # type: ignore[type-arg]
        return np.stack(
            [
                array[..., t.row_off + PAD : t.row_off + PAD + t.height,
                      t.col_off + PAD : t.col_off + PAD + t.width]
                for t in tile_list
            ]
        )  # fmt: skip

    tiles = grid.tiles()
    batches = [tiles[i : i + 4] for i in range(0, len(tiles), 4)]
    reference = Stitcher(grid, 4)
    expected = np.full((4, height, width), np.nan, dtype=np.float32)
    driver = Stitcher(grid, 4)
    ids = np.full((height, width), 254, dtype=np.uint8)  # 254: never written
    confidence = np.zeros((height, width), dtype=np.uint8)
    final = np.zeros((height, width), dtype=bool)
    skipped = 0

    def place(row_off: int, col_off: int, block_ids: np.ndarray, conf: np.ndarray) -> None:
        window = np.s_[
            row_off : row_off + block_ids.shape[0], col_off : col_off + block_ids.shape[1]
        ]
        assert (ids[window] == 254).all(), "a pixel was written twice"
        ids[window], confidence[window] = block_ids, conf

    for batch in batches:
        data, batch_valid = cut(field, batch), cut(valid, batch)
        # The reference: the same batch through the same model, every tile stitched on its own.
        probs = worker.predictor.probabilities(data).copy()
        for i, tile in enumerate(batch):
            tile_probs = probs[i] if batch_valid[i].any() else np.zeros_like(probs[i])
            for block in add_tile(reference, tile, tile_probs, batch_valid[i]):
                r, c = block.row_off, block.col_off
                expected[:, r : r + block.valid.shape[0], c : c + block.valid.shape[1]] = (
                    block.probs
                )
        outputs, stats = worker.predict(grid, batch, (data, batch_valid, 0.0), True)
        skipped += int(stats["tiles_skipped"])
        assert stats["infer_s"] >= stats["blend_s"] > 0
        assert len(outputs) == len({t.grid_row for t in batch})
        for run in outputs:
            if run.layout.final is not None:
                r, c, h, w = run.layout.final
                place(r, c, *run.final)
                final[r : r + h, c : c + w] = True
            for block in driver.add_partial(run.layout, run.partial, run.partial_valid):
                place(block.row_off, block.col_off,
                      *classes_and_confidence(block.probs, block.valid, 255, "uint8"))  # fmt: skip

    assert skipped == 1
    assert driver.pending_cells == 0 and (ids != 254).all()
    scene_valid = valid[PAD : PAD + height, PAD : PAD + width]
    want_ids, want_conf = classes_and_confidence(expected, scene_valid, 255, "uint8")
    # What a run finishes alone is the very float32 sum the driver made: equal, pixel for pixel.
    assert final.mean() > 0.4
    np.testing.assert_array_equal(ids[final], want_ids[final])
    np.testing.assert_array_equal(confidence[final], want_conf[final])
    # The frames' partial sums meet in another order: at most a rounding apart.
    assert np.count_nonzero(ids != want_ids) <= 2
    assert np.abs(confidence.astype(int) - want_conf).max() <= 1
    assert (ids[~scene_valid] == 255).all() and (confidence[~scene_valid] == 0).all()
    assert (confidence[scene_valid] >= 1).all()
