"""Full-width bands of finished probabilities, with context rows above and below (pure).

The CRF refines a pixel from its neighbours up to ``halo = iterations x window radius`` pixels
away, so refining a band of rows gives exactly the whole-scene result when the band carries
``halo`` finished rows of context above and below (clipped at the scene's top and bottom). The
stitcher hands over finished cells in any order; this assembler keeps them until every row of
``[start - halo, start + band_rows + halo)`` is complete, hands out that band, and forgets rows
that no later band needs. Memory: about ``band_rows + 2 halo + one tile row`` rows of the width.

Probabilities are kept as float16, the model's own output precision (blended in float32 by the
actors): half the bytes of float32 to copy into the bands and through Ray to the CRF.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from geoseg.tiling.blend import Block


@dataclass
class Band:
    """Rows ``[row_off, row_off + rows)`` to refine, with context rows around them."""

    row_off: int
    rows: int
    halo_top: int  # context rows above the core in ``probs`` (fewer at the scene's top)
    probs: NDArray[np.float16]  # (classes, halo_top + rows + halo_bottom, width)
    valid: NDArray[np.bool_]  # (halo_top + rows + halo_bottom, width)

    @property
    def context_row_off(self) -> int:
        """Scene row of the first row of ``probs``."""
        return self.row_off - self.halo_top


class BandAssembler:
    """Turns finished blocks into bands of ``band_rows`` rows with ``halo`` rows of context."""

    def __init__(
        self, height: int, width: int, num_classes: int, band_rows: int, halo: int
    ) -> None:
        if band_rows < 1 or halo < 0:
            raise ValueError(f"band_rows must be >= 1 and halo >= 0, got {band_rows}, {halo}")
        self.height, self.width = height, width
        self.num_classes = num_classes
        self.band_rows, self.halo = band_rows, halo
        # Row spans (the stitcher's row segments) -> probabilities, validity, columns filled.
        self._spans: dict[int, tuple[int, NDArray[np.float16], NDArray[np.bool_], int]] = {}
        self._next_band = 0
        self._kept_from = 0  # rows above were forgotten: no later band needs them

    @property
    def buffered_rows(self) -> int:
        """Rows held (for memory tests)."""
        return sum(stop - start for start, (stop, *_rest) in self._spans.items())

    def add(self, block: Block) -> list[Band]:
        """Place a finished block; return the bands that became complete, top to bottom."""
        rows, cols = block.valid.shape
        start, stop = block.row_off, block.row_off + rows
        span = self._spans.get(start)
        if span is None:
            probs = np.zeros((self.num_classes, rows, self.width), dtype=np.float16)
            valid = np.zeros((rows, self.width), dtype=bool)
            span = (stop, probs, valid, 0)
        span_stop, probs, valid, filled = span
        if span_stop != stop:
            raise ValueError(f"block rows {start}:{stop} do not match the span {start}:{span_stop}")
        probs[:, :, block.col_off : block.col_off + cols] = block.probs
        valid[:, block.col_off : block.col_off + cols] = block.valid
        self._spans[start] = (stop, probs, valid, filled + cols)
        return self._ready_bands()

    def _complete_until(self) -> int:
        """First row not yet complete, scanning the spans from the lowest kept row."""
        row = self._kept_from
        for start in sorted(self._spans):
            stop, _, _, filled = self._spans[start]
            if stop <= row:
                continue  # a span partly above the kept rows, complete already
            if start > row or filled < self.width:
                break
            row = stop
        return row

    def _ready_bands(self) -> list[Band]:
        bands = []
        while self._next_band < self.height:
            start = self._next_band
            stop = min(start + self.band_rows, self.height)
            context_start = max(0, start - self.halo)
            context_stop = min(self.height, stop + self.halo)
            if self._complete_until() < context_stop:
                break
            bands.append(self._cut(start, stop, context_start, context_stop))
            self._next_band = stop
            self._kept_from = max(0, stop - self.halo)
            self._forget_before(self._kept_from)
        return bands

    def _cut(self, start: int, stop: int, context_start: int, context_stop: int) -> Band:
        probs_parts, valid_parts = [], []
        for span_start in sorted(self._spans):
            span_stop, probs, valid, _ = self._spans[span_start]
            lo, hi = max(span_start, context_start), min(span_stop, context_stop)
            if lo < hi:
                probs_parts.append(probs[:, lo - span_start : hi - span_start])
                valid_parts.append(valid[lo - span_start : hi - span_start])
        return Band(
            row_off=start,
            rows=stop - start,
            halo_top=start - context_start,
            probs=np.concatenate(probs_parts, axis=1),
            valid=np.concatenate(valid_parts, axis=0),
        )

    def _forget_before(self, row: int) -> None:
        for span_start in sorted(self._spans):
            span_stop = self._spans[span_start][0]
            if span_stop <= row:
                del self._spans[span_start]
