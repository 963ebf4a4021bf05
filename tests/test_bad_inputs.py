"""Bad inputs, one case per test (docs/reliability.md maps each case to its test).

A bad input fails that input only, with an error naming the file, what is wrong and what to do;
the other inputs complete; run.json lists the failure; no partial folder is left; the exit code is
1. Inputs that are odd but valid (all nodata, NaN nodata, other dtypes, other CRSs, odd sizes)
succeed with exact results. Fixtures: tests/data/make_fixtures.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import torch
from click.testing import CliRunner, Result
from conftest import shared
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_validate

from geoseg.cli import EXIT_SCENE_FAILED, main
from geoseg.errors import BandMismatchError, NotGeoreferencedError
from geoseg.io.rasters import open_scene, read_tile, read_windows
from geoseg.models.card import ModelCard, read_card
from geoseg.models.store import init_model, normalize

WINDOW = re.compile(r"cannot read window rows (\d+):(\d+), cols (\d+):(\d+)")
JOB_OUTPUTS_ONE_CRS = ["mask_epsg32633.vrt", "polygons.parquet", "run.json"]


@pytest.fixture(scope="module")
def dtype_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The small RGB U-Net of ``rgb_model`` for uint16, int16 and float32 inputs (card scaling:
    1/10000, 1/10000 and 1)."""
    root = tmp_path_factory.mktemp("dtype_models")
    models = {}
    for dtype in ("uint16", "int16", "float32"):
        models[dtype] = root / dtype
        init_model(
            "unet",
            ["red", "green", "blue"],
            ["water", "vegetation", "built", "bare"],
            models[dtype],
            input_dtype=dtype,
            arch_args={"depth": 3, "base_channels": 8},
            tile_size=128,
            overlap=32,
        )
    return models


def _segment(*args: str) -> tuple[Result, dict[str, Any]]:
    """``geoseg -q segment ARGS`` in this process (on the session's Ray), and its run.json."""
    result = CliRunner().invoke(main, ["-q", "segment", *args])
    out = Path(args[args.index("--out") + 1])
    return result, json.loads((out / "run.json").read_text())


