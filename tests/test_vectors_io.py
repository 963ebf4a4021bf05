"""Polygon files as users get them: every format, attributes, styles, `geoseg vectorize`.

Files are read back with GDAL's own command-line client (Debian's ``ogrinfo``) where it has the
driver, and with pyarrow for GeoParquet (Debian's GDAL 3.6 is built without Arrow).
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyogrio
import pytest
import rasterio
import shapely
from affine import Affine
from click.testing import CliRunner
from pyproj import CRS

from geoseg.cli import main
from geoseg.engine.scene import SegmentOptions, _coverage, _write_polygons
from geoseg.errors import OutputExistsError
from geoseg.io.cog import BLOCK, ClassRasterWriter
from geoseg.io.rasters import SceneInfo
from geoseg.io.vectors import FORMATS, read_class_raster, read_strips
from geoseg.measure import Quantity
from geoseg.models.card import ClassInfo, ModelCard
from geoseg.vectorize import PolygonLayer, vectorize_strips

CLASSES = ["water", "vegetation", "built", "bare", "road", "rail"]
COLORS = [(31, 119, 180), (44, 160, 44), (214, 39, 40), (188, 189, 34), (148, 103, 189), (9, 9, 9)]
TRANSFORM = Affine(2.0, 0.0, 500_000.0, 0.0, -2.0, 4_000_000.0)
EPSG = 32633


def card() -> ModelCard:
    return ModelCard(
        name="test-model",
        arch="unet",
        total_stride=8,
        bands=["red", "green", "blue"],
        input_dtypes=["uint8"],
        classes=[
            ClassInfo(id=i, name=n, color=c)
            for i, (n, c) in enumerate(zip(CLASSES, COLORS, strict=True))
        ],
    )


def blob_mask(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Six classes of smooth blobs with speckle and a nodata (255) corner."""
    rng = np.random.default_rng(seed)
    fields = rng.random((len(CLASSES), h // 12 + 2, w // 12 + 2))
    ys = np.linspace(0, fields.shape[1] - 1.001, h)
    xs = np.linspace(0, fields.shape[2] - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    f = fields[:, y0][:, :, x0] * (1 - fy) * (1 - fx) + fields[:, y0 + 1][:, :, x0] * fy * (1 - fx)
    f += fields[:, y0][:, :, x0 + 1] * (1 - fy) * fx + fields[:, y0 + 1][:, :, x0 + 1] * fy * fx
    mask = f.argmax(axis=0).astype(np.uint8)
    speckle = rng.random((h, w)) < 0.01
    mask[speckle] = rng.integers(0, len(CLASSES), int(speckle.sum()))
    mask[: h // 8, : w // 8] = 255
    return mask


def make_geoseg_scene(folder: Path, h: int = 150, w: int = 200) -> tuple[Path, SceneInfo]:
    """``mask.tif`` + ``confidence.tif`` written by geoseg's own COG writer, as `segment` does."""
    folder.mkdir(parents=True, exist_ok=True)
    scene = SceneInfo(
        uri=str(folder / "scene.tif"),
        height=h,
        width=w,
        crs_wkt=CRS.from_epsg(EPSG).to_wkt(),
        transform=TRANSFORM,
        band_indexes=(1, 2, 3),
        dtype="uint8",
    )
    mask = blob_mask(h, w)
    confidence = np.where(
        mask == 255, 0, np.random.default_rng(1).integers(64, 256, mask.shape)
    ).astype(np.uint8)
    writer = ClassRasterWriter(folder, scene, card().classes, confidence=True)
    writer.write(0, 0, mask, confidence)
    writer.close_streams()
    writer.write_cogs()
    return folder / "mask.tif", scene


def finished_mask_layer(folder: Path, scene: SceneInfo, options: SegmentOptions) -> PolygonLayer:
    """The polygons of ``folder``'s finished ``mask.tif`` (with its confidence), read in strips."""
    return vectorize_strips(
        read_strips(folder / "mask.tif", folder / "confidence.tif", BLOCK),
        scene.transform, scene.width, scene.height, 255, scene.crs_wkt, _coverage(options),
        with_confidence=True,
    )  # fmt: skip


def ogr_feature_counts(path: Path) -> dict[str, int]:
    """Layer name -> feature count, as Debian's `ogrinfo -so -al` reports them."""
    out = subprocess.run(
        ["ogrinfo", "-so", "-al", str(path)], check=True, capture_output=True, text=True
    ).stdout
    names = re.findall(r"^Layer name: (\S+)$", out, re.MULTILINE)
    counts = [int(c) for c in re.findall(r"^Feature Count: (\d+)$", out, re.MULTILINE)]
    return dict(zip(names, counts, strict=True))


@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The polygon step of `segment` on geoseg's own mask, every format, all options on."""
    folder = tmp_path_factory.mktemp("scene")
    _, scene = make_geoseg_scene(folder)
    options = SegmentOptions(
        min_area=Quantity(40, "m2"),
        fill_holes_below=Quantity(20, "px"),
        simplify=Quantity(1, "px"),
        vector_formats=("gpkg", "parquet", "fgb"),
    )
    layer = finished_mask_layer(folder, scene, options)
    count = _write_polygons(folder, scene, card(), layer, options, "ab" * 32, "scene-1")
    return folder, count


def test_every_format_is_written_and_read_back(segmented: tuple[Path, int]) -> None:
    folder, count = segmented
    assert count > 20
    assert ogr_feature_counts(folder / "polygons.gpkg") == {"polygons": count, "layer_styles": 1}
    assert ogr_feature_counts(folder / "polygons.fgb") == {"polygons": count}
    parquet = pq.ParquetFile(folder / "polygons.parquet")
    assert parquet.metadata.num_rows == count
    geo = json.loads(parquet.schema_arrow.metadata[b"geo"])
    assert geo["version"] == "1.1.0"
    assert geo["columns"]["geometry"]["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    with sqlite3.connect(folder / "polygons.gpkg") as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47  # "GPKG"
        assert db.execute("PRAGMA user_version").fetchone()[0] == 10200  # GeoPackage 1.2


def test_attributes_are_complete_and_identical_across_formats(
    segmented: tuple[Path, int],
) -> None:
    folder, count = segmented
    frames = {
        "gpkg": pyogrio.read_dataframe(
            folder / FORMATS["gpkg"], layer="polygons", fid_as_index=True
        ),
        "fgb": pyogrio.read_dataframe(folder / FORMATS["fgb"]),
        "parquet": gpd.read_parquet(folder / FORMATS["parquet"]),
    }
    gpkg = frames["gpkg"]
    assert gpkg.index.tolist() == list(range(1, count + 1))  # the GPKG fid is our fid
    assert frames["parquet"]["fid"].tolist() == list(range(1, count + 1))
    # FlatGeobuf stores features in its R-tree's Hilbert order; the fid column is the id.
    frames["fgb"] = frames["fgb"].sort_values("fid")
    assert frames["fgb"]["fid"].tolist() == list(range(1, count + 1))
    columns = ["class_id", "class_name", "area_m2", "perimeter_m", "confidence_mean"]
    columns += ["scene_id", "model_name", "weights_sha256"]
    for name, frame in frames.items():
        assert set(columns) <= set(frame.columns), name
        assert frame.crs.to_epsg() == EPSG
        pd.testing.assert_frame_equal(
            pd.DataFrame(frame[columns]).reset_index(drop=True).astype(object),
            pd.DataFrame(gpkg[columns]).reset_index(drop=True).astype(object),
            check_dtype=False,
        )
        same = shapely.equals_exact(frame.geometry.values, gpkg.geometry.values, 1e-9)
        assert np.asarray(same).all(), name
    assert (gpkg.class_name == gpkg.class_id.map(dict(enumerate(CLASSES)))).all()
    assert set(gpkg.scene_id) == {"scene-1"} and set(gpkg.model_name) == {"test-model"}
    assert set(gpkg.weights_sha256) == {"ab" * 32}
    assert gpkg.confidence_mean.between(64 / 255, 1.0).all()
    np.testing.assert_allclose(gpkg.area_m2, gpkg.geometry.area)
    np.testing.assert_allclose(gpkg.perimeter_m, gpkg.geometry.length)
    # The sieve left nothing below 40 m² (10 px) that has a neighbour.
    assert gpkg.area_m2.min() > 0


def test_styles_are_stored_for_qgis(segmented: tuple[Path, int]) -> None:
    folder, _ = segmented
    with sqlite3.connect(folder / "polygons.gpkg") as db:
        rows = db.execute(
            "SELECT f_table_name, f_geometry_column, useAsDefault, styleQML FROM layer_styles"
        ).fetchall()
    assert len(rows) == 1
    table, column, default, qml = rows[0]
    assert (table, column, default) == ("polygons", "geom", 1)
    assert 'type="categorizedSymbol"' in qml and 'attr="class_id"' in qml
    for name in CLASSES:
        assert f'label="{name}"' in qml
    assert (folder / "polygons.qml").read_text() == qml  # sidecar for fgb / parquet
    raster_qml = (folder / "mask.qml").read_text()
    assert 'type="paletted"' in raster_qml and 'label="vegetation"' in raster_qml


def test_vectorize_command_refuses_to_overwrite_and_commits_atomically(tmp_path: Path) -> None:
    mask, _ = make_geoseg_scene(tmp_path / "scene", 60, 80)
    out = tmp_path / "vectors"
    runner = CliRunner()
    args = ["vectorize", str(mask), "--out", str(out), "--vector-format", "gpkg,fgb"]
    first = runner.invoke(main, [*args, "--min-area", "3px", "--simplify", "1px"])
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in out.iterdir()) == [
        "polygons.fgb",
        "polygons.gpkg",
        "polygons.qml",
    ]
    before = (out / "polygons.gpkg").read_bytes()
    again = runner.invoke(main, args)
    assert isinstance(again.exception, OutputExistsError)
    assert (out / "polygons.gpkg").read_bytes() == before
    assert not list(out.glob(".geoseg-partial-*"))
    replaced = runner.invoke(main, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    frame = pyogrio.read_dataframe(out / "polygons.gpkg", layer="polygons")
    # Geoseg's own mask: names from its tags, confidence from the confidence.tif beside it,
    # scene id from its folder.
    assert set(frame.class_name) <= set(CLASSES)
    assert frame.confidence_mean.notna().all() and set(frame.scene_id) == {"scene"}
    assert not list(out.glob(".geoseg-partial-*"))
    bad = runner.invoke(main, [*args, "--vector-format", "shp"])
    assert bad.exit_code == 2 and "shp" in bad.output


@pytest.mark.parametrize(
    ("flag", "geoseg_info", "rasterio_debug"),
    [("-q", False, False), ("-v", True, False), ("-vv", True, True)],
)
def test_verbosity(flag: str, geoseg_info: bool, rasterio_debug: bool, tmp_path: Path) -> None:
    """``-v`` is geoseg's own detail; other libraries' debug output (rasterio writes a line per
    GDAL environment and colour-table entry) only with ``-vv``."""
    mask, _ = make_geoseg_scene(tmp_path / "scene", 60, 80)
    command = [
        sys.executable,
        "-m",
        "geoseg",
        flag,
        "vectorize",
        str(mask),
        "--out",
        str(tmp_path / "v"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith("INFO geoseg:") for line in lines) is geoseg_info, lines
    assert any(line.startswith("DEBUG rasterio") for line in lines) is rasterio_debug, lines
    if flag == "-q":
        assert lines == []


def test_class_names_fall_back_to_card_and_colour_table_then_ids(tmp_path: Path) -> None:
    profile = {
        "driver": "GTiff",
        "width": 8,
        "height": 4,
        "count": 1,
        "dtype": "uint8",
        "crs": f"EPSG:{EPSG}",
        "transform": TRANSFORM,
    }
    data = np.repeat(np.array([[0, 0, 1, 1, 2, 2, 7, 7]], dtype=np.uint8), 4, axis=0)
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", **profile) as dst:
        dst.write(data, 1)
        dst.write_colormap(1, {0: (1, 2, 3, 255), 1: (4, 5, 6, 255), 7: (7, 8, 9, 255)})
    raster = read_class_raster(plain, card().classes[:2])
    assert [(c.id, c.name, c.color) for c in raster.classes] == [
        (0, "water", (1, 2, 3)),
        (1, "vegetation", (4, 5, 6)),
        (7, "class_7", (7, 8, 9)),
    ]
    assert raster.nodata == 256  # none declared: every pixel is a class
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["vectorize", str(plain), "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pyogrio.read_dataframe(out / "polygons.gpkg", layer="polygons")
    assert frame.class_name.tolist() == ["class_0", "class_1", "class_2", "class_7"]
    assert frame.confidence_mean.isna().all() and set(frame.scene_id) == {"plain"}
    assert frame.model_name.isna().all()
