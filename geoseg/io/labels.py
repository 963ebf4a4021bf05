"""Training and evaluation inputs: whole images, class labels on an image's grid, class masks.

Labels come either as a class raster (read on the image's grid, optionally remapped with a
``{raster value: class id}`` table) or as a vector file whose ``field`` names the class
(reprojected to the image's CRS and rasterised onto its grid). Either way the result is a
``uint8`` array of class ids ``0..n-1`` with :data:`UNLABELLED` (255) wherever there is no
usable label: outside every polygon, raster nodata, values not in the map or the class list.

Images are read whole: training and evaluation images are small enough for memory (the
tiled, memory-bounded path is ``geoseg segment``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.windows
from affine import Affine
from numpy.typing import NDArray
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.features import rasterize

from geoseg.errors import InputError, RasterReadError
from geoseg.io.rasters import _file_band_names, match_bands
from geoseg.io.vectors import read_class_raster

UNLABELLED = 255
# Extensions read as vector labels (everything else is opened as a raster).
VECTOR_SUFFIXES = frozenset(
    {".gpkg", ".geojson", ".json", ".shp", ".fgb", ".parquet", ".geoparquet", ".gml", ".kml"}
)


@dataclass(frozen=True)
class Grid:
    """A raster grid: size, north-up transform and CRS (WKT)."""

    height: int
    width: int
    transform: Affine
    crs_wkt: str

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` in CRS units."""
        t = self.transform
        xs = (t.c, t.c + t.a * self.width)
        ys = (t.f, t.f + t.e * self.height)
        return min(xs), min(ys), max(xs), max(ys)


@dataclass(frozen=True)
class TrainingImage:
    """A whole image in memory: raw pixels ``(bands, H, W)``, validity and where it lies."""

    uri: str
    data: NDArray[np.generic]
    valid: NDArray[np.bool_]
    grid: Grid
    bands: list[str]
    dtype: str


def is_vector(path: Path | str) -> bool:
    """Whether ``path`` is read as vector labels (by its extension)."""
    return Path(str(path)).suffix.lower() in VECTOR_SUFFIXES


def image_band_names(uri: str, override: Sequence[str] | None = None) -> list[str]:
    """The band names of ``uri`` (descriptions or colour interpretation), or ``override``.

    Raises:
        InputError: when a band has no name and ``override`` does not name them all.
    """
    with rasterio.open(uri) as src:
        names = _file_band_names(src)
    if override is not None:
        # match_bands checks the count and reports it the way `segment` does.
        match_bands(uri, names, list(override), list(override))
        return list(override)
    if any(n is None for n in names):
        raise InputError(
            f"{uri}: {len(names)} bands, not all named ({names}); name them in order with --bands"
        )
    return [str(n) for n in names]


