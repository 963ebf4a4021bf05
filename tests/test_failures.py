"""Bad inputs fail alone with a clear error; the other scenes complete; nothing partial is left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import rasterio

from geoseg.engine.job import segment
from geoseg.engine.scene import SegmentOptions


def _geoseg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "geoseg", "-q", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_ADDRESS": ""},
    )


def test_cli_bad_inputs_fail_alone(
    fixtures: dict[str, Path], rgb_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    names = ["good", "corrupt", "two_band", "not_a_raster", "empty", "no_crs", "rotated", "uint16"]
    proc = _geoseg(
        "segment", *(str(fixtures[n]) for n in names), "--model", str(rgb_model), "--out", str(out)
    )
    assert proc.returncode == 1, proc.stderr
    run = json.loads((out / "run.json").read_text())
    by_name = {Path(s["uri"]).stem: s for s in run["scenes"]}
    assert by_name["good"]["status"] == "ok"
    expected = {
        "corrupt": ("RasterReadError", "cannot read window"),
        "two_band": ("BandMismatchError", "missing: red, green, blue"),
        "not_a_raster": ("RasterReadError", "cannot open as a raster"),
        "empty": ("RasterReadError", "cannot open as a raster"),
        "no_crs": ("NotGeoreferencedError", "no CRS"),
        "rotated": ("NotGeoreferencedError", "rotated or sheared"),
        "uint16": ("BandMismatchError", "expects input dtype uint8"),
    }
    for name, (error_type, text) in expected.items():
        scene = by_name[name]
        assert scene["status"] == "failed", name
        assert scene["error_type"] == error_type, (name, scene["error"])
        assert text in scene["error"] and str(fixtures[name]) in scene["error"], scene["error"]
        assert f"FAILED {fixtures[name]}" in proc.stderr
    assert run["summary"] == {"ok": 1, "failed": 7}
    # Only committed outputs: the good scene's folder and run.json, no partial folders.
    assert sorted(p.name for p in out.iterdir()) == [
        "good",
        "mask_epsg32633.vrt",
        "polygons.parquet",
        "run.json",
    ]
    assert sorted(p.name for p in (out / "good").iterdir()) == [
        "confidence.tif", "mask.qml", "mask.tif", "mask.tif.aux.xml", "polygons.gpkg",
    ]  # fmt: skip


def test_existing_outputs_need_overwrite(
    fixtures: dict[str, Path], rgb_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["segment", str(fixtures["good"]), "--model", str(rgb_model), "--out", str(out)]
    assert _geoseg(*args).returncode == 0
    before = (out / "good" / "mask.tif").stat().st_mtime_ns
    second = _geoseg(*args)
    assert second.returncode == 1
    assert "pass --overwrite" in second.stderr
    assert (out / "good" / "mask.tif").stat().st_mtime_ns == before
    assert _geoseg(*args, "--overwrite").returncode == 0
    assert (out / "good" / "mask.tif").stat().st_mtime_ns != before
    assert sorted(p.name for p in out.iterdir()) == [
        "good",
        "mask_epsg32633.vrt",
        "polygons.parquet",
        "run.json",
    ]


def test_odd_shapes_and_all_nodata(
    ray_local: None, fixtures: dict[str, Path], rgb_model: Path, tmp_path: Path
) -> None:
    names = ["tiny", "one_px_wide", "all_nodata"]
    results = segment(
        [str(fixtures[n]) for n in names], rgb_model, tmp_path, SegmentOptions(progress=False)
    )
    assert [r.status for r in results] == ["ok", "ok", "ok"], [r.error for r in results]
    for name in ("tiny", "one_px_wide"):
        with (
            rasterio.open(fixtures[name]) as src,
            rasterio.open(tmp_path / name / "mask.tif") as mask,
        ):
            assert mask.shape == src.shape and mask.transform == src.transform
            assert (mask.read(1) != 255).all()
    empty = results[2]
    assert empty.tiles_skipped_nodata == empty.tiles and empty.polygons == 0
    with rasterio.open(tmp_path / "all_nodata" / "mask.tif") as mask:
        assert np.all(mask.read(1) == 255)
    import geopandas as gpd

    assert len(gpd.read_file(tmp_path / "all_nodata" / "polygons.gpkg", layer="polygons")) == 0