def _by_stem(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {Path(s["uri"]).stem: s for s in run["scenes"]}


def _read(path: Path) -> tuple[np.ndarray, CRS, Any]:
    with rasterio.open(path) as src:
        return src.read(1), src.crs, src.transform


def _broken_blocks(path: Path) -> list[Window]:
    """The 128 x 128 blocks of ``path`` that GDAL cannot decode."""
    broken = []
    with rasterio.open(path) as src:
        for row in range(0, src.height, 128):
            for col in range(0, src.width, 128):
                window = Window(col, row, min(128, src.width - col), min(128, src.height - row))
                try:
                    src.read(window=window)
                except RasterioError:
                    broken.append(window)
    return broken


def _intersects(a: Window, b: Window) -> bool:
    return bool(
        a.row_off < b.row_off + b.height
        and b.row_off < a.row_off + a.height
        and a.col_off < b.col_off + b.width
        and b.col_off < a.col_off + a.width
    )


# ----------------------------------------------------------------------- unreadable files


def _only_good_is_left(out: Path) -> None:
    """Only the good scene's committed folder: nothing partial, nothing for the failed inputs."""
    assert sorted(p.name for p in out.iterdir()) == ["good", "mask_epsg32633.vrt", "run.json"]
    assert sorted(p.name for p in (out / "good").iterdir()) == [
        "confidence.tif", "mask.qml", "mask.tif", "mask.tif.aux.xml",
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["corrupt", "truncated_cog"])
def test_corrupt_or_truncated_tiff_fails_at_read_naming_the_window(
    ray_local: None, fixtures: dict[str, Path], rgb_model: Path, tmp_path: Path, name: str
) -> None:
    """Junk in the middle of the blocks, or a COG cut after 60% of its bytes: the file opens, and
    fails when a damaged block is read; the error names a window that holds a damaged block;
    the good scene after it is segmented as usual.
    """
    path = str(fixtures[name])
    scene = open_scene(path, read_card(rgb_model))  # opens: header and directory are intact
    assert (scene.height, scene.width) == (512, 512)
    broken = _broken_blocks(fixtures[name])
    assert 0 < len(broken) < 16
    out = tmp_path / "out"
    result, run = _segment(
        path, str(fixtures["good"]), "--model", str(rgb_model), "--out", str(out), "--no-polygons"
    )
    assert result.exit_code == EXIT_SCENE_FAILED, result.output
    assert run["summary"] == {"ok": 1, "failed": 1}
    bad, good = run["scenes"]
    assert good["status"] == "ok"
    assert (bad["status"], bad["error_type"]) == ("failed", "RasterReadError"), bad
    error = bad["error"]
    assert error.startswith(f"{path}: cannot read window rows "), error
    assert "the file is corrupt or truncated" in error and "re-download or re-export it" in error
    assert f"FAILED {path}: {error}" in result.output
    match = WINDOW.search(error)
    assert match, error
    row0, row1, col0, col1 = map(int, match.groups())
    assert 0 <= row0 < row1 <= 512 and 0 <= col0 < col1 <= 512, error
    named = Window(col0, row0, col1 - col0, row1 - row0)
    assert any(_intersects(named, block) for block in broken), (error, broken)
    _only_good_is_left(out)


def test_unopenable_files_fail_alone_naming_the_file_and_the_fix(
    ray_local: None, fixtures: dict[str, Path], rgb_model: Path, tmp_path: Path
) -> None:
    """A GeoTIFF cut short (GDAL writes the directory last, so it is lost), a text file, an empty
    file: each fails at open; the good scene after them is segmented."""
    names = ["truncated", "not_a_raster", "empty", "good"]
    out = tmp_path / "out"
    result, run = _segment(
        *(str(fixtures[n]) for n in names),
        "--model", str(rgb_model), "--out", str(out), "--no-polygons",
    )  # fmt: skip
    assert result.exit_code == EXIT_SCENE_FAILED, result.output
    assert run["summary"] == {"ok": 1, "failed": 3}
    by_stem = _by_stem(run)
    assert by_stem["good"]["status"] == "ok"
    gdal_says = {
        "truncated": "TIFFReadDirectory:Failed to read directory",
        "not_a_raster": "not recognized as being in a supported file format",
        "empty": "not recognized as being in a supported file format",
    }
    for name, cause in gdal_says.items():
        scene, path = by_stem[name], str(fixtures[name])
        assert (scene["status"], scene["error_type"]) == ("failed", "RasterReadError"), scene
        error = scene["error"]
        assert error.startswith(f"{path}: cannot open as a raster ("), error
        assert cause in error, error
        assert error.endswith(
            "check it with gdalinfo, and re-download or re-export it as a GeoTIFF"
        )
        assert f"FAILED {path}: {error}" in result.output
    _only_good_is_left(out)


# -------------------------------------------------------------------------- georeferencing


@pytest.mark.parametrize(
    ("name", "message", "fix"),
    [
        ("no_crs", "the raster has no CRS", "gdal_edit.py -a_srs"),
        ("identity_transform", "identity geotransform (no georeferencing)", "gdal_edit.py -a_ullr"),
        ("rotated", "rotated or sheared geotransform", "warp it north-up first (gdalwarp)"),
        ("sheared", "rotated or sheared geotransform", "warp it north-up first (gdalwarp)"),
    ],
)
def test_ungeoreferenced_rasters_are_refused_before_any_compute(
    fixtures: dict[str, Path], rgb_model: Path, name: str, message: str, fix: str
) -> None:
    with pytest.raises(NotGeoreferencedError) as info:
        open_scene(str(fixtures[name]), read_card(rgb_model))
    text = str(info.value)
    assert text.startswith(f"{fixtures[name]}: ") and message in text and fix in text, text


def test_scenes_in_different_crss_are_each_segmented_in_their_own_crs(
    ray_local: None, fixtures: dict[str, Path], rgb_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    inputs = [str(fixtures["good"]), str(fixtures["other_crs"])]  # same pixels, UTM 33N and 34N
    result, run = _segment(*inputs, "--model", str(rgb_model), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert run["summary"] == {"ok": 2, "failed": 0}
    good, good_crs, good_transform = _read(out / "good" / "mask.tif")
    other, other_crs, other_transform = _read(out / "other_crs" / "mask.tif")
    assert (good_crs, other_crs) == (CRS.from_epsg(32633), CRS.from_epsg(32634))
    assert good_transform == other_transform  # the inputs' grids, nothing reprojected
    assert good.shape == (200, 300) and (good != 255).all()
    np.testing.assert_array_equal(good, other)  # segmented alike, each in its own CRS
    # Job outputs: one mosaic and one polygon dataset per CRS, never one across both.
    job = run["job_outputs"]
    assert sorted(job["vrts"]) == ["mask_epsg32633.vrt", "mask_epsg32634.vrt"]
    assert sorted(job["polygons"]) == ["polygons_epsg32633.parquet", "polygons_epsg32634.parquet"]
    for epsg, name, mask in ((32633, "good", good), (32634, "other_crs", other)):
        vrt = out / f"mask_epsg{epsg}.vrt"
        assert vrt.read_text().count("<SourceFilename") == 1
        assert f">{name}/mask.tif<" in vrt.read_text()
        vrt_mask, vrt_crs, _ = _read(vrt)
        assert vrt_crs == CRS.from_epsg(epsg)
        np.testing.assert_array_equal(vrt_mask, mask)
        frame = gpd.read_parquet(out / f"polygons_epsg{epsg}.parquet")
        assert frame.crs.to_epsg() == epsg and set(frame.scene_id) == {name}
        assert len(frame) == _by_stem(run)[name]["polygons"] > 0


# ---------------------------------------------------------------------------------- nodata


def test_all_nodata_scene_succeeds_as_a_valid_cog_with_an_empty_layer(
    ray_local: None, fixtures: dict[str, Path], rgb_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result, run = _segment(
        str(fixtures["all_nodata"]), "--model", str(rgb_model), "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    [scene] = run["scenes"]
    assert scene["status"] == "ok" and scene["error"] is None
    assert scene["tiles"] > 0 and scene["tiles_skipped_nodata"] == scene["tiles"]
    assert scene["class_pixels"] == {"water": 0, "vegetation": 0, "built": 0, "bare": 0}
    assert scene["polygons"] == 0
    folder = out / "all_nodata"
    for raster in ("mask.tif", "confidence.tif"):
        valid, errors, _ = cog_validate(str(folder / raster))
        assert valid and not errors, (raster, errors)
    mask, crs, _ = _read(folder / "mask.tif")
    assert mask.shape == (100, 120) and (mask == 255).all() and crs == CRS.from_epsg(32633)
    confidence, _, _ = _read(folder / "confidence.tif")
    assert (confidence == 0).all()
    info = pyogrio.read_info(folder / "polygons.gpkg", layer="polygons")
    assert info["features"] == 0 and info["geometry_type"] in ("Polygon", "MultiPolygon")
    assert CRS.from_user_input(info["crs"]) == CRS.from_epsg(32633)


def test_nan_nodata_in_float_input_is_nodata_in_the_outputs(
    ray_local: None, fixtures: dict[str, Path], dtype_models: dict[str, Path], tmp_path: Path
) -> None:
    path = fixtures["float32_nan"]
    with rasterio.open(path) as src:
        assert np.isnan(src.nodata) and src.dtypes[0] == "float32"
        nan = np.isnan(src.read()).any(axis=0)
    assert int(nan.sum()) == 20 * 30 + 30  # the block in every band, the diagonal in one
    out = tmp_path / "out"
    result, run = _segment(str(path), "--model", str(dtype_models["float32"]), "--out", str(out))
    assert result.exit_code == 0, result.output
    [scene] = run["scenes"]
    assert scene["status"] == "ok"
    mask, _, _ = _read(out / "float32_nan" / "mask.tif")
    confidence, _, _ = _read(out / "float32_nan" / "confidence.tif")
    np.testing.assert_array_equal(mask == 255, nan)  # exactly the NaN pixels are nodata
    np.testing.assert_array_equal(confidence == 0, nan)
    assert sum(scene["class_pixels"].values()) == 90 * 110 - 630


# ------------------------------------------------------------------------------------ bands


def test_bands_are_matched_by_name_and_a_mismatch_fails_that_input_only(
    ray_local: None, fixtures: dict[str, Path], rgb_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    names = ["good", "bands_reordered", "two_band"]
    result, run = _segment(
        *(str(fixtures[n]) for n in names), "--model", str(rgb_model), "--out", str(out)
    )
    assert result.exit_code == EXIT_SCENE_FAILED, result.output
    by_stem = _by_stem(run)
    assert by_stem["good"]["band_indexes"] == [1, 2, 3]
    # nir, blue, green, red: the card's red, green, blue are bands 4, 3, 2, and the outputs equal
    # those of the same pixels in red, green, blue order.
    assert by_stem["bands_reordered"]["status"] == "ok"
    assert by_stem["bands_reordered"]["band_indexes"] == [4, 3, 2]
    for raster in ("mask.tif", "confidence.tif"):
        np.testing.assert_array_equal(
            _read(out / "good" / raster)[0], _read(out / "bands_reordered" / raster)[0]
        )
    two_band = by_stem["two_band"]
    assert two_band["error_type"] == "BandMismatchError"
    assert two_band["error"] == (
        f"{fixtures['two_band']}: the model expects bands [red, green, blue]; the file has 2 "
        "bands [(unnamed), (unnamed)]; missing: red, green, blue. Name the file's bands in order "
        "with --bands, e.g. --bands red,green"
    )
    assert not (out / "two_band").exists()

    # --bands naming another count of bands than a file has: that file fails, the others go on.
    out2 = tmp_path / "out2"
    result, run = _segment(
        str(fixtures["two_band"]), str(fixtures["good"]),
        "--bands", "red,green,blue", "--model", str(rgb_model), "--out", str(out2),
    )  # fmt: skip
    assert result.exit_code == EXIT_SCENE_FAILED, result.output
    assert run["summary"] == {"ok": 1, "failed": 1}
    error = _by_stem(run)["two_band"]["error"]
    assert error == (
        f"{fixtures['two_band']}: --bands names 3 bands (red,green,blue) but the file has 2: "
        "name every band of the file, in order"
    )
    assert sorted(p.name for p in out2.iterdir()) == ["good", *JOB_OUTPUTS_ONE_CRS]


# ----------------------------------------------------------------------------------- dtypes


def test_a_nir_band_tagged_alpha_is_read_as_data_not_as_a_mask(
    ray_local: None, fixtures: dict[str, Path], rgb_model: Path, tmp_path: Path
) -> None:
    """GDAL writes four uint8 bands as RGB + alpha by default, so the NIR band of many RGBN files
    is tagged alpha: taken as GDAL's dataset mask, every NIR 0 (dark water) would be nodata."""
    uri = str(fixtures["rgbn_tagged_rgba"])
    with rasterio.open(uri) as src:
        raw, gdal_mask = src.read(), src.dataset_mask()
    assert int((gdal_mask == 0).sum()) == 600  # the 20 x 30 block where NIR is 0
    rgbn_model = tmp_path / "rgbn"
    init_model(
        "unet",
        ["red", "green", "blue", "nir"],
        ["water", "vegetation", "built", "bare"],
        rgbn_model,
        arch_args={"depth": 3, "base_channels": 8},
        tile_size=128,
        overlap=32,
    )
    scene = open_scene(uri, read_card(rgbn_model))
    assert scene.nodata_from_bands == (None, None, None, None)
    data, valid = read_tile(scene, 0, 0, 60, 80)
    np.testing.assert_array_equal(data, raw)
    assert valid.all()
    # Segmented, every pixel gets a class (255 is the mask's nodata).
    out = tmp_path / "out"
    result, run = _segment(uri, "--model", str(rgbn_model), "--out", str(out), "--no-polygons")
    assert result.exit_code == 0, result.output
    mask, _, _ = _read(out / "rgbn_tagged_rgba" / "mask.tif")
    assert int((mask == 255).sum()) == 0
    assert sum(run["scenes"][0]["class_pixels"].values()) == 60 * 80
    # A model of red, green and blue only leaves the alpha band its meaning: transparency.
    _, rgb_valid = read_tile(open_scene(uri, read_card(rgb_model)), 0, 0, 60, 80)
    np.testing.assert_array_equal(rgb_valid, gdal_mask > 0)
    # With nodata declared, a pixel is valid where any band holds data, as in GDAL's nodata mask.
    declared = tmp_path / "declared_nodata.tif"
    shutil.copy(uri, declared)
    with rasterio.open(declared, "r+") as dst:
        dst.nodata = 0
        dst.write(np.zeros((4, 5, 6), np.uint8), window=Window(0, 0, 6, 5))
    scene = open_scene(str(declared), read_card(rgbn_model))
    assert scene.nodata_from_bands == (0.0, 0.0, 0.0, 0.0)
    _, valid = read_tile(scene, 0, 0, 60, 80)
    assert int((~valid).sum()) == 30 and not valid[:5, :6].any()


def test_nodata_validity_from_the_pixels_read_equals_gdals_mask(rgb_model: Path) -> None:
    """Landsat RGB with nodata 0 around a tilted footprint: the mask computed from the pixels
    already read (GDAL's mask band would read every band again) is GDAL's, pixel for pixel."""
    uri = str(shared("landsat7-rgb/RGB.byte.tif"))
    scene = open_scene(uri, read_card(rgb_model))
    assert scene.nodata_from_bands == (0.0, 0.0, 0.0)
    _, valid = read_tile(scene, 0, 0, scene.height, scene.width)
    with rasterio.open(uri) as src:
        gdal_valid = src.dataset_mask() > 0
    np.testing.assert_array_equal(valid, gdal_valid)
    assert int((~valid).sum()) == int((~gdal_valid).sum()) > 100_000


def test_windows_read_together_equal_windows_read_alone(
    fixtures: dict[str, Path], rgb_model: Path
) -> None:
    """One open for a batch of overlapping windows, some past the scene's edges (padded)."""
    scene = open_scene(str(fixtures["good"]), read_card(rgb_model))
    windows = [(-32, -32, 128, 128), (-32, 64, 128, 128), (100, 220, 128, 128), (0, 0, 200, 300)]
    together = read_windows(scene, windows)
    for window, (data, valid) in zip(windows, together, strict=True):
        alone_data, alone_valid = read_tile(scene, *window)
        np.testing.assert_array_equal(data, alone_data)
        np.testing.assert_array_equal(valid, alone_valid)
    data, valid = together[0]
    assert data.shape == (3, 128, 128) and int(valid.sum()) == 96 * 96
    with rasterio.open(fixtures["good"]) as src:
        np.testing.assert_array_equal(together[3][0], src.read())


@pytest.mark.parametrize(("dtype", "scale"), [("uint16", 1e-4), ("int16", 1e-4), ("float32", 1.0)])
def test_integer_and_float_inputs_are_scaled_per_the_card_never_cast(
    fixtures: dict[str, Path],
    rgb_model: Path,
    dtype_models: dict[str, Path],
    dtype: str,
    scale: float,
) -> None:
    uri = str(fixtures["float32_nan" if dtype == "float32" else dtype])
    # A uint8 card refuses them, naming the file, both dtypes and the fix.
    with pytest.raises(BandMismatchError) as info:
        open_scene(uri, read_card(rgb_model))
    assert str(info.value) == (
        f"{uri}: the model expects input dtype uint8, the file has {dtype}: rescale it to what "
        "the model card states"
    )
    # A card for the dtype reads the file's values as they are and scales them by its card.
    card: ModelCard = read_card(dtype_models[dtype])
    assert card.input_dtypes == [dtype] and card.normalization.scale == [scale]
    scene = open_scene(uri, card)
    data, valid = read_tile(scene, 0, 0, scene.height, scene.width)
    with rasterio.open(uri) as src:
        raw = src.read()
    assert data.dtype == np.dtype(dtype)
    finite = np.isfinite(raw) if dtype == "float32" else np.ones_like(raw, dtype=bool)
    np.testing.assert_array_equal(data[finite], raw[finite])  # no cast, no clipping
    np.testing.assert_array_equal(valid, finite.all(axis=0))
    x = normalize(torch.from_numpy(data)[None], card)[0].numpy()
    np.testing.assert_allclose(x, data.astype(np.float64) * scale, rtol=1e-6, atol=0)
    if dtype != "float32":  # values a uint8 cast would wrap or clip are kept
        assert raw.max() > 255 and x.max() == pytest.approx(raw.max() * scale, rel=1e-6)
    if dtype == "int16":
        assert raw.min() < 0 and x.min() == pytest.approx(raw.min() * scale, rel=1e-6)


def test_int16_scene_with_negative_values_segments_on_an_int16_card(
    ray_local: None, fixtures: dict[str, Path], dtype_models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result, run = _segment(
        str(fixtures["int16"]), "--model", str(dtype_models["int16"]), "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    [scene] = run["scenes"]
    assert scene["status"] == "ok" and scene["band_indexes"] == [1, 2, 3]
    mask, crs, transform = _read(out / "int16" / "mask.tif")
    with rasterio.open(fixtures["int16"]) as src:
        assert mask.shape == src.shape and transform == src.transform and crs == src.crs
    assert (mask != 255).all() and sum(scene["class_pixels"].values()) == 64 * 80


# ------------------------------------------------------------------------------------ sizes


def test_sizes_not_divisible_by_the_stride_keep_the_input_grid(
    ray_local: None, fixtures: dict[str, Path], rgb_model: Path, tmp_path: Path
) -> None:
    card = read_card(rgb_model)
    assert card.total_stride > 1 and 203 % card.total_stride and 317 % card.total_stride
    out = tmp_path / "out"
    result, run = _segment(
        str(fixtures["odd_size"]), "--model", str(rgb_model), "--out", str(out), "--no-polygons"
    )
    assert result.exit_code == 0, result.output
    [scene] = run["scenes"]
    assert (scene["height"], scene["width"]) == (203, 317) and scene["tiles"] == 3 * 4
    mask, crs, transform = _read(out / "odd_size" / "mask.tif")
    with rasterio.open(fixtures["odd_size"]) as src:
        assert mask.shape == (203, 317) and transform == src.transform and crs == src.crs
    assert (mask != 255).all() and sum(scene["class_pixels"].values()) == 203 * 317


# ------------------------------------------------------------------------------ output names


def test_output_names_stay_inside_the_output_root(
    ray_local: None, fixtures: dict[str, Path], rgb_model: Path, tmp_path: Path
) -> None:
    inbox = tmp_path / "in"
    for relative in ("my scene (1).tif", "café.tif", "..tif", "a/x.tif", "b/x.tif", "dots.v2.tif"):
        (inbox / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(fixtures["tiny"], inbox / relative)
    inputs = [
        str(inbox / "my scene (1).tif"),
        str(inbox / "café.tif"),
        str(inbox / "..tif"),  # its stem, ".", makes no name
        str(inbox / "a" / "x.tif"),
        str(inbox / "b" / "x.tif"),  # "x" is taken by a/x.tif
        str(inbox / "a" / ".." / "dots.v2.tif"),  # "../" in the path: only the file name counts
    ]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    out = tmp_path / "out"
    result, run = _segment(*inputs, "--model", str(rgb_model), "--out", str(out))
    assert result.exit_code == EXIT_SCENE_FAILED, result.output
    outcomes = [(s["name"], s["status"], s["error_type"]) for s in run["scenes"]]
    assert outcomes == [
        ("my_scene_1_", "ok", None),
        ("caf_", "ok", None),
        (None, "failed", "UnsafeOutputNameError"),
        ("x", "ok", None),
        (None, "failed", "UnsafeOutputNameError"),
        ("dots.v2", "ok", None),
    ]
    for index in (2, 4):
        assert run["scenes"][index]["error"] == (
            f"{inputs[index]}: its output name is taken by an earlier input or cannot be made "
            "safe; rename the file"
        )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["caf_", "dots.v2", "my_scene_1_", "x", *JOB_OUTPUTS_ONE_CRS]
    )
    # Nothing was written outside the output root.
    after = sorted(str(p) for p in tmp_path.rglob("*") if out not in (p, *p.parents))
    assert after == before
