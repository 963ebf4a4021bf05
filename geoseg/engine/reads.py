"""Read tasks: a batch of tiles, or a CRF band's rows, read from the scene in a Ray worker (no torch
in this module).

Tiles travel as (scene, tile windows); the read task opens the raster itself, so nothing large is
``ray.put`` from the driver and every object can be rebuilt if a worker dies. This module imports
only numpy, Ray and the raster I/O: a Ray worker imports the module of the function it runs, and
torch there would cost each read worker ~300 MiB and ~1 s.
"""

from __future__ import annotations

import time

import numpy as np
import ray
from numpy.typing import NDArray

from geoseg.io.rasters import SceneInfo, read_tile, read_windows
from geoseg.tiling.grid import Tile


# Their CPU share is the pool's (geoseg.engine.scene.cpu_shares), given where it is called.
@ray.remote(max_retries=3)
def read_batch(
    scene: SceneInfo, tiles: list[Tile]
) -> tuple[NDArray[np.generic], NDArray[np.bool_], float]:
    """Read a batch of tiles: raw values ``(B, bands, H, W)``, validity ``(B, H, W)``, seconds."""
    start = time.perf_counter()
    parts = read_windows(scene, [(t.row_off, t.col_off, t.height, t.width) for t in tiles])
    data = np.stack([p[0] for p in parts])
    valid = np.stack([p[1] for p in parts])
    return data, valid, time.perf_counter() - start


@ray.remote(max_retries=3)
def read_rows(scene: SceneInfo, row_off: int, rows: int) -> tuple[NDArray[np.generic], float]:
    """Raw values ``(bands, rows, width)`` of the scene's rows ``[row_off, row_off + rows)`` (the
    CRF's appearance features, read here so that the model actor's thread only computes), and
    seconds."""
    start = time.perf_counter()
    return read_tile(scene, row_off, 0, rows, scene.width)[0], time.perf_counter() - start
