"""Ground measures of geometries in any CRS (pure): true areas also for geographic CRSs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely
from numpy.typing import NDArray
from pyproj import CRS, Geod


def ground_areas_m2(geometries: Sequence[shapely.Geometry], crs_wkt: str) -> NDArray[np.float64]:
    """Area of each geometry in square metres.

    Projected CRS: planar area times the squared unit factor (metres per CRS unit). Geographic
    CRS: geodesic area on the CRS's ellipsoid.
    """
    crs = CRS.from_wkt(crs_wkt)
    if crs.is_geographic:
        geod = crs.get_geod() or Geod(ellps="WGS84")
        return np.array([abs(geod.geometry_area_perimeter(g)[0]) for g in geometries])
    factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
    areas = shapely.area(np.asarray(geometries, dtype=object))
    return np.asarray(areas, dtype=np.float64) * factor**2