def read_image(
    uri: str, bands: Sequence[str], override: Sequence[str] | None = None
) -> TrainingImage:
    """Read the bands named ``bands`` of ``uri`` whole (``override`` names the file's bands).

    Raises:
        RasterReadError: when the file cannot be read.
        InputError: without a CRS, or when bands are missing or of different dtypes.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(uri) as src:
                indexes = match_bands(
                    uri, _file_band_names(src), list(bands), list(override) if override else None
                )
                dtypes = {src.dtypes[i - 1] for i in indexes}
                if len(dtypes) > 1:
                    raise InputError(f"{uri}: bands of different dtypes {sorted(dtypes)}")
                if src.crs is None:
                    raise InputError(f"{uri}: the raster has no CRS")
                data = src.read(indexes)
                valid = src.dataset_mask() > 0
                grid = Grid(src.height, src.width, src.transform, src.crs.to_wkt())
    except RasterioError as exc:
        raise RasterReadError(f"{uri}: cannot read: {exc}") from exc
    if np.issubdtype(data.dtype, np.floating):
        valid &= np.isfinite(data).all(axis=0)
        data = np.where(np.isfinite(data), data, 0).astype(data.dtype)
    return TrainingImage(uri, data, valid, grid, list(bands), str(data.dtype))


def read_grid(uri: str) -> Grid:
    """The grid of a raster file."""
    try:
        with rasterio.open(uri) as src:
            if src.crs is None:
                raise InputError(f"{uri}: the raster has no CRS")
            return Grid(src.height, src.width, src.transform, src.crs.to_wkt())
    except RasterioError as exc:
        raise RasterReadError(f"{uri}: cannot open: {exc}") from exc


def rasterize_vector_labels(
    path: Path | str, field: str, classes: Sequence[str], grid: Grid
) -> NDArray[np.uint8]:
    """Burn the polygons of ``path`` onto ``grid``: class id = position of ``field`` in ``classes``.

    Polygons are reprojected to the grid's CRS first. Values of ``field`` not in ``classes`` and
    pixels outside every polygon become :data:`UNLABELLED`; a pixel is burnt when its centre lies
    inside a polygon (GDAL's rule), later features over earlier ones.

    Raises:
        InputError: when the file has no CRS or no such field.
    """
    import geopandas as gpd

    if len(classes) >= UNLABELLED:
        raise InputError(f"at most {UNLABELLED - 1} classes, got {len(classes)}")
    try:
        frame = gpd.read_file(path)
    except Exception as exc:  # pyogrio/fiona raise several unrelated types; name the file
        raise RasterReadError(f"{path}: cannot read as vector labels: {exc}") from exc
    if field not in frame.columns:
        columns = [c for c in frame.columns if c != frame.geometry.name]
        raise InputError(f"{path}: no field {field!r}; fields: {columns}")
    if frame.crs is None:
        raise InputError(f"{path}: the vector labels have no CRS")
    frame = frame.to_crs(CRS.from_wkt(grid.crs_wkt))
    ids = {name: i for i, name in enumerate(classes)}
    shapes = [
        (geom, ids[str(value)])
        for geom, value in zip(frame.geometry, frame[field], strict=True)
        if geom is not None and not geom.is_empty and str(value) in ids
    ]
    if not shapes:
        return np.full((grid.height, grid.width), UNLABELLED, dtype=np.uint8)
    out: NDArray[np.uint8] = rasterize(
        shapes,
        out_shape=(grid.height, grid.width),
        transform=grid.transform,
        fill=UNLABELLED,
        dtype="uint8",
    )
    return out


def remap_table(label_map: Mapping[int, int] | None, num_classes: int) -> NDArray[np.uint8]:
    """A 65536-entry lookup table from raster values to class ids (unmapped -> unlabelled)."""
    table = np.full(1 << 16, UNLABELLED, dtype=np.uint8)
    if label_map is None:
        table[:num_classes] = np.arange(num_classes, dtype=np.uint8)
    else:
        for value, class_id in label_map.items():
            if not 0 <= value < (1 << 16):
                raise InputError(f"label map value {value} is outside 0..65535")
            if not 0 <= class_id < num_classes:
                raise InputError(f"label map {value}:{class_id}: ids must be 0..{num_classes - 1}")
            table[value] = class_id
    return table


def read_raster_labels(
    path: Path | str, grid: Grid, num_classes: int, label_map: Mapping[int, int] | None = None
) -> NDArray[np.uint8]:
    """Class raster ``path`` read on ``grid``: same CRS and pixel size, any extent covering it.

    The raster is read over the window of ``grid`` (so one labels raster can serve several
    images); parts outside it are unlabelled. Values map through ``label_map`` (values it does not
    list are unlabelled), else are the class ids themselves (``>= num_classes``: unlabelled);
    the raster's nodata is always unlabelled.

    Raises:
        InputError: when the raster's CRS or pixel grid differs from ``grid`` (resample it first).
    """
    try:
        with rasterio.open(path) as src:
            if src.crs is None or src.crs != CRS.from_wkt(grid.crs_wkt):
                raise InputError(
                    f"{path}: labels CRS {src.crs} differs from the image's; reproject them "
                    "(gdalwarp -r near) onto the image grid"
                )
            t, g = src.transform, grid.transform
            col = (g.c - t.c) / t.a
            row = (g.f - t.f) / t.e
            same_res = math.isclose(t.a, g.a, rel_tol=1e-6) and math.isclose(t.e, g.e, rel_tol=1e-6)
            # Offsets must be whole pixels: labels are never resampled (that would invent classes).
            if not same_res or abs(col - round(col)) > 1e-3 or abs(row - round(row)) > 1e-3:
                raise InputError(
                    f"{path}: labels grid (pixel {t.a}x{t.e}) is not aligned with the image grid "
                    f"(pixel {g.a}x{g.e}); warp them onto it with gdalwarp -r near"
                )
            window = rasterio.windows.Window(round(col), round(row), grid.width, grid.height)
            nodata = src.nodata
            values = src.read(1, window=window, boundless=True, masked=True)
    except RasterioError as exc:
        raise RasterReadError(f"{path}: cannot read labels: {exc}") from exc
    if not np.issubdtype(values.dtype, np.integer):
        raise InputError(f"{path}: labels are {values.dtype}; a class raster holds integer ids")
    raw = np.asarray(values.filled(0)).astype(np.int64)
    missing = np.ma.getmaskarray(values) | (raw < 0) | (raw >= (1 << 16))
    if nodata is not None:
        missing |= raw == int(nodata)
    labels = remap_table(label_map, num_classes)[np.clip(raw, 0, (1 << 16) - 1)]
    labels[missing] = UNLABELLED
    return labels


def read_labels(
    path: Path | str,
    grid: Grid,
    classes: Sequence[str],
    *,
    field: str | None = None,
    label_map: Mapping[int, int] | None = None,
) -> NDArray[np.uint8]:
    """Labels of ``grid`` from a vector file (needs ``field``) or a class raster."""
    if is_vector(path):
        if field is None:
            raise InputError(f"{path}: vector labels need --label-field (the class attribute)")
        return rasterize_vector_labels(path, field, classes, grid)
    return read_raster_labels(path, grid, len(classes), label_map)


@dataclass(frozen=True)
class ClassMask:
    """A predicted class raster read whole: ids, nodata, class names by id, grid."""

    ids: NDArray[np.integer]
    nodata: int
    names: dict[int, str]
    grid: Grid


def read_class_mask(path: Path) -> ClassMask:
    """Band 1 of a class raster with its nodata and class names (geoseg's ``CLASS_NAMES``)."""
    info = read_class_raster(path)
    try:
        with rasterio.open(path) as src:
            ids = src.read(1)
    except RasterioError as exc:
        raise RasterReadError(f"{path}: cannot read: {exc}") from exc
    names = {c.id: c.name for c in info.classes if not c.name.startswith("class_")}
    grid = Grid(info.height, info.width, info.transform, info.crs_wkt)
    return ClassMask(ids, info.nodata, names, grid)
