"""GDAL's block cache while geoseg reads tiles and writes rasters, as GDAL itself holds it.

rasterio hands an integer ``GDAL_CACHEMAX`` to ``GDALSetCacheMax64``: bytes, not megabytes (the
read environment's ``512`` was 512 bytes, so every overlapping window decoded its blocks again).
``get_gdal_config("GDAL_CACHEMAX")`` reads back ``GDALGetCacheMax64``, i.e. what GDAL uses.
"""

from __future__ import annotations

from pathlib import Path

import rasterio
from rasterio.env import get_gdal_config

from geoseg.io.cog import BLOCK, WRITE_ENV
from geoseg.io.rasters import open_scene
from geoseg.models.card import read_card


def test_reads_give_gdal_a_cache_that_holds_a_batchs_blocks(
    fixtures: dict[str, Path], rgb_model: Path
) -> None:
    scene = open_scene(str(fixtures["good"]), read_card(rgb_model))
    # 4 neighbouring 512² tiles off a 512² block grid span 2 block rows x 5 block columns; at 13
    # float32 bands (Sentinel-2 reflectances) those blocks are 272 MB.
    batch_blocks = 2 * 5 * 512 * 512 * 13 * 4
    with scene.env():
        cache = get_gdal_config("GDAL_CACHEMAX")
    assert isinstance(cache, int) and cache >= batch_blocks, cache


def test_writes_go_through_gdals_cache_block_by_block() -> None:
    with rasterio.Env(**WRITE_ENV):
        cache = get_gdal_config("GDAL_CACHEMAX")
    # Smaller than one uint8 block: every block is written as it is made, none held dirty.
    assert isinstance(cache, int) and 0 < cache < BLOCK * BLOCK, cache
