"""Blending overlapping tile predictions into one seam-free probability field, streaming.

Weights. Along each axis a tile's weight is 1 in its interior and tapers over the ``overlap`` pixels
it shares with a neighbour; it does not taper at the scene border, where no neighbour exists. The
taper at distance ``d`` from the tile edge (``m = overlap // 4`` is a dead margin) is::

    w(d) = 0                                  for d < m
    w(d) = sin^2(pi / 2 * (d - m + 0.5) / (overlap - 2 m))   for m <= d < overlap - m
    w(d) = 1                                  otherwise

Because ``sin^2(x) + cos^2(x) = 1``, the weights of the two tiles sharing an overlap sum to exactly
1, and the 2-D weight (outer product of the row and column weights) of the up to four tiles
covering a pixel sums to 1: the blend is a partition of unity and needs no normalisation. The dead
margin keeps the few pixels next to a tile edge, where the model lacked context, out of the result.

Probabilities (softmax), never logits, are blended. Pixels that are not valid (nodata) take no part.

Streaming. The scene is split along each axis at every tile start and end, into segments covered by
one or two tiles; a cell (row segment x column segment) is final once each tile covering it has been
added. With tiles added in row-major order only the cells of one ``overlap``-high band of rows wait
for the next tile row, so memory is ``O(overlap x width x classes)``, independent of the height.
"""

from __future__ import annotations

import warnings
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import pairwise
from math import pi

import numpy as np
import torch
from numpy.typing import NDArray

from geoseg.tiling.grid import Tile, TileGrid


def taper(length: int, overlap: int, taper_start: bool, taper_end: bool) -> NDArray[np.float32]:
    """1-D blending weights of a tile of ``length`` pixels (see the module docstring)."""
    weights = np.ones(length, dtype=np.float64)
    if overlap > 0:
        margin = overlap // 4
        ramp_len = overlap - 2 * margin
        ramp = np.sin(pi / 2 * (np.arange(ramp_len) + 0.5) / ramp_len) ** 2
        rising = np.concatenate([np.zeros(margin), ramp])
        if taper_start:
            weights[: len(rising)] = rising
        if taper_end:
            weights[length - len(rising) :] = rising[::-1]
    return weights.astype(np.float32)


def _taper_flags(tile: Tile, grid: TileGrid) -> tuple[bool, bool, bool, bool]:
    """Which sides of ``tile`` have a neighbour to share weight with (top, bottom, left, right)."""
    rows, cols = grid.shape
    return (
        tile.grid_row > 0,
        tile.grid_row < rows - 1,
        tile.grid_col > 0,
        tile.grid_col < cols - 1,
    )


def tile_weights(grid: TileGrid, tile: Tile) -> NDArray[np.float32]:
    """2-D weights of the part of ``tile`` inside the scene, shape ``(rows, cols)`` inside."""
    row_off, col_off, rows, cols = tile.clipped(grid.height, grid.width)
    top, bottom, left, right = _taper_flags(tile, grid)
    top_skip, left_skip = row_off - tile.row_off, col_off - tile.col_off
    w_rows = taper(tile.height, grid.overlap, top, bottom)[top_skip : top_skip + rows]
    w_cols = taper(tile.width, grid.overlap, left, right)[left_skip : left_skip + cols]
    return np.outer(w_rows, w_cols)


