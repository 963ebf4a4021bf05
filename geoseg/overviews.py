"""Overview levels of the class and confidence rasters, one halving at a time (pure).

A COG's overviews halve the raster until it fits one block (``ceil(n / 2)`` rows and columns a
level). Made here while the mask is streamed, block row by block row, instead of by GDAL once the
scene is done: on a 10k x 10k scene GDAL's MODE and AVERAGE overviews took 1.4 of the 2.0 s that
turning the two rasters into COGs took after the last tile (``benchmarks/README.md``).

Each level is made from the one above it: each output pixel from a 2 x 2 cell, a missing row or
column past an odd edge counting as nodata.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def level_factors(height: int, width: int, block: int) -> list[int]:
    """Overview factors ``2, 4, ...`` while the level above is larger than ``block`` either way
    (GDAL's COG default: the smallest overview fits one block)."""
    factors: list[int] = []
    factor = 1
    while max(-(-height // factor), -(-width // factor)) > block:
        factor *= 2
        factors.append(factor)
    return factors


def _cells(values: NDArray[np.integer], nodata: int) -> list[NDArray[np.integer]]:
    """The four pixels of every 2 x 2 cell, in row-major order (top left first)."""
    rows, cols = values.shape
    if rows % 2 or cols % 2:
        padded = np.full((rows + rows % 2, cols + cols % 2), nodata, dtype=values.dtype)
        padded[:rows, :cols] = values
        values = padded
    return [values[0::2, 0::2], values[0::2, 1::2], values[1::2, 0::2], values[1::2, 1::2]]


def halve_mode(ids: NDArray[np.integer], nodata: int) -> NDArray[np.integer]:
    """Each 2 x 2 cell's most frequent class, nodata left out; a tie goes to the class of the
    first of the tied pixels in row-major order; nodata where all four are.

    Of four pixels ``a b / c d``: ``a`` when it is valid and matched by another (it has the most,
    or ties for it first), else ``b`` when matched by ``c`` or ``d``, else ``c`` when ``c == d``,
    else (all different) the first valid one. Most cells of a class map are settled by ``a``
    alone, and only the others go through the remaining tests (a 512 x 10,000 block row of blobs
    and its levels: 8-9 ms, against 19 with every cell through every test).
    """
    a, b, c, d = _cells(ids, nodata)
    out = a.copy()
    rows, cols = np.nonzero(((a != b) & (a != c) & (a != d)) | (a == nodata))
    a, b, c, d = a[rows, cols], b[rows, cols], c[rows, cols], d[rows, cols]
    valid_b, valid_c = b != nodata, c != nodata
    pick = np.where(a != nodata, a, np.where(valid_b, b, np.where(valid_c, c, d)))
    pick = np.where(valid_c & (c == d), c, pick)
    out[rows, cols] = np.where(valid_b & ((b == c) | (b == d)), b, pick)
    return out


def halve_mean(values: NDArray[np.integer], nodata: int) -> NDArray[np.integer]:
    """Each 2 x 2 cell's mean of its valid values, rounded half up; nodata where none is.

    Values are 8-bit (confidence): four of them sum in 16 bits.
    """
    if values.dtype != np.uint8:
        raise ValueError(f"halve_mean takes uint8 values, got {values.dtype}")
    cells = _cells(values, nodata)
    total = cells[0].astype(np.uint16)
    count = (cells[0] != nodata).astype(np.uint16)
    for cell in cells[1:]:
        total += cell
        count += cell != nodata
    total -= (4 - count) * np.uint16(nodata)  # the nodata pixels' share of the sum
    out: NDArray[np.uint8] = ((total + count // 2) // np.maximum(count, 1)).astype(np.uint8)
    out[count == 0] = nodata
    return out
