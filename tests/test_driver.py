"""The driver (the ``geoseg`` command's process) never imports torch: only the model actors do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyogrio
import rasterio
from conftest import AERIAL

SCENE = AERIAL / "23322E759967N_clipped_1m_1of2.tif"  # 341 x 280 RGB

# Runs the command as ``python -m geoseg`` does and reports, at its very exit, whether torch was
# ever imported into the process.
DRIVER = """
import atexit, runpy, sys
atexit.register(lambda: print("torch imported:", "torch" in sys.modules, file=sys.stderr))
sys.argv = ["geoseg", *sys.argv[1:]]
runpy.run_module("geoseg", run_name="__main__")
"""


def test_a_scene_with_crf_and_polygons_runs_without_torch_in_the_driver(
    trained_aerial_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    command = [
        sys.executable, "-c", DRIVER, "-q", "segment", str(SCENE), "--model",
        str(trained_aerial_model), "--out", str(out), "--crf", "--batch-size", "2",
    ]  # fmt: skip
    result = subprocess.run(
        command,
        env={**os.environ, "RAY_ADDRESS": ""},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "torch imported: False" in result.stderr.splitlines()
    scene_dir = out / SCENE.stem
    with rasterio.open(scene_dir / "mask.tif") as mask:
        assert (mask.height, mask.width) == (341, 280)
        ids, nodata = mask.read(1), mask.nodata
    with rasterio.open(scene_dir / "confidence.tif") as confidence:
        assert (confidence.read(1)[ids != nodata] >= 1).all()
    polygons = pyogrio.read_dataframe(scene_dir / "polygons.gpkg", layer="polygons")
    assert set(polygons["class_id"]) == set(np.unique(ids[ids != nodata]).tolist())
    run = json.loads((out / "run.json").read_text())
    assert run["versions"]["torch"] == version("torch")
    assert run["crf"]["iterations"] == 5
    assert run["scenes"][0]["timings_s"]["crf_s"] > 0
