"""End to end on real imagery in ../shared/data, through a real local Ray and real GDAL files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from conftest import shared
from rio_cogeo.cogeo import cog_validate

from geoseg.engine.job import segment
from geoseg.engine.scene import SegmentOptions
from geoseg.models.card import read_card
from geoseg.models.store import init_model

CLASSES = ["water", "vegetation", "built", "bare"]


def _model(root: Path, name: str, bands: list[str], dtype: str) -> Path:
    out = root / name
    init_model(
        "unet",
        bands,
        CLASSES,
        out,
        input_dtype=dtype,
        arch_args={"depth": 3, "base_channels": 8},
        tile_size=256,
        overlap=64,
    )
    return out


CASES = [
    # (shared file, bands of the model, dtype, --bands for files without band names)
    ("landsat7-rgb/RGB.byte.tif", ["red", "green", "blue"], "uint8", None),
    (
        "naip/m_4709963_se_14_1_20190904.tif",
        ["red", "green", "blue", "nir"],
        "uint8",
        ("red", "green", "blue", "nir"),
    ),
    ("sentinel2-l1c-slovenia/scene_2.tif", ["B02", "B03", "B04", "B08"], "uint16", None),
    (
        "aerial-new-brunswick/23322E759967N_clipped_1m_1of2.tif",
        ["red", "green", "blue"],
        "uint8",
        None,
    ),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c[0].split("/")[0])
def segmented(
    request: pytest.FixtureRequest, ray_local: None, tmp_path_factory: pytest.TempPathFactory
):  # type: ignore[no-untyped-def]
    relative, bands, dtype, band_names = request.param
    source = shared(relative)
    root = tmp_path_factory.mktemp("seg")
    model_dir = _model(root, "model", bands, dtype)
    out = root / "out"
    results = segment(
        [str(source)], model_dir, out, SegmentOptions(band_names=band_names, progress=False)
    )
    assert [r.status for r in results] == ["ok"], results[0].error
    return source, model_dir, out / results[0].name, out


def test_mask_grid_equals_input_and_nodata_matches(segmented) -> None:  # type: ignore[no-untyped-def]
    source, model_dir, scene_dir, _ = segmented
    card = read_card(model_dir)
    with rasterio.open(source) as src, rasterio.open(scene_dir / "mask.tif") as mask:
        assert mask.crs == src.crs
        assert mask.transform == src.transform
        assert (mask.height, mask.width) == (src.height, src.width)
        assert mask.dtypes[0] == "uint8" and mask.nodata == 255
        ids = mask.read(1)
        input_nodata = src.dataset_mask() == 0
        np.testing.assert_array_equal(ids == 255, input_nodata)
        assert ids[~input_nodata].max() < card.num_classes
        colormap = mask.colormap(1)
        for c in card.classes:
            assert colormap[c.id] == (*c.color, 255)
        assert json.loads(mask.tags()["CLASS_NAMES"]) == {str(c.id): c.name for c in card.classes}
        if max(src.height, src.width) > 512:
            assert mask.overviews(1), "COG without internal overviews"
    with rasterio.open(scene_dir / "confidence.tif") as conf:
        values = conf.read(1)
        np.testing.assert_array_equal(values == 0, input_nodata)
        assert values[~input_nodata].min() >= 255 // card.num_classes


def test_outputs_are_valid_cogs_and_gdalinfo_shows_classes(segmented) -> None:  # type: ignore[no-untyped-def]
    _, model_dir, scene_dir, _ = segmented
    card = read_card(model_dir)
    for name in ("mask.tif", "confidence.tif"):
        valid, errors, _ = cog_validate(str(scene_dir / name))
        assert valid and not errors, (name, errors)
    info = json.loads(
        subprocess.run(
            ["gdalinfo", "-json", str(scene_dir / "mask.tif")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    band = info["bands"][0]
    assert band["colorInterpretation"] == "Palette"
    assert band["categories"] == [c.name for c in card.classes]
    entries = band["colorTable"]["entries"]
    assert entries[0][:3] == list(card.classes[0].color)
    assert info["metadata"][""]["CLASS_NAMES"]


def test_polygon_areas_equal_mask_pixel_areas(segmented) -> None:  # type: ignore[no-untyped-def]
    _, model_dir, scene_dir, out = segmented
    card = read_card(model_dir)
    polygons = gpd.read_file(scene_dir / "polygons.gpkg", layer="polygons")
    with rasterio.open(scene_dir / "mask.tif") as mask:
        ids = mask.read(1)
        pixel_area = abs(mask.transform.a * mask.transform.e)
        assert polygons.crs == mask.crs
    assert polygons.geometry.is_valid.all()
    assert list(polygons.columns) == [
        "class_id",
        "class_name",
        "area_m2",
        "perimeter_m",
        "confidence_mean",
        "scene_id",
        "model_name",
        "weights_sha256",
        "geometry",
    ]
    assert set(polygons.weights_sha256) == {
        json.loads((out / "run.json").read_text())["model"]["weights_sha256"]
    }
    names = {c.id: c.name for c in card.classes}
    assert (polygons.class_name == polygons.class_id.map(names)).all()
    for c in card.classes:
        pixels = int((ids == c.id).sum())
        area = polygons.loc[polygons.class_id == c.id, "area_m2"].sum()
        assert area == pytest.approx(pixels * pixel_area, rel=1e-9, abs=1e-6)
    np.testing.assert_allclose(polygons.area, polygons.area_m2, rtol=1e-9)
    run = json.loads((out / "run.json").read_text())
    scene = run["scenes"][0]
    assert scene["status"] == "ok" and scene["polygons"] == len(polygons)
    assert sum(scene["class_pixels"].values()) == int((ids != 255).sum())
    assert scene["class_pixels"] == {c.name: int((ids == c.id).sum()) for c in card.classes}
    assert run["model"]["weights_sha256"] == run["workers"][0]["weights_sha256"]
