"""Polygon layers: one feature per connected region of one class."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pyogrio
import shapely

from geoseg.models.card import ClassInfo

LAYER = "polygons"


def write_polygons(
    path: Path,
    class_ids: Sequence[int],
    geometries: Sequence[shapely.Geometry],
    areas_m2: Sequence[float],
    classes: Sequence[ClassInfo],
    crs_wkt: str,
) -> None:
    """Write a GeoPackage layer with ``class_id``, ``class_name``, ``area_m2`` (also when empty)."""
    names = {c.id: c.name for c in classes}
    frame = gpd.GeoDataFrame(
        {
            "class_id": pd.Series(class_ids, dtype="int32"),
            "class_name": pd.Series([names[i] for i in class_ids], dtype="object"),
            "area_m2": pd.Series(areas_m2, dtype="float64"),
        },
        geometry=gpd.GeoSeries(list(geometries), crs=crs_wkt),
    )
    # GeoPackage 1.2 keeps older GDAL/QGIS (Debian's 3.22) from warning about a newer version.
    pyogrio.write_dataframe(
        frame,
        path,
        layer=LAYER,
        driver="GPKG",
        geometry_type="Polygon",
        promote_to_multi=False,
        dataset_options={"VERSION": "1.2"},
    )