def tensor_view(array: NDArray[np.generic]) -> torch.Tensor:
    """A tensor sharing ``array``'s memory, for reading only.

    Arrays fresh from Ray's object store are read-only, and torch warns about every read-only
    array (in every actor's and the driver's log) although its callers here only read it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def weigh(probs: NDArray[np.floating], weights: NDArray[np.float32]) -> NDArray[np.float32]:
    """``probs * weights`` in float32 (``weights`` broadcast over the class planes).

    The actors hand over float16, and numpy converts float16 without SIMD (1.5 ms for a 4-class
    512² tile here, against 0.1 ms in torch), which made this conversion most of the driver's
    blending, the stage that bounds a GPU run: torch converts, numpy multiplies.
    """
    tensor = tensor_view(probs)
    # One thread: on a CPU machine the cores belong to the model actors, and torch's default
    # thread pool here cost them more than it saved (a 10k² scene 6-8% slower end to end).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # Only the conversion in torch, into an array numpy allocates: with torch's own allocations
    # (its result, or the float32 temporary a mixed-type multiply makes) the driver's private
    # memory grew by ~290 MiB over a 10k² scene.
    weighted = np.empty(probs.shape, dtype=np.float32)
    try:
        torch.from_numpy(weighted).copy_(tensor)
    finally:
        torch.set_num_threads(threads)
    return np.multiply(weighted, weights, out=weighted)


def _segments(offsets: tuple[int, ...], size: int, length: int) -> list[tuple[int, int, int]]:
    """Split ``[0, length)`` at every tile start and end: ``(start, stop, tiles covering)``."""
    cuts = sorted({0, length, *offsets, *(min(o + size, length) for o in offsets)})
    segments = []
    for start, stop in pairwise(cuts):
        covering = sum(1 for o in offsets if o <= start and o + size >= stop)
        segments.append((start, stop, covering))
    return segments


@dataclass
class Block:
    """A finished part of the scene: blended probabilities and the validity mask."""

    row_off: int
    col_off: int
    probs: NDArray[np.float32]  # (classes, rows, cols); 0 where not valid
    valid: NDArray[np.bool_]  # (rows, cols)


@dataclass
class _Cell:
    remaining: int
    probs: NDArray[np.float32] | None = None
    valid: NDArray[np.bool_] | None = field(default=None)


class Stitcher:
    """Accumulates tile probabilities and hands back each part of the scene once it is final."""

    def __init__(self, grid: TileGrid, num_classes: int) -> None:
        self.grid = grid
        self.num_classes = num_classes
        self._row_segments = _segments(grid.row_offsets, grid.tile_height, grid.height)
        self._col_segments = _segments(grid.col_offsets, grid.tile_width, grid.width)
        self._row_starts = [start for start, _, _ in self._row_segments]
        self._col_starts = [start for start, _, _ in self._col_segments]
        self._cells: dict[tuple[int, int], _Cell] = {}
        self._weights: dict[tuple[bool | int, ...], NDArray[np.float32]] = {}

    @property
    def cached_weights(self) -> int:
        """Distinct weight arrays held (at most 3 x 3 kinds of tile x their clippings)."""
        return len(self._weights)

    @property
    def pending_cells(self) -> int:
        """Cells that have received some but not all of their tiles (for memory tests)."""
        return len(self._cells)

    def _weights_for(self, tile: Tile) -> NDArray[np.float32]:
        # Only the neighbour flags and the clipping change the weights: cache by those (never by
        # the tile's position, or the cache would grow with the scene: one array per tile).
        row_off, col_off, rows, cols = tile.clipped(self.grid.height, self.grid.width)
        clipping = (row_off - tile.row_off, col_off - tile.col_off, rows, cols)
        key = (*_taper_flags(tile, self.grid), *clipping)
        weights = self._weights.get(key)
        if weights is None:
            weights = tile_weights(self.grid, tile)
            self._weights[key] = weights
        return weights

    def add(self, tile: Tile, probs: NDArray[np.floating], valid: NDArray[np.bool_]) -> list[Block]:
        """Add one tile's probabilities ``(classes, tile rows, tile cols)`` and validity mask.

        Both cover the whole tile, margins past the scene edge included; those are cropped here.
        Returns the blocks that became final.
        """
        row_off, col_off, rows, cols = tile.clipped(self.grid.height, self.grid.width)
        inside = np.s_[
            row_off - tile.row_off : row_off - tile.row_off + rows,
            col_off - tile.col_off : col_off - tile.col_off + cols,
        ]
        valid = valid[inside]
        weights = self._weights_for(tile)
        if not valid.all():
            weights = weights * valid
        weighted = weigh(probs[(slice(None), *inside)], weights)
        finished = []
        # Tiles start and end on segment boundaries, so a tile covers a contiguous run of segments.
        row_first = bisect_left(self._row_starts, row_off)
        row_last = bisect_left(self._row_starts, row_off + rows)
        col_first = bisect_left(self._col_starts, col_off)
        col_last = bisect_left(self._col_starts, col_off + cols)
        for ri in range(row_first, row_last):
            r0, r1, r_cover = self._row_segments[ri]
            for ci in range(col_first, col_last):
                c0, c1, c_cover = self._col_segments[ci]
                part = weighted[:, r0 - row_off : r1 - row_off, c0 - col_off : c1 - col_off]
                cell = self._cells.get((ri, ci))
                if cell is None:
                    cell = _Cell(remaining=r_cover * c_cover)
                    self._cells[(ri, ci)] = cell
                if cell.probs is None:
                    cell.probs = part.copy() if cell.remaining > 1 else part
                    cell.valid = valid[r0 - row_off : r1 - row_off, c0 - col_off : c1 - col_off]
                else:
                    cell.probs += part
                cell.remaining -= 1
                if cell.remaining == 0:
                    del self._cells[(ri, ci)]
                    assert cell.valid is not None
                    finished.append(Block(r0, c0, cell.probs, np.ascontiguousarray(cell.valid)))
        return finished


def classes_and_confidence(
    probs: NDArray[np.floating], valid: NDArray[np.bool_], nodata: int, dtype: str
) -> tuple[NDArray[np.integer], NDArray[np.uint8]]:
    """Class ids (``nodata`` where not valid) and confidence ``round(255 x max probability)``.

    A running maximum over the class planes: the same first-maximum rule as ``argmax(axis=0)``,
    about twice as fast on a ``(classes, rows, cols)`` array, and it yields the maximum for free.
    Confidence is 0 (its nodata) where not valid, at least 1 elsewhere.
    """
    best = probs[0].astype(np.float32)
    ids = np.zeros(best.shape, dtype=dtype)
    for class_id in range(1, probs.shape[0]):
        np.copyto(ids, class_id, where=probs[class_id] > best, casting="unsafe")
        np.maximum(best, probs[class_id], out=best)
    ids[~valid] = nodata
    confidence = np.clip(np.rint(best * 255), 1, 255).astype(np.uint8)
    confidence[~valid] = 0
    return ids, confidence
