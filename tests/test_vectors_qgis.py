"""A real GIS client opens geoseg's outputs: QGIS (Debian's python3-qgis), headless.

QGIS must show the class names and card colours without any user action: from the style stored
in the GeoPackage (``layer_styles``, default), from ``polygons.qml`` beside the FlatGeobuf, and
from ``mask.qml`` beside ``mask.tif``. `.ci/run` installs QGIS; elsewhere the test is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_vectors_io import CLASSES, COLORS, EPSG, card, finished_mask_layer, make_geoseg_scene

from geoseg.engine.scene import SegmentOptions, _write_polygons
from geoseg.measure import Quantity

SYSTEM_PYTHON = "/usr/bin/python3"

# Runs under Debian's Python with QGIS: prints what QGIS made of each layer as JSON.
QGIS_SCRIPT = """
import json, sys
from qgis.core import QgsApplication, QgsRasterLayer, QgsVectorLayer

app = QgsApplication([], False)
app.initQgis()
folder = sys.argv[1]
out = {}
for name, uri in (("gpkg", folder + "/polygons.gpkg|layername=polygons"),
                  ("fgb", folder + "/polygons.fgb")):
    layer = QgsVectorLayer(uri, name, "ogr")
    renderer = layer.renderer() if layer.isValid() else None
    out[name] = {
        "valid": layer.isValid(),
        "crs": layer.crs().authid(),
        "count": layer.featureCount(),
        "renderer": renderer.type() if renderer else None,
    }
    if renderer and renderer.type() == "categorizedSymbol":
        out[name]["attribute"] = renderer.classAttribute()
        out[name]["categories"] = [
            [str(c.value()), c.label(), list(c.symbol().color().getRgb()[:3])]
            for c in renderer.categories()
        ]
    del renderer, layer
raster = QgsRasterLayer(folder + "/mask.tif", "mask")
renderer = raster.renderer()
out["mask"] = {
    "valid": raster.isValid(),
    "crs": raster.crs().authid(),
    "renderer": renderer.type(),
    "classes": [
        [int(c.value), c.label, list(c.color.getRgb()[:3])] for c in renderer.classes()
    ] if renderer.type() == "paletted" else None,
}
del renderer, raster
print("RESULT " + json.dumps(out))
"""


def _has_qgis() -> bool:
    if not Path(SYSTEM_PYTHON).exists():
        return False
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import qgis.core"], check=False, capture_output=True
    )
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(
    not _has_qgis(),
    reason=f"{SYSTEM_PYTHON} cannot import qgis (apt-get install python3-qgis; .ci/run does)",
)


def test_qgis_opens_polygons_and_mask_with_class_names_and_colours(tmp_path: Path) -> None:
    folder = tmp_path / "scene"
    _, scene = make_geoseg_scene(folder)
    options = SegmentOptions(simplify=Quantity(1, "px"), vector_formats=("gpkg", "fgb"))
    layer = finished_mask_layer(folder, scene, options)
    count = _write_polygons(folder, scene, card(), layer, options, None, "scene")
    config = tmp_path / "qgis-config"
    config.mkdir()
    env = {
        **os.environ,
        "QT_QPA_PLATFORM": "offscreen",
        "QGIS_CUSTOM_CONFIG_PATH": str(config),
        "XDG_RUNTIME_DIR": str(config),
    }
    # The venv's variables would make Debian's Python look for modules in the venv.
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(key, None)
    run = subprocess.run(
        [SYSTEM_PYTHON, "-c", QGIS_SCRIPT, str(folder)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"QGIS script failed (rc {run.returncode}):\n{run.stdout}\n{run.stderr}"
    result = json.loads(lines[-1].removeprefix("RESULT "))

    expected = [[str(i), n, list(c)] for i, (n, c) in enumerate(zip(CLASSES, COLORS, strict=True))]
    for name in ("gpkg", "fgb"):
        layer = result[name]
        assert layer["valid"], name
        assert layer["crs"] == f"EPSG:{EPSG}", name
        assert layer["count"] == count, name
        # The stored style was applied by default: categories are the card's classes.
        assert layer["renderer"] == "categorizedSymbol", name
        assert layer["attribute"] == "class_id", name
        assert layer["categories"] == expected, name
    mask = result["mask"]
    assert mask["valid"] and mask["crs"] == f"EPSG:{EPSG}"
    assert mask["renderer"] == "paletted"
    assert mask["classes"] == [[int(i), n, c] for i, n, c in expected]
