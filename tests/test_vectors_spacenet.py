"""Round trip on real building footprints: SpaceNet labels -> raster -> `vectorize` -> polygons.

The labels are burnt onto the SpaceNet image's own 0.5 m grid (pixel centres, as any
rasterisation), vectorised back with 1-pixel coverage simplification, and each building is
matched to the output polygon it overlaps most. Every building must come back with IoU >= 0.9,
except where the raster itself cannot hold it: a building a few pixels wide loses up to half a
pixel along each edge when burnt, so even the exact pixel outline misses 0.9. Those are listed
by index and must be among the buildings whose exact pixel outline is below 0.9 too.
"""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import rasterio
import shapely
from conftest import shared
from rasterio.features import rasterize

from geoseg.io.vectors import vectorize_file
from geoseg.measure import Quantity
from geoseg.vectorize import CoverageOptions

# Buildings whose exact pixel outline (no simplification) already has IoU < 0.9 with the label:
# 16 (28 m², 3.8 m = 7.6 px wide, rotated: 0.84) and 31 (18 m², 8.4 x 8.6 px: 0.89).
RASTER_LIMITED = {16, 31}
# Of those, the ones that stay below 0.9 after 1-pixel simplification (31 rises to 0.90).
BELOW_AFTER_SIMPLIFY = {16}


def _iou(a: shapely.Geometry, b: shapely.Geometry) -> float:
    return float(a.intersection(b).area / a.union(b).area)


def _best_match(label: shapely.Geometry, polygons: np.ndarray) -> shapely.Geometry:
    overlap = shapely.area(shapely.intersection(label, polygons))
    return polygons[int(np.argmax(overlap))]


def test_spacenet_buildings_survive_rasterise_and_vectorise(tmp_path: Path) -> None:
    image = shared("spacenet/sample_geotiff.tif")
    labels = gpd.read_file(shared("spacenet/geotiff_labels.geojson"))
    with rasterio.open(image) as src:
        labels = labels.to_crs(src.crs)
        profile = {
            "driver": "GTiff",
            "width": src.width,
            "height": src.height,
            "count": 1,
            "dtype": "uint8",
            "nodata": 255,
            "crs": src.crs,
            "transform": src.transform,
        }
    buildings = labels.geometry.values
    mask = rasterize(
        [(g, 1) for g in buildings],
        out_shape=(profile["height"], profile["width"]),
        transform=profile["transform"],
        fill=0,
        dtype="uint8",
    )
    path = tmp_path / "buildings.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(mask, 1)
        dst.update_tags(
            CLASS_NAMES=json.dumps({0: "background", 1: "building"}),
            CLASS_COLORS=json.dumps({0: [220, 220, 220], 1: [214, 39, 40]}),
        )

    outputs = {}
    for name, coverage in (
        ("simplified", CoverageOptions(simplify=Quantity(1, "px"))),
        ("exact", CoverageOptions()),
    ):
        vectorize_file(path, tmp_path / name, coverage=coverage)
        frame = pyogrio.read_dataframe(tmp_path / name / "polygons.gpkg", layer="polygons")
        outputs[name] = frame.geometry.values[(frame.class_name == "building").to_numpy()]

    iou = np.array([_iou(b, _best_match(b, outputs["simplified"])) for b in buildings])
    exact = np.array([_iou(b, _best_match(b, outputs["exact"])) for b in buildings])
    print(  # the distribution, for the record (pytest -s)
        f"SpaceNet IoU (1 px simplify) over {len(iou)} buildings: "
        f"min {iou.min():.3f} p5 {np.percentile(iou, 5):.3f} median {np.median(iou):.3f} "
        f"max {iou.max():.3f}; exact outlines: min {exact.min():.3f} median {np.median(exact):.3f}"
    )
    assert {int(i) for i in np.flatnonzero(exact < 0.9)} == RASTER_LIMITED
    assert {int(i) for i in np.flatnonzero(iou < 0.9)} == BELOW_AFTER_SIMPLIFY
    # Simplifying costs little against the raster's own outline.
    assert (iou >= exact - 0.02).all()
    assert np.median(iou) > 0.95
    assert len(labels) == 43
