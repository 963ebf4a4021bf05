"""Blending and classifying a run of tiles where the model ran, in torch on its device.

The model actors' share of :mod:`geoseg.tiling.blend` (whose docstring has the weights and the
runs): a batch's probabilities never leave the device they were inferred on (a GPU) before they
are blended and, where final, classified. Only the actors import this module, and torch with it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from geoseg.tiling.blend import Block, RunLayout, Stitcher
from geoseg.tiling.grid import Tile, TileGrid


def tensor_view(array: NDArray[np.generic]) -> torch.Tensor:
    """A tensor sharing ``array``'s memory, for reading only.

    Arrays fresh from Ray's object store are read-only, and torch warns about every read-only
    array (in every actor's log) although its callers here only read it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


@dataclass(frozen=True)
class BlendedRun:
    """A run blended (:func:`blend_run`), on its device: the final rectangle's sums and validity
    (None when the run finishes nothing alone) and the partial cells packed for
    :meth:`Stitcher.add_partial`: sums ``(classes, pixels)`` and validity ``(pixels)``, each
    cell's pixels row-major, one cell after the other in ``layout.partial``'s order (one
    contiguous pair: one copy off a GPU)."""

    final: tuple[torch.Tensor, torch.Tensor] | None
    partial: torch.Tensor
    partial_valid: torch.Tensor


def blend_run(
    grid: TileGrid,
    layout: RunLayout,
    tiles: list[Tile],
    probs: torch.Tensor,
    valid: torch.Tensor,
    weights: Callable[[Tile], torch.Tensor],
) -> BlendedRun:
    """Weighted sum of a run's tile probabilities over its footprint, on their device, cut as
    ``layout`` says.

    ``probs`` ``(tiles, classes, H, W)`` (any float type: summed in float32), ``valid``
    ``(tiles, H, W)``, whole tiles (margins past the scene included; cropped here);
    ``weights(tile)`` the scene-clipped :func:`geoseg.tiling.blend.tile_weights` on the same
    device. Tiles are added left to right, as the stitcher adds them, so a final pixel is the
    same float32 sum.
    """
    row_off, col_off, rows, cols = layout.footprint
    summed = torch.zeros((probs.shape[1], rows, cols), dtype=torch.float32, device=probs.device)
    summed_valid = torch.zeros((rows, cols), dtype=torch.bool, device=probs.device)
    for i, tile in enumerate(tiles):
        r0, c0, h, w = tile.clipped(grid.height, grid.width)
        inside = np.s_[
            r0 - tile.row_off : r0 - tile.row_off + h, c0 - tile.col_off : c0 - tile.col_off + w
        ]
        target = np.s_[r0 - row_off : r0 - row_off + h, c0 - col_off : c0 - col_off + w]
        tile_valid = valid[i][inside]
        # Nodata pixels take no part: their weight is 0.
        weight = weights(tile) * tile_valid
        summed[(slice(None), *target)] += probs[i][(slice(None), *inside)].float() * weight
        summed_valid[target] = tile_valid
    final = None
    if layout.final is not None:
        final = _crop(summed, summed_valid, layout.footprint, layout.final)
    classes = summed.shape[0]
    parts, valids = [summed.new_zeros((classes, 0))], [summed_valid.new_zeros((0,))]
    for cell in layout.partial:
        window = (cell.row_off, cell.col_off, cell.rows, cell.cols)
        part, part_valid = _crop(summed, summed_valid, layout.footprint, window)
        parts.append(part.reshape(classes, -1))
        valids.append(part_valid.reshape(-1))
    return BlendedRun(final, torch.cat(parts, dim=1), torch.cat(valids))


def _crop(
    summed: torch.Tensor,
    valid: torch.Tensor,
    footprint: tuple[int, int, int, int],
    window: tuple[int, int, int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The part ``window`` of a run's sums and validity (both scene windows)."""
    r, c = window[0] - footprint[0], window[1] - footprint[1]
    rows = slice(r, r + window[2])
    cols = slice(c, c + window[3])
    return summed[:, rows, cols], valid[rows, cols]


def add_tile(
    stitcher: Stitcher, tile: Tile, probs: NDArray[np.floating], valid: NDArray[np.bool_]
) -> list[Block]:
    """Stitch one tile's probabilities ``(classes, tile rows, tile cols)`` and validity mask: a
    run of one tile, blended here and added to ``stitcher``.

    Both cover the whole tile, margins past the scene edge included; those are cropped here.
    Returns the blocks that became final. Tile by tile, the reference the runs are held to.
    """
    layout = stitcher.layout([tile])
    run = blend_run(
        stitcher.grid,
        layout,
        [tile],
        tensor_view(np.asarray(probs))[None],
        tensor_view(np.asarray(valid))[None],
        lambda t: tensor_view(stitcher.weights_for(t)),
    )
    finished = []
    if run.final is not None:
        assert layout.final is not None
        final, final_valid = run.final
        finished.append(Block(*layout.final[:2], final.numpy(), final_valid.numpy()))
    return finished + stitcher.add_partial(layout, run.partial.numpy(), run.partial_valid.numpy())


def classify(
    probs: torch.Tensor, valid: torch.Tensor, nodata: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`geoseg.tiling.blend.classes_and_confidence` on the model's device: the same
    numbers. Ids are uint8 when ``nodata`` fits, else int32."""
    best = probs[0].float().clone()
    ids = torch.zeros(best.shape, dtype=torch.uint8 if nodata <= 255 else torch.int32,
                      device=probs.device)  # fmt: skip
    for class_id in range(1, probs.shape[0]):
        ids.masked_fill_(probs[class_id] > best, class_id)
        torch.maximum(best, probs[class_id], out=best)
    invalid = ~valid
    ids.masked_fill_(invalid, nodata)
    confidence = best.mul_(255).round_().clamp_(1, 255).to(torch.uint8)
    confidence.masked_fill_(invalid, 0)
    return ids, confidence
