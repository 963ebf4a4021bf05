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

Runs. The model actors blend a whole batch where it was inferred (on the GPU there), as a *run* of
consecutive tiles of one tile row (:func:`geoseg.tiling.device_blend.blend_run`, in torch): the
cells every tile of which is in the run (the run's core, one rectangle: :class:`RunLayout`) are
final there and are classified there; only the frame one overlap wide that the run shares with its
neighbours comes to the :class:`Stitcher` as partial sums (:meth:`Stitcher.add_partial`). A final
pixel is the same float32 sum, tiles added left to right, as tile-by-tile stitching gives; a frame
pixel's partial sums may be added in another order (a float32 rounding).

This module is numpy only: the driver stitches and classifies with it and never imports torch,
which would cost its process ~180 MiB and ~0.9 s before Ray starts.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import pairwise
from math import pi
from typing import Any

import numpy as np
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
    probs: NDArray[np.floating]  # (classes, rows, cols); 0 where not valid
    valid: NDArray[np.bool_]  # (rows, cols)


@dataclass(frozen=True)
class Cell:
    """A cell of the stitcher (row segment x column segment) in a run's footprint that still
    waits for tiles outside the run; ``tiles``: how many of the run's tiles cover it."""

    row: int  # row segment index
    col: int  # column segment index
    row_off: int
    col_off: int
    rows: int
    cols: int
    tiles: int


@dataclass(frozen=True)
class RunLayout:
    """A run of tiles (consecutive, in one tile row) cut into what the run alone finishes and
    what waits for its neighbours.

    Scene-clipped windows ``(row_off, col_off, rows, cols)``. A cell is final in the run when
    every tile covering it is in the run: the rows only this tile row covers (a tile row always
    has some, as ``overlap < tile / 2``) times the columns no tile left or right of the run
    covers. That is one rectangle, ``final``; the rest of the footprint, a frame one overlap
    wide, is ``partial``. A last tile row (or column) that lies inside its neighbour's overlap
    finishes nothing alone: ``final`` is then None and the whole footprint partial.
    """

    footprint: tuple[int, int, int, int]
    final: tuple[int, int, int, int] | None
    partial: tuple[Cell, ...]


@dataclass(frozen=True)
class RunOutput:
    """A run of tiles blended by an actor (:meth:`geoseg.engine.actors.SegmentationWorker.predict`).

    ``partial`` ``(classes, pixels)`` and ``partial_valid`` are the frame's cells packed for
    :meth:`Stitcher.add_partial`; ``final`` covers ``layout.final``: class ids and confidence, or
    blended probabilities (float16) and validity; empty when the run finishes nothing alone.
    Defined here, not with the actors: the driver unpickles it, and must not import torch to do so.
    """

    layout: RunLayout
    partial: NDArray[np.float32]
    partial_valid: NDArray[np.bool_]
    final: tuple[NDArray[Any], NDArray[Any]] | tuple[()]


class Stitcher:
    """Accumulates tile probabilities and hands back each part of the scene once it is final.

    Tiles arrive as runs blended where the model ran (:mod:`geoseg.tiling.device_blend`), one
    tile or more: a run's final rectangle needs nothing more, and only its frame of partial sums
    passes through here (:meth:`add_partial`).
    """

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

    def weights_key(self, tile: Tile) -> tuple[bool | int, ...]:
        """What ``tile``'s weights depend on: its neighbours and its clipping, never its position
        (a cache by position would grow with the scene: one array per tile)."""
        row_off, col_off, rows, cols = tile.clipped(self.grid.height, self.grid.width)
        clipping = (row_off - tile.row_off, col_off - tile.col_off, rows, cols)
        return (*_taper_flags(tile, self.grid), *clipping)

    def weights_for(self, tile: Tile) -> NDArray[np.float32]:
        key = self.weights_key(tile)
        weights = self._weights.get(key)
        if weights is None:
            weights = tile_weights(self.grid, tile)
            self._weights[key] = weights
        return weights

    def _span(self, starts: list[int], first: int, stop: int) -> range:
        # Tiles start and end on segment boundaries: a tile covers a contiguous run of segments.
        return range(bisect_left(starts, first), bisect_left(starts, stop))

    def layout(self, tiles: list[Tile]) -> RunLayout:
        """Final rectangle and partial cells of a run of ``tiles`` (see :class:`RunLayout`)."""
        rows_of = {t.grid_row for t in tiles}
        cols = [t.grid_col for t in tiles]
        if len(rows_of) != 1 or cols != list(range(cols[0], cols[0] + len(cols))):
            raise ValueError("a run is consecutive tiles of one tile row")
        windows = [t.clipped(self.grid.height, self.grid.width) for t in tiles]
        row_off, _, rows, _ = windows[0]
        col_off = windows[0][1]
        col_end = windows[-1][1] + windows[-1][3]
        row_span = self._span(self._row_starts, row_off, row_off + rows)
        col_span = self._span(self._col_starts, col_off, col_end)
        col_tiles = {
            ci: sum(1 for _, c, _, w in windows if c <= self._col_starts[ci] < c + w)
            for ci in col_span
        }
        final_rows = [ri for ri in row_span if self._row_segments[ri][2] == 1]
        final_cols = [ci for ci in col_span if self._col_segments[ci][2] == col_tiles[ci]]
        if not final_rows or not final_cols:  # a last tile row or column inside its neighbour's
            final_rows, final_cols = [], []
        final_cells = {(ri, ci) for ri in final_rows for ci in final_cols}
        partial = tuple(
            Cell(ri, ci, rs, cs, re - rs, ce - cs, col_tiles[ci])
            for ri in row_span
            for ci in col_span
            for (rs, re, _), (cs, ce, _) in [(self._row_segments[ri], self._col_segments[ci])]
            if (ri, ci) not in final_cells
        )
        final = None
        if final_cells:
            assert len(final_rows) == 1 and final_cols == list(
                range(final_cols[0], final_cols[-1] + 1)
            ), "overlap < tile / 2: at most one row segment a tile row covers alone"
            r0, r1, _ = self._row_segments[final_rows[0]]
            c0, c1 = self._col_segments[final_cols[0]][0], self._col_segments[final_cols[-1]][1]
            final = (r0, c0, r1 - r0, c1 - c0)
        return RunLayout(
            footprint=(row_off, col_off, rows, col_end - col_off),
            final=final,
            partial=partial,
        )

    def add_partial(
        self, layout: RunLayout, probs: NDArray[np.float32], valid: NDArray[np.bool_]
    ) -> list[Block]:
        """Add a run's partial cells: their weighted sums ``probs`` (classes, pixels) and validity
        ``valid`` (pixels), each cell's pixels row-major, one cell after the other in
        ``layout.partial``'s order (:class:`BlendedRun`). Returns the blocks that became final."""
        finished = []
        offset = 0
        for cell in layout.partial:
            size = cell.rows * cell.cols
            part = probs[:, offset : offset + size].reshape(-1, cell.rows, cell.cols)
            part_valid = valid[offset : offset + size].reshape(cell.rows, cell.cols)
            offset += size
            state = self._cells.get((cell.row, cell.col))
            if state is None:
                covering = self._row_segments[cell.row][2] * self._col_segments[cell.col][2]
                # Copies: a view would keep the whole run's output alive (in Ray's object store,
                # where it arrives) until the next tile row completes the cell; one tile row of
                # a 40k-wide scene held ~100 MiB more of the store in every process.
                state = _Cell(remaining=covering, probs=part.copy(), valid=part_valid.copy())
                self._cells[(cell.row, cell.col)] = state
            else:
                assert state.probs is not None
                state.probs += part
            state.remaining -= cell.tiles
            if state.remaining == 0:
                del self._cells[(cell.row, cell.col)]
                assert state.probs is not None and state.valid is not None
                finished.append(Block(cell.row_off, cell.col_off, state.probs, state.valid))
        return finished


@dataclass
class _Cell:
    remaining: int
    probs: NDArray[np.float32] | None = None
    valid: NDArray[np.bool_] | None = field(default=None)


def classes_and_confidence(
    probs: NDArray[np.floating], valid: NDArray[np.bool_], nodata: int, dtype: str
) -> tuple[NDArray[np.integer], NDArray[np.uint8]]:
    """Class ids (``nodata`` where not valid) and confidence ``round(255 x max probability)``.

    ``probs`` ``(classes, rows, cols)``. A running maximum over the class planes: the
    first-maximum rule of ``argmax``, and the maximum for free. Ids are ``dtype``; confidence is
    uint8, 0 (its nodata) where not valid, at least 1 elsewhere. The same numbers as
    :func:`geoseg.tiling.device_blend.classify`, which classifies on the model's device.
    """
    best = probs[0].astype(np.float32, copy=True)
    ids = np.zeros(best.shape, dtype=dtype)
    for class_id in range(1, probs.shape[0]):
        ids[probs[class_id] > best] = class_id
        np.maximum(best, probs[class_id], out=best)
    invalid = ~valid
    ids[invalid] = nodata
    best *= 255
    confidence = np.clip(np.rint(best, out=best), 1, 255, out=best).astype(np.uint8)
    confidence[invalid] = 0
    return ids, confidence
