"""Ground measures of geometries and pixels in any CRS (pure): true metres also for lon/lat.

Projected CRSs measure in the plane, scaled by the CRS's linear unit (metres per unit). Geographic
CRSs measure on the CRS's ellipsoid with pyproj's geodesic routines, so an area in a lon/lat grid
is the real ground area, not square degrees. Also here: parsing the size options (``20px``,
``500m2``, ``1px``, ``2m``) and turning them into pixels for a given grid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import affine
import numpy as np
import shapely
from numpy.typing import NDArray
from pyproj import CRS, Geod

from geoseg.errors import ConfigError

__all__ = [
    "Quantity",
    "ground_area_perimeter",
    "ground_areas_m2",
    "linear_unit_m",
    "parse_area",
    "parse_length",
    "pixel_area_m2",
    "pixel_size_m",
    "row_pixel_areas_m2",
]

_AREA_UNITS = {"px": ("px", 1.0), "m2": ("m2", 1.0), "m²": ("m2", 1.0), "ha": ("m2", 1e4)}
_AREA_UNITS |= {"km2": ("m2", 1e6), "km²": ("m2", 1e6)}
_LENGTH_UNITS = {"px": ("px", 1.0), "m": ("m", 1.0), "km": ("m", 1e3)}
_QUANTITY = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z²0-9]*)\s*")


@dataclass(frozen=True)
class Quantity:
    """A size given on the command line: a non-negative value in pixels or ground units.

    Attributes:
        value: The number, already scaled to the base unit (``ha`` -> m², ``km`` -> m).
        unit: ``"px"`` (pixels; for areas a pixel count, for lengths pixel edges), ``"m2"`` (areas)
            or ``"m"`` (lengths).
    """

    value: float
    unit: str

    def __str__(self) -> str:
        return f"{self.value:g}{self.unit}"


def _parse(text: str, units: dict[str, tuple[str, float]], what: str) -> Quantity:
    match = _QUANTITY.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in units:
        raise ConfigError(
            f"{what} {text!r}: expected a number with a unit, one of "
            f"{', '.join(sorted(units))} (e.g. 20px)"
        )
    base, scale = units[unit]
    return Quantity(float(match.group(1)) * scale, base)


def parse_area(text: str) -> Quantity:
    """``"20px"`` (pixels), ``"500m2"``, ``"0.5ha"``, ``"1km2"``; a unit is required."""
    return _parse(text, _AREA_UNITS, "area")


def parse_length(text: str) -> Quantity:
    """``"1px"`` (pixel edges), ``"2m"``, ``"0.1km"``; a unit is required."""
    return _parse(text, _LENGTH_UNITS, "length")


def linear_unit_m(crs_wkt: str) -> float:
    """Metres per unit of a projected CRS's first axis (1.0 when the CRS states none)."""
    crs = CRS.from_wkt(crs_wkt)
    return float(crs.axis_info[0].unit_conversion_factor) if crs.axis_info else 1.0


def _geod(crs: CRS) -> Geod:
    return crs.get_geod() or Geod(ellps="WGS84")


def ground_areas_m2(
    geometries: Sequence[shapely.Geometry] | NDArray[np.object_], crs_wkt: str
) -> NDArray[np.float64]:
    """Area of each geometry in square metres.

    Projected CRS: planar area times the squared unit factor (metres per CRS unit). Geographic
    CRS: geodesic area on the CRS's ellipsoid.
    """
    return ground_area_perimeter(geometries, crs_wkt)[0]


def ground_area_perimeter(
    geometries: Sequence[shapely.Geometry] | NDArray[np.object_], crs_wkt: str
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Area (m²) and perimeter (m, holes' rings included, as GIS ``$perimeter``) of each geometry.

    Projected CRS: planar measures scaled by the CRS's linear unit. Geographic CRS: geodesic
    measures on the CRS's ellipsoid (edges are geodesics between the vertices).
    """
    crs = CRS.from_wkt(crs_wkt)
    geoms = np.asarray(geometries, dtype=object)
    if crs.is_geographic:
        geod = _geod(crs)
        pairs = [geod.geometry_area_perimeter(g) for g in geoms]
        areas = np.array([abs(a) for a, _ in pairs], dtype=np.float64)
        perimeters = np.array([p for _, p in pairs], dtype=np.float64)
        return areas, perimeters
    factor = linear_unit_m(crs_wkt)
    areas = np.asarray(shapely.area(geoms), dtype=np.float64) * factor**2
    perimeters = np.asarray(shapely.length(geoms), dtype=np.float64) * factor
    return areas, perimeters


def pixel_area_m2(transform: affine.Affine, crs_wkt: str) -> float | None:
    """Ground area of one pixel in a projected CRS (the same everywhere); None if geographic."""
    crs = CRS.from_wkt(crs_wkt)
    if crs.is_geographic:
        return None
    return abs(transform.determinant) * linear_unit_m(crs_wkt) ** 2


def row_pixel_areas_m2(
    transform: affine.Affine, crs_wkt: str, row_off: int, rows: int, width: int
) -> NDArray[np.float64]:
    """Ground area of a pixel in each of ``rows`` rows from ``row_off`` (geodesic for lon/lat).

    In a north-up lon/lat grid a pixel's area depends on its row only; for a rotated grid the
    pixel at the row's centre column stands for the row. Each area is rounded to a multiple of
    2^-10 m² so that sums over a region are exact in float64 whatever order they are added in,
    which keeps ``--min-area`` decisions independent of the strip size.
    """
    if not CRS.from_wkt(crs_wkt).is_geographic:
        area = pixel_area_m2(transform, crs_wkt) or 0.0
        return np.full(rows, round(area * 1024) / 1024, dtype=np.float64)
    geod = _geod(CRS.from_wkt(crs_wkt))
    col = width // 2
    out = np.empty(rows, dtype=np.float64)
    for i in range(rows):
        r = row_off + i
        corners = [transform @ (col, r), transform @ (col + 1, r)]
        corners += [transform @ (col + 1, r + 1), transform @ (col, r + 1)]
        lons, lats = zip(*corners, strict=True)
        area, _ = geod.polygon_area_perimeter(lons, lats)
        out[i] = round(abs(area) * 1024) / 1024
    return out


def pixel_size_m(transform: affine.Affine, crs_wkt: str, width: int, height: int) -> float:
    """Ground edge length of a pixel: the square root of its area (at the grid's centre row)."""
    area = pixel_area_m2(transform, crs_wkt)
    if area is None:
        area = float(row_pixel_areas_m2(transform, crs_wkt, height // 2, 1, width)[0])
    return math.sqrt(area)
