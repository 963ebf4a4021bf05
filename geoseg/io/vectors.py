"""Polygon layers and their QGIS styles: GeoPackage, GeoParquet, FlatGeobuf; class-raster input.

One feature per region of one class (after the optional sieve, hole filling and simplification
of :func:`geoseg.vectorize.vectorize_strips`), with the attributes

``fid`` (1.., by the region's first pixel in raster order), ``class_id``, ``class_name``,
``area_m2``, ``perimeter_m``, ``confidence_mean``, ``scene_id``, ``model_name``,
``weights_sha256``.

Formats:

- ``gpkg`` (``polygons.gpkg``, layer ``polygons``): GeoPackage 1.2 (Debian's GDAL/QGIS read it
  without a version warning); ``fid`` is the primary key; a ``layer_styles`` table holds the
  categorised QGIS style, marked as the layer's default, so QGIS shows class names and colours
  on open.
- ``parquet`` (``polygons.parquet``): GeoParquet 1.1 with a ``bbox`` covering column (row-group
  statistics let readers skip by extent), written by geopandas/pyarrow: the GDAL that pyogrio
  bundles has no Parquet driver.
- ``fgb`` (``polygons.fgb``): FlatGeobuf with its packed Hilbert R-tree.

Beside a Parquet or FlatGeobuf layer goes ``polygons.qml``, which QGIS applies to a file-based
layer of the same basename; beside ``mask.tif`` goes ``mask.qml`` (paletted renderer).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import affine
import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import rasterio
import rasterio.windows
from numpy.typing import NDArray

from geoseg.errors import InputError, OutputExistsError, RasterReadError
from geoseg.models.card import DEFAULT_COLORS, ClassInfo
from geoseg.styles import categorized_polygons_qml
from geoseg.vectorize import CoverageOptions, PolygonLayer, vectorize_strips

log = logging.getLogger(__name__)
# pyogrio logs "Created N records" at INFO for every layer it writes; geoseg reports counts itself.
logging.getLogger("pyogrio._io").setLevel(logging.WARNING)

LAYER = "polygons"
FORMATS: dict[str, str] = {"gpkg": "polygons.gpkg", "parquet": "polygons.parquet"}
FORMATS["fgb"] = "polygons.fgb"
STYLE_NAME = "geoseg classes"
COLUMNS = (
    "fid",
    "class_id",
    "class_name",
    "area_m2",
    "perimeter_m",
    "confidence_mean",
    "scene_id",
    "model_name",
    "weights_sha256",
)


@dataclass(frozen=True)
class Provenance:
    """Attributes the same for every feature of a layer: where the polygons come from."""

    scene_id: str
    model_name: str | None = None
    weights_sha256: str | None = None


def parse_formats(values: Sequence[str]) -> tuple[str, ...]:
    """``["gpkg,parquet", "fgb"]`` -> ``("gpkg", "parquet", "fgb")``; unknown names raise."""
    out: list[str] = []
    for value in values:
        for item in value.split(","):
            name = item.strip().lower()
            if not name:
                continue
            if name not in FORMATS:
                raise InputError(
                    f"vector format {name!r} is not one of {', '.join(FORMATS)} "
                    "(give a comma-separated list or repeat the option)"
                )
            if name not in out:
                out.append(name)
    return tuple(out) or ("gpkg",)


def complete_classes(classes: Sequence[ClassInfo], class_ids: Sequence[int]) -> list[ClassInfo]:
    """``classes`` plus a ``class_<id>`` entry (default colour) for any id they do not name."""
    known = {c.id: c for c in classes}
    for i in sorted(set(int(c) for c in class_ids) - set(known)):
        known[i] = ClassInfo(id=i, name=f"class_{i}", color=DEFAULT_COLORS[i % len(DEFAULT_COLORS)])
    return [known[i] for i in sorted(known)]


def layer_frame(
    layer: PolygonLayer, classes: Sequence[ClassInfo], crs_wkt: str, provenance: Provenance
) -> gpd.GeoDataFrame:
    """The attribute table of a polygon layer, in fid order."""
    names = {c.id: c.name for c in classes}
    n = len(layer)
    return gpd.GeoDataFrame(
        {
            "fid": pd.Series(np.arange(1, n + 1), dtype="int64"),
            "class_id": pd.Series(layer.class_ids, dtype="int32"),
            "class_name": pd.Series([names[int(i)] for i in layer.class_ids], dtype="string"),
            "area_m2": pd.Series(layer.area_m2, dtype="float64"),
            "perimeter_m": pd.Series(layer.perimeter_m, dtype="float64"),
            "confidence_mean": pd.Series(layer.confidence_mean, dtype="float64"),
            # Typed text even when all null, so Parquet/FlatGeobuf keep a string column.
            "scene_id": pd.Series([provenance.scene_id] * n, dtype="string"),
            "model_name": pd.Series([provenance.model_name] * n, dtype="string"),
            "weights_sha256": pd.Series([provenance.weights_sha256] * n, dtype="string"),
        },
        geometry=gpd.GeoSeries(list(layer.geometries), crs=crs_wkt),
    )


def write_polygons(
    out_dir: Path,
    layer: PolygonLayer,
    classes: Sequence[ClassInfo],
    crs_wkt: str,
    provenance: Provenance,
    formats: Sequence[str] = ("gpkg",),
) -> list[Path]:
    """Writes the layer in every format into ``out_dir`` (files named as in ``FORMATS``).

    Args:
        out_dir: Existing folder; the files are created (replaced) there.
        layer: The polygons.
        classes: Names and colours per class id (every id in the layer must be present).
        crs_wkt: The polygons' CRS.
        provenance: scene id, model name and weights digest for every feature.
        formats: Keys of ``FORMATS``.

    Returns:
        The files written.
    """
    frame = layer_frame(layer, classes, crs_wkt, provenance)
    qml = categorized_polygons_qml(classes)
    written: list[Path] = []
    for name in formats:
        path = out_dir / FORMATS[name]
        path.unlink(missing_ok=True)
        if name == "gpkg":
            _write_gpkg(path, frame, qml)
        elif name == "parquet":
            # GeoParquet 1.1: "bbox" covering column with xmin/ymin/xmax/ymax per row.
            frame.to_parquet(path, index=False, schema_version="1.1.0", write_covering_bbox=True)
        else:
            pyogrio.write_dataframe(
                frame,
                path,
                layer=LAYER,
                driver="FlatGeobuf",
                geometry_type="Polygon",
                promote_to_multi=False,
            )
        written.append(path)
    if {"parquet", "fgb"} & set(formats):
        # QGIS applies <basename>.qml to a file-based layer: polygons.fgb and polygons.parquet.
        sidecar = out_dir / "polygons.qml"
        sidecar.write_text(qml, encoding="utf-8")
        written.append(sidecar)
    return written


def _write_gpkg(path: Path, frame: gpd.GeoDataFrame, qml: str) -> None:
    # GeoPackage 1.2 keeps older GDAL/QGIS (Debian's 3.22) from warning about a newer version;
    # the integer "fid" column becomes the table's primary key (the feature id GIS tools show).
    pyogrio.write_dataframe(
        frame,
        path,
        layer=LAYER,
        driver="GPKG",
        geometry_type="Polygon",
        promote_to_multi=False,
        dataset_options={"VERSION": "1.2"},
    )
    geometry_column = pyogrio.read_info(path, layer=LAYER)["geometry_name"] or "geom"
    # The table QGIS itself creates with "Save style in database" (same columns and types): the
    # row with useAsDefault for (catalog '', schema '', table, geometry column) is applied when
    # the layer is opened.
    styles = pd.DataFrame(
        {
            "f_table_catalog": [""],
            "f_table_schema": [""],
            "f_table_name": [LAYER],
            "f_geometry_column": [geometry_column],
            "styleName": [STYLE_NAME],
            "styleQML": [qml],
            "styleSLD": [""],
            "useAsDefault": [True],
            "description": ["class names and colours of the geoseg model card"],
            "owner": [""],
            "ui": [""],
            "update_time": [pd.Timestamp(datetime.now(UTC)).floor("s")],
        }
    )
    pyogrio.write_dataframe(styles, path, layer="layer_styles", driver="GPKG")


# ------------------------------------------------------------------------------ class rasters in


@dataclass(frozen=True)
class ClassRaster:
    """What vectorising a class raster needs to know about it.

    Attributes:
        path: The raster.
        width: Columns.
        height: Rows.
        transform: Pixel-to-map transform.
        crs_wkt: CRS as WKT.
        nodata: Class value that is no class (a value outside the dtype's range when the raster
            declares none, so that every pixel is a class).
        classes: Names and colours from the raster (may miss ids; see :func:`complete_classes`).
    """

    path: Path
    width: int
    height: int
    transform: affine.Affine
    crs_wkt: str
    nodata: int
    classes: tuple[ClassInfo, ...]


def read_class_raster(path: Path, card_classes: Sequence[ClassInfo] = ()) -> ClassRaster:
    """Opens a class raster (band 1, integer) and finds its class names and colours.

    Names and colours, first found wins: geoseg's ``CLASS_NAMES`` / ``CLASS_COLORS`` dataset tags;
    otherwise names from ``card_classes`` (a model card) and colours from the raster's colour
    table, else the card's; ids named nowhere become ``class_<id>`` later.

    Raises:
        RasterReadError: if it cannot be opened.
        InputError: if band 1 is not integer or the raster has no CRS.
    """
    try:
        src = rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterReadError(f"{path}: cannot open: {exc}") from exc
    with src:
        dtype = np.dtype(src.dtypes[0])
        if not np.issubdtype(dtype, np.integer):
            raise InputError(f"{path}: band 1 is {dtype}; a class raster holds integer ids")
        if src.crs is None:
            raise InputError(f"{path}: has no CRS; polygons need georeferencing")
        info = np.iinfo(dtype)
        nodata = int(src.nodata) if src.nodata is not None else int(info.max) + 1
        tags = src.tags()
        colormap: dict[int, tuple[int, ...]] = {}
        try:
            colormap = src.colormap(1)
        except ValueError:
            colormap = {}
        classes = _classes_from(tags, colormap, card_classes, nodata)
        return ClassRaster(
            path=path,
            width=src.width,
            height=src.height,
            transform=src.transform,
            crs_wkt=src.crs.to_wkt(),
            nodata=nodata,
            classes=tuple(classes),
        )


def _classes_from(
    tags: dict[str, str],
    colormap: dict[int, tuple[int, ...]],
    card_classes: Sequence[ClassInfo],
    nodata: int,
) -> list[ClassInfo]:
    if "CLASS_NAMES" in tags:
        names = {int(k): str(v) for k, v in json.loads(tags["CLASS_NAMES"]).items()}
        colors = {int(k): v for k, v in json.loads(tags.get("CLASS_COLORS", "{}")).items()}
        return [
            ClassInfo(id=i, name=n, color=tuple(colors.get(i, _default_color(i)))[:3])  # type: ignore[arg-type]
            for i, n in sorted(names.items())
        ]
    out = []
    for c in card_classes:
        rgba = colormap.get(c.id)
        # GDAL reports 256 entries for any paletted byte raster; only trust non-black entries.
        color = tuple(rgba[:3]) if rgba is not None and any(rgba[:3]) else c.color
        out.append(ClassInfo(id=c.id, name=c.name, color=color))  # type: ignore[arg-type]
    known = {c.id for c in out}
    for i, rgba in sorted(colormap.items()):
        if i not in known and i != nodata and any(rgba[:3]):
            out.append(ClassInfo(id=i, name=f"class_{i}", color=tuple(rgba[:3])))  # type: ignore[arg-type]
    return out


def _default_color(i: int) -> tuple[int, int, int]:
    return DEFAULT_COLORS[i % len(DEFAULT_COLORS)]


def read_strips(
    mask_path: Path, confidence_path: Path | None, rows: int
) -> Iterator[tuple[int, NDArray[np.integer], NDArray[np.integer] | None]]:
    """Yields ``(row_off, class strip, confidence strip or None)``, ``rows`` lines at a time."""
    with rasterio.open(mask_path) as mask:
        conf = rasterio.open(confidence_path) if confidence_path is not None else None
        try:
            if conf is not None and (conf.shape != mask.shape or conf.transform != mask.transform):
                raise InputError(
                    f"{confidence_path}: its grid differs from {mask_path}'s; it cannot give "
                    "per-polygon confidence"
                )
            for row_off in range(0, mask.height, rows):
                height = min(rows, mask.height - row_off)
                window = rasterio.windows.Window(0, row_off, mask.width, height)
                yield (
                    row_off,
                    mask.read(1, window=window),
                    conf.read(1, window=window) if conf is not None else None,
                )
        finally:
            if conf is not None:
                conf.close()


# ------------------------------------------------------------------------------ atomic file sets


class AtomicFiles:
    """A set of files written into a hidden temporary folder, then renamed into ``out_dir``.

    Each file replaces its target with one rename (readers never see a half-written file); the
    renames happen only after every file is complete, so a failure leaves the old files.
    """

    def __init__(self, out_dir: Path, names: Sequence[str], overwrite: bool) -> None:
        existing = [out_dir / n for n in names if (out_dir / n).exists()]
        if existing and not overwrite:
            raise OutputExistsError(
                f"{', '.join(str(p) for p in existing)}: exist already; pass --overwrite to "
                "replace them"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.tmp = out_dir / f".geoseg-partial-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()

    def commit(self) -> list[Path]:
        """Renames every file of the temporary folder into place and removes the folder."""
        done = []
        for path in sorted(self.tmp.iterdir()):
            target = self.out_dir / path.name
            os.replace(path, target)
            done.append(target)
        self.tmp.rmdir()
        return done

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ geoseg vectorize

STRIP_ROWS = 512


def vectorize_file(
    mask_path: Path,
    out_dir: Path,
    *,
    formats: Sequence[str] = ("gpkg",),
    coverage: CoverageOptions | None = None,
    card_classes: Sequence[ClassInfo] = (),
    model_name: str | None = None,
    weights_sha256: str | None = None,
    confidence_path: Path | None = None,
    scene_id: str | None = None,
    overwrite: bool = False,
) -> tuple[list[Path], int]:
    """Polygons of any class raster, as ``geoseg segment`` writes them, into ``out_dir``.

    Args:
        mask_path: Integer class raster (band 1), e.g. a geoseg ``mask.tif``.
        out_dir: Output folder (created); ``polygons.<ext>`` per format (+ ``polygons.qml``).
        formats: Keys of ``FORMATS``.
        coverage: Sieve, hole filling, simplification (None: exact polygons).
        card_classes: Class names/colours of a model card, used when the raster has no
            ``CLASS_NAMES`` tag.
        model_name: ``model_name`` attribute.
        weights_sha256: ``weights_sha256`` attribute.
        confidence_path: Confidence raster on the same grid for ``confidence_mean`` (uint8
            ``255 x probability`` as geoseg writes it); None: ``confidence.tif`` beside a mask
            named ``mask.tif`` when it exists and matches, else no confidence.
        scene_id: ``scene_id`` attribute; None: the mask's folder name for ``mask.tif``, else
            its file stem.
        overwrite: Replace existing output files (otherwise refuse before any work).

    Returns:
        The files written and the number of polygons.
    """
    raster = read_class_raster(mask_path, card_classes)
    names = [FORMATS[f] for f in formats]
    if {"parquet", "fgb"} & set(formats):
        names.append("polygons.qml")
    files = AtomicFiles(out_dir, names, overwrite)
    try:
        confidence = confidence_path or _sibling_confidence(raster)
        layer = vectorize_strips(
            read_strips(mask_path, confidence, STRIP_ROWS),
            raster.transform,
            raster.width,
            raster.height,
            raster.nodata,
            raster.crs_wkt,
            coverage or CoverageOptions(),
            with_confidence=confidence is not None,
        )
        classes = complete_classes(raster.classes, layer.class_ids.tolist())
        if scene_id is None:
            scene_id = mask_path.parent.name if mask_path.name == "mask.tif" else mask_path.stem
        provenance = Provenance(scene_id, model_name, weights_sha256)
        write_polygons(files.tmp, layer, classes, raster.crs_wkt, provenance, formats)
        return files.commit(), len(layer)
    finally:
        files.abort()


def _sibling_confidence(raster: ClassRaster) -> Path | None:
    candidate = raster.path.with_name("confidence.tif")
    if raster.path.name != "mask.tif" or not candidate.exists():
        return None
    with rasterio.open(candidate) as conf:
        if conf.shape == (raster.height, raster.width) and conf.transform == raster.transform:
            return candidate
    log.warning("%s: not on the grid of %s; no confidence_mean", candidate, raster.path)
    return None
