"""Job-level outputs: the GeoParquet dataset, border merging, mask VRTs; on real files."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from conftest import shared
from rasterio.crs import CRS
from rasterio.transform import from_origin

from geoseg.io.job_outputs import DATASET, MERGED_FILE, write_job_outputs
from geoseg.io.vectors import vectorize_file

H, W = 96, 128
RES = 10.0
X0, Y0 = 500000.0, 5000000.0
NAMES = ["background", "field", "road", "water", "forest"]
COLORS = [(0, 0, 0), (255, 200, 0), (120, 120, 120), (0, 90, 255), (0, 140, 40)]


def _write_scene(
    root: Path, name: str, ids: np.ndarray, x0: float, epsg: int = 32633, confidence: int = 0
) -> Path:
    """``root/name/mask.tif`` (geoseg's conventions), a constant ``confidence.tif`` unless 0,
    and its polygons via ``vectorize_file``."""
    folder = root / name
    folder.mkdir(parents=True)
    mask = folder / "mask.tif"
    if confidence:
        with rasterio.open(
            folder / "confidence.tif",
            "w",
            driver="GTiff",
            width=ids.shape[1],
            height=ids.shape[0],
            count=1,
            dtype="uint8",
            nodata=0,
            crs=CRS.from_epsg(epsg),
            transform=from_origin(x0, Y0, RES, RES),
        ) as dst:
            dst.write(np.where(ids == 255, 0, confidence).astype(np.uint8), 1)
    with rasterio.open(
        mask,
        "w",
        driver="GTiff",
        width=ids.shape[1],
        height=ids.shape[0],
        count=1,
        dtype="uint8",
        nodata=255,
        crs=CRS.from_epsg(epsg),
        transform=from_origin(x0, Y0, RES, RES),
        tiled=True,
        blockxsize=128,
        blockysize=128,
        compress="DEFLATE",
    ) as dst:
        dst.write(ids, 1)
        dst.write_colormap(1, {i: (*c, 255) for i, c in enumerate(COLORS)})
        dst.update_tags(
            CLASS_NAMES=json.dumps(dict(enumerate(NAMES))),
            CLASS_COLORS=json.dumps({i: list(c) for i, c in enumerate(COLORS)}),
        )
    vectorize_file(mask, folder, scene_id=name)
    return mask


def _masks() -> tuple[np.ndarray, np.ndarray]:
    a = np.full((H, W), 255, np.uint8)
    b = np.full((H, W), 255, np.uint8)
    a[10:40, 100:W] = 1  # class 1 across the border: one feature
    b[10:40, 0:30] = 1
    a[60:70, 118:W] = 2  # class 2 meeting at a corner only: two features
    b[70:80, 0:10] = 2
    a[82:92, 118:W] = 3  # different classes across the border: not merged
    b[82:92, 0:10] = 4
    return a, b


@pytest.fixture
def two_scenes(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    a, b = _masks()
    _write_scene(tmp_path, "a", a, X0, confidence=204)
    _write_scene(tmp_path, "b", b, X0 + W * RES, confidence=102)  # origin at a's right edge
    return tmp_path, a, b


def test_dataset_reads_back_with_merged_border_polygons(
    two_scenes: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    root, _, _ = two_scenes
    outputs = write_job_outputs(root, ["a", "b"])
    assert outputs.polygons == [DATASET]
    assert outputs.merged_features == 1 and outputs.merged_from == 2
    assert outputs.overlapping_scenes == []
    assert sorted(p.name for p in (root / DATASET).iterdir()) == [
        MERGED_FILE,
        "scene-a.parquet",
        "scene-b.parquet",
    ]
    frame = gpd.read_parquet(root / DATASET)
    assert frame.crs.to_epsg() == 32633
    assert len(frame) == 5  # 3 + 3 per scene, two of them merged into one
    assert frame.geometry.is_valid.all()
    field = frame[frame.class_id == 1]
    assert len(field) == 1
    merged = field.iloc[0]
    assert merged.scene_id == "a,b"
    assert merged.geometry.geom_type == "Polygon"
    assert merged.area_m2 == pytest.approx((28 + 30) * 30 * RES * RES)
    assert merged.perimeter_m == pytest.approx(2 * (58 + 30) * RES)
    assert merged.class_name == "field"
    assert pd.isna(merged.fid)
    # Area-weighted: 28 x 30 pixels at 0.8, 30 x 30 at 0.4.
    assert merged.confidence_mean == pytest.approx((28 * 0.8 + 30 * 0.4) / 58)
    roads = frame[frame.class_id == 2]
    assert sorted(roads.scene_id) == ["a", "b"]  # corner contact only
    assert sorted(frame[frame.class_id.isin([3, 4])].scene_id) == ["a", "b"]
    # The per-scene files are unchanged.
    for name in ("a", "b"):
        scene = gpd.read_file(root / name / "polygons.gpkg", layer="polygons")
        assert len(scene) == 3 and set(scene.scene_id) == {name}


def test_vrt_mosaic_equals_sources_and_lists_categories(
    two_scenes: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    root, a, b = two_scenes
    outputs = write_job_outputs(root, ["a", "b"])
    assert outputs.vrts == ["mask_epsg32633.vrt"]
    vrt = root / "mask_epsg32633.vrt"
    with rasterio.open(vrt) as src:
        assert (src.height, src.width) == (H, 2 * W)
        assert src.transform == from_origin(X0, Y0, RES, RES)
        assert src.crs == CRS.from_epsg(32633)
        assert src.nodata == 255
        np.testing.assert_array_equal(src.read(1), np.hstack([a, b]))
        assert src.colormap(1)[1] == (*COLORS[1], 255)
    info = json.loads(
        subprocess.run(
            ["gdalinfo", "-json", str(vrt)], check=True, capture_output=True, text=True
        ).stdout
    )
    assert info["bands"][0]["categories"] == NAMES
    assert {Path(f).as_posix().split("/")[-2] for f in info["files"][1:]} == {"a", "b"}
    # Relative sources: the output root can be moved.
    text = vrt.read_text()
    assert 'relativeToVRT="1">a/mask.tif<' in text and str(root) not in text


def test_scene_in_another_crs_gets_its_own_vrt_and_dataset(
    two_scenes: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    root, a, _ = two_scenes
    _write_scene(root, "c", a, X0 + 2 * W * RES, epsg=32634)
    outputs = write_job_outputs(root, ["a", "b", "c"])
    assert sorted(outputs.vrts) == ["mask_epsg32633.vrt", "mask_epsg32634.vrt"]
    assert sorted(outputs.polygons) == ["polygons_epsg32633.parquet", "polygons_epsg32634.parquet"]
    with rasterio.open(root / "mask_epsg32634.vrt") as src:
        assert src.crs == CRS.from_epsg(32634) and (src.height, src.width) == (H, W)
        np.testing.assert_array_equal(src.read(1), a)
    other = gpd.read_parquet(root / "polygons_epsg32634.parquet")
    assert other.crs.to_epsg() == 32634 and set(other.scene_id) == {"c"} and len(other) == 3
    assert len(gpd.read_parquet(root / "polygons_epsg32633.parquet")) == 5


def test_overlapping_scenes_are_not_merged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = _masks()
    _write_scene(tmp_path, "y2019", a, X0)
    _write_scene(tmp_path, "y2020", a, X0 + 64 * RES)  # half overlapping
    with caplog.at_level(logging.WARNING):
        outputs = write_job_outputs(tmp_path, ["y2019", "y2020"])
    assert outputs.overlapping_scenes == [["y2019", "y2020"]]
    assert outputs.merged_features == 0
    assert "overlap" in caplog.text
    assert len(gpd.read_parquet(tmp_path / DATASET)) == 6


def test_segment_writes_job_outputs_for_overlapping_naip(ray_local: None, tmp_path: Path) -> None:
    from geoseg.engine.job import segment
    from geoseg.engine.scene import SegmentOptions
    from geoseg.models.store import init_model

    sources = [
        shared("naip/m_4709963_se_14_1_20190904.tif"),
        shared("naip/m_4709963_se_14_1_20200831.tif"),
    ]
    bands = ["red", "green", "blue", "nir"]
    model_dir = tmp_path / "model"
    init_model(
        "unet",
        bands,
        ["water", "vegetation", "built", "bare"],
        model_dir,
        arch_args={"depth": 2, "base_channels": 4},
        tile_size=256,
        overlap=32,
    )
    out = tmp_path / "out"
    results = segment(
        [str(s) for s in sources],
        model_dir,
        out,
        SegmentOptions(band_names=tuple(bands), progress=False, confidence=False),
    )
    assert [r.status for r in results] == ["ok", "ok"]
    names = [r.name for r in results]
    job = json.loads((out / "run.json").read_text())["job_outputs"]
    assert job["polygons"] == [DATASET]
    assert job["vrts"] == ["mask_epsg26914.vrt"]
    assert job["merged_features"] == 0
    assert job["overlapping_scenes"] == [sorted(names)]
    frame = gpd.read_parquet(out / DATASET)
    assert len(frame) == sum(r.polygons or 0 for r in results)
    assert set(frame.scene_id) == set(names)
    info = subprocess.run(
        ["gdalinfo", str(out / "mask_epsg26914.vrt")], check=True, capture_output=True, text=True
    ).stdout
    for name in names:
        assert f"{name}/mask.tif" in info
    assert "Categories:" in info
