"""COG overviews made while the mask is streamed: the halvings, and the COGs that carry them."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import CRS
from rio_cogeo.cogeo import cog_validate

from geoseg.io.cog import BLOCK, ClassRasterWriter
from geoseg.io.rasters import SceneInfo
from geoseg.models.card import ClassInfo
from geoseg.overviews import halve_mean, halve_mode, level_factors

NODATA = 255
CLASSES = [ClassInfo(id=i, name=n, color=(10 * i, 20 * i, 30 * i)) for i, n in enumerate("abcd")]


def _mode_by_counting(cell: tuple[int, ...]) -> int:
    valid = [v for v in cell if v != NODATA]
    if not valid:
        return NODATA
    counts = {v: valid.count(v) for v in valid}
    return next(v for v in valid if counts[v] == max(counts.values()))


def test_halve_mode_is_the_most_frequent_valid_class_first_on_ties() -> None:
    cells = np.array(list(itertools.product([0, 1, 2, NODATA], repeat=4)), dtype=np.uint8)
    ids = np.zeros((2, 2 * len(cells)), dtype=np.uint8)  # each 2 x 2 cell: a b / c d
    ids[0, 0::2], ids[0, 1::2], ids[1, 0::2], ids[1, 1::2] = cells.T
    expected = [_mode_by_counting(tuple(int(v) for v in cell)) for cell in cells]
    np.testing.assert_array_equal(halve_mode(ids, NODATA)[0], expected)
    # Some of the 256: a tie of two pairs goes to the top left's, a lone pair beats the rest.
    assert halve_mode(np.array([[1, 2], [2, 1]], np.uint8), NODATA).tolist() == [[1]]
    assert halve_mode(np.array([[0, 1], [2, 2]], np.uint8), NODATA).tolist() == [[2]]
    assert halve_mode(np.array([[9, 9], [9, 9]], np.uint8), 9).tolist() == [[9]]


def test_halve_mode_counts_pixels_past_an_odd_edge_as_nodata() -> None:
    ids = np.array([[3, 1, 2], [3, 0, 2], [1, 0, 2]], dtype=np.uint16)
    assert halve_mode(ids, 65535).tolist() == [[3, 2], [1, 2]]
    assert halve_mode(ids, 65535).dtype == np.uint16


def test_halve_mean_is_the_rounded_mean_of_the_valid_values() -> None:
    values = np.array([[1, 2, 0, 0, 255, 255], [0, 0, 0, 0, 255, 254]], dtype=np.uint8)
    assert halve_mean(values, 0).tolist() == [[2, 0, 255]]  # 1.5 -> 2; none valid -> nodata
    assert halve_mean(np.array([[7], [8], [9]], np.uint8), 0).tolist() == [[8], [9]]
    assert halve_mean(np.array([[255, 255, 254], [255, 1, 255]], np.uint8), 255).tolist() == [
        [1, 254]
    ]
    with pytest.raises(ValueError, match="uint8 values, got uint16"):
        halve_mean(np.ones((2, 2), np.uint16), 0)  # four of them could overflow the sum


@pytest.mark.parametrize(
    ("height", "width", "factors"),
    [
        (512, 512, []),
        (513, 1, [2]),
        (10_000, 10_000, [2, 4, 8, 16, 32]),
        (3, BLOCK * BLOCK + 1, [2**k for k in range(1, 11)]),
    ],
)
def test_levels_halve_until_one_block_holds_the_raster(
    height: int, width: int, factors: list[int]
) -> None:
    assert level_factors(height, width, BLOCK) == factors


def _scene(folder: Path, height: int, width: int) -> SceneInfo:
    return SceneInfo(
        uri=str(folder / "scene.tif"),
        height=height,
        width=width,
        crs_wkt=CRS.from_epsg(32633).to_wkt(),
        transform=Affine(2.0, 0.0, 500_000.0, 0.0, -2.0, 4_000_000.0),
        band_indexes=(1, 2, 3),
        dtype="uint8",
    )


@pytest.mark.parametrize(("height", "width"), [(1300, 1100), (3, BLOCK * BLOCK + 1)])
def test_the_cogs_carry_the_halvings_of_the_streamed_block_rows(
    tmp_path: Path, height: int, width: int
) -> None:
    """Block rows written bottom first; the 262,145-wide scene has a level coarser than a block
    row can feed (made from the last streamed level at the end)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4, (height, width)).astype(np.uint8)
    ids[: height // 3, : width // 3] = NODATA
    confidence = np.where(ids == NODATA, 0, rng.integers(64, 256, ids.shape)).astype(np.uint8)
    scene = _scene(tmp_path, height, width)
    writer = ClassRasterWriter(tmp_path, scene, CLASSES, confidence=True)
    for row in reversed(range(0, height, BLOCK)):
        writer.write(row, 0, ids[row : row + BLOCK], confidence[row : row + BLOCK])
    writer.close_streams()
    writer.write_cogs()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "confidence.tif", "mask.qml", "mask.tif", "mask.tif.aux.xml"
    ]  # fmt: skip
    factors = level_factors(height, width, BLOCK)
    for name, values, halve, nodata in (
        ("mask.tif", ids, halve_mode, NODATA),
        ("confidence.tif", confidence, halve_mean, 0),
    ):
        valid, errors, _ = cog_validate(str(tmp_path / name))
        assert valid and not errors, (name, errors)
        with rasterio.open(tmp_path / name) as cog:
            assert len(cog.overviews(1)) == len(factors)  # (rasterio's factors are rounded)
            assert cog.nodata == nodata
            np.testing.assert_array_equal(cog.read(1), values)
        level = values
        for index, _ in enumerate(factors):
            level = halve(level, nodata)
            with rasterio.open(tmp_path / name, overview_level=index) as overview:
                np.testing.assert_array_equal(overview.read(1), level)  # shapes too
    with rasterio.open(tmp_path / "mask.tif") as mask:
        assert mask.colormap(1)[3] == (30, 60, 90, 255)
        assert json.loads(mask.tags()["CLASS_NAMES"]) == {"0": "a", "1": "b", "2": "c", "3": "d"}
        assert mask.descriptions == ("class",)
        assert mask.crs.to_epsg() == 32633
