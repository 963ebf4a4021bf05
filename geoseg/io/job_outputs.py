"""Job-level outputs: one polygon dataset and mask mosaics over all successful scenes of a run.

Written by :func:`write_job_outputs` at the end of ``geoseg.engine.job.segment``, from the
per-scene files already in the output root (``OUT/<name>/mask.tif`` and ``polygons.*``):

- ``OUT/polygons.parquet/``: a folder of GeoParquet 1.1 files, ``scene-<name>.parquet`` per scene
  and ``merged.parquet`` for features merged across scene borders; one dataset that
  ``geopandas.read_parquet(OUT / "polygons.parquet")`` (pyarrow datasets) reads whole.
  ``scene_id`` is an ordinary text column (not a hive partition), so a merged feature can carry
  ``"a,b"``. A GeoParquet file has one CRS, so when the scenes come in several CRSs each CRS gets
  its own dataset, ``OUT/polygons_<crs>.parquet/``, and no ``polygons.parquet`` is written.
  Scenes are read and written one at a time: memory holds one scene's polygons plus the
  polygons that touch a border shared with another scene.
- ``OUT/mask_<crs>.vrt``: a GDAL VRT mosaic of the scenes' ``mask.tif`` per CRS (``<crs>`` is
  ``epsg<code>``, or ``crs-<hash>`` for a CRS without an EPSG code), sources by relative path,
  nodata 255 (65535), the palette, category names and ``CLASS_NAMES`` tag of the first scene.
  Scenes in different CRSs are never mixed; when the scenes of one CRS have several pixel sizes,
  there is one VRT per pixel size, ``mask_<crs>_<xres>x<yres>.vrt``. Where scenes overlap, the
  later scene's valid pixels win (source nodata is transparent).

Merging across scene borders
----------------------------
Two polygons of *adjacent* scenes (same CRS; footprints sharing a boundary segment of positive
length and no area) are merged when they have the same class and their boundaries share a
segment of positive length: only polygons touching the shared border can qualify, so only those
are gathered; pairs come from an STRtree query, groups from a union-find, and each group becomes
one feature (``shapely.union_all``) with ``area_m2`` / ``perimeter_m`` recomputed
(:func:`geoseg.measure.ground_area_perimeter`), ``confidence_mean`` area-weighted, ``scene_id``
the comma-joined sorted scene names and ``fid`` null. Polygons meeting at a corner only are not
merged. Scenes that *overlap* (two years of the same place, say) are never merged: their polygons
are kept as they are, both copies, and a warning names the pair. The per-scene files are left
unchanged. Merging requires the border coordinates of both scenes to be identical, which holds
for scenes cut from one pixel grid.

Only the scenes passed in (a run's successful scenes) are included. Outputs of this kind whose
names this run does not write (a VRT of a CRS no longer present) are left as they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import affine
import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import rasterio
import shapely
from rasterio.crs import CRS

from geoseg.io.vectors import FORMATS, LAYER
from geoseg.measure import ground_area_perimeter

log = logging.getLogger(__name__)

DATASET = "polygons.parquet"
MERGED_FILE = "merged.parquet"
_DTYPES = {
    "fid": "Int64",
    "class_id": "int32",
    "class_name": "string",
    "area_m2": "float64",
    "perimeter_m": "float64",
    "confidence_mean": "float64",
    "scene_id": "string",
    "model_name": "string",
    "weights_sha256": "string",
}
_VRT_TYPES = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "int32": "Int32"}


@dataclass(frozen=True)
class SceneFiles:
    """A finished scene's files and grid, as the job-level outputs need them."""

    name: str
    mask: Path
    polygons: Path | None
    crs_wkt: str
    crs_tag: str
    transform: affine.Affine
    width: int
    height: int
    dtype: str
    nodata: int
    footprint: shapely.Polygon


@dataclass
class JobOutputs:
    """What :func:`write_job_outputs` wrote (recorded as ``run.json``'s ``job_outputs``)."""

    polygons: list[str] = field(default_factory=list)
    vrts: list[str] = field(default_factory=list)
    merged_features: int = 0
    merged_from: int = 0
    overlapping_scenes: list[list[str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "polygons": self.polygons,
            "vrts": self.vrts,
            "merged_features": self.merged_features,
            "merged_from": self.merged_from,
            "overlapping_scenes": self.overlapping_scenes,
        }


def crs_tag(crs: CRS) -> str:
    """``epsg32633`` for a CRS with an EPSG code, else ``crs-`` and a hash of its WKT."""
    code = crs.to_epsg()
    if code is not None:
        return f"epsg{code}"
    return "crs-" + hashlib.sha256(crs.to_wkt().encode()).hexdigest()[:10]


def read_scene_files(out_root: Path, name: str) -> SceneFiles:
    """The grid of ``OUT/<name>/mask.tif`` and its polygon file (GeoPackage first), if any."""
    folder = out_root / name
    mask = folder / "mask.tif"
    with rasterio.open(mask) as src:
        if src.crs is None:
            raise ValueError(f"{mask}: has no CRS")
        crs = src.crs
        transform = src.transform
        width, height = src.width, src.height
        dtype = src.dtypes[0]
        nodata = int(src.nodata) if src.nodata is not None else 255
    corners = [transform @ xy for xy in ((0, 0), (width, 0), (width, height), (0, height))]
    polygons = next(
        (folder / FORMATS[f] for f in ("gpkg", "parquet", "fgb") if (folder / FORMATS[f]).exists()),
        None,
    )
    return SceneFiles(
        name=name,
        mask=mask,
        polygons=polygons,
        crs_wkt=crs.to_wkt(),
        crs_tag=crs_tag(crs),
        transform=transform,
        width=width,
        height=height,
        dtype=dtype,
        nodata=nodata,
        footprint=shapely.orient_polygons(shapely.Polygon(corners)),
    )


def write_job_outputs(out_root: Path, names: Sequence[str]) -> JobOutputs:
    """Writes the polygon dataset(s) and mask VRTs of the scenes ``names`` into ``out_root``.

    Everything is built in a hidden temporary folder and renamed into place at the end (a folder
    dataset replaces an older one with two renames), so readers never see a partial dataset.
    """
    scenes = [read_scene_files(out_root, n) for n in names]
    result = JobOutputs()
    tmp = out_root / f".job-outputs.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for vrt_name, group in _vrt_groups(scenes).items():
            if _write_vrt(tmp / vrt_name, group):
                result.vrts.append(vrt_name)
        by_crs: dict[str, list[SceneFiles]] = defaultdict(list)
        for scene in scenes:
            if scene.polygons is not None:
                by_crs[scene.crs_tag].append(scene)
        for tag, group in by_crs.items():
            dataset = DATASET if len(by_crs) == 1 else f"polygons_{tag}.parquet"
            _write_dataset(tmp / dataset, group, result)
            result.polygons.append(dataset)
        skipped = _commit(tmp, out_root)
        result.vrts = [n for n in result.vrts if n not in skipped]
        result.polygons = [n for n in result.polygons if n not in skipped]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _commit(tmp: Path, out_root: Path) -> set[str]:
    """Renames everything in ``tmp`` into ``out_root``; returns the names it had to skip."""
    skipped: set[str] = set()
    for path in sorted(tmp.iterdir()):
        target = out_root / path.name
        if (target / "mask.tif").exists():
            log.warning("%s: is a scene's folder; job-level %s not written", target, path.name)
            skipped.add(path.name)
            continue
        if path.is_dir():
            old = None
            if target.exists():
                old = out_root / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
                target.rename(old)
            path.rename(target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(path, target)
    return skipped


# ------------------------------------------------------------------------------------ VRT mosaics


def _fmt(value: float) -> str:
    return f"{value:.12g}"


def _vrt_groups(scenes: Sequence[SceneFiles]) -> dict[str, list[SceneFiles]]:
    """VRT file name -> its scenes: per CRS, and per pixel size where a CRS has several."""
    groups: dict[tuple[str, str, str], list[SceneFiles]] = defaultdict(list)
    for scene in scenes:
        t = scene.transform
        if t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
            log.warning("%s: not a north-up grid; left out of the mask mosaic", scene.mask)
            continue
        groups[(scene.crs_tag, _fmt(t.a), _fmt(-t.e))].append(scene)
    per_crs: dict[str, int] = defaultdict(int)
    for tag, _, _ in groups:
        per_crs[tag] += 1
    named: dict[str, list[SceneFiles]] = {}
    for (tag, xres, yres), group in groups.items():
        if per_crs[tag] > 1:
            log.warning(
                "scenes in %s have %d pixel sizes: one mask VRT per pixel size",
                tag,
                per_crs[tag],
            )
            named[f"mask_{tag}_{xres}x{yres}.vrt"] = group
        else:
            named[f"mask_{tag}.vrt"] = group
    return named


def _write_vrt(path: Path, scenes: Sequence[SceneFiles]) -> bool:
    """A mosaic VRT of the scenes' masks (same CRS and pixel size); False if none was written."""
    dtypes = {s.dtype for s in scenes}
    if len(dtypes) > 1 or scenes[0].dtype not in _VRT_TYPES:
        log.warning("%s: masks of types %s cannot share one VRT; skipped", path.name, dtypes)
        return False
    first = scenes[0]
    xres, yres = first.transform.a, -first.transform.e
    xmin = min(s.transform.c for s in scenes)
    ymax = max(s.transform.f for s in scenes)
    xmax = max(s.transform.c + s.width * xres for s in scenes)
    ymin = min(s.transform.f - s.height * yres for s in scenes)
    width = round((xmax - xmin) / xres)
    height = round((ymax - ymin) / yres)
    with rasterio.open(first.mask) as src:
        tags = src.tags()
        try:
            colormap: dict[int, tuple[int, ...]] = src.colormap(1)
        except ValueError:
            colormap = {}
    names: dict[int, str] = {
        int(k): str(v) for k, v in json.loads(tags.get("CLASS_NAMES", "{}")).items()
    }
    for other in scenes[1:]:
        with rasterio.open(other.mask) as src:
            if src.tags().get("CLASS_NAMES") != tags.get("CLASS_NAMES"):
                log.warning(
                    "%s: %s has other class names than %s; the VRT shows %s's",
                    path.name,
                    other.name,
                    first.name,
                    first.name,
                )
    lines = [
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
        f'  <SRS dataAxisToSRSAxisMapping="1,2">{escape(first.crs_wkt)}</SRS>',
        f"  <GeoTransform>{_fmt(xmin)}, {_fmt(xres)}, 0, {_fmt(ymax)}, 0, {_fmt(-yres)}"
        "</GeoTransform>",
    ]
    if "CLASS_NAMES" in tags:
        lines.append("  <Metadata>")
        for key in ("CLASS_NAMES", "CLASS_COLORS"):
            if key in tags:
                lines.append(f"    <MDI key={quoteattr(key)}>{escape(tags[key])}</MDI>")
        lines.append("  </Metadata>")
    lines += [
        f'  <VRTRasterBand dataType="{_VRT_TYPES[first.dtype]}" band="1">',
        f"    <NoDataValue>{first.nodata}</NoDataValue>",
    ]
    if colormap:
        lines.append("    <ColorInterp>Palette</ColorInterp>")
    if names:
        lines.append("    <CategoryNames>")
        lines += [
            f"      <Category>{escape(names.get(i, ''))}</Category>" for i in range(max(names) + 1)
        ]
        lines.append("    </CategoryNames>")
    if colormap:
        count = max(colormap) + 1 if first.dtype == "uint8" else max(names, default=0) + 1
        lines.append("    <ColorTable>")
        for i in range(count):
            r, g, b, a = (*colormap.get(i, (0, 0, 0, 0)), 255)[:4]
            lines.append(f'      <Entry c1="{r}" c2="{g}" c3="{b}" c4="{a}"/>')
        lines.append("    </ColorTable>")
    for scene in scenes:
        x_off = (scene.transform.c - xmin) / xres
        y_off = (ymax - scene.transform.f) / yres
        if abs(x_off - round(x_off)) > 1e-6 or abs(y_off - round(y_off)) > 1e-6:
            log.warning("%s: %s is not on the pixel grid of the mosaic", path.name, scene.name)
        else:
            x_off, y_off = round(x_off), round(y_off)
        lines += [
            "    <ComplexSource>",
            f'      <SourceFilename relativeToVRT="1">{escape(scene.name)}/mask.tif'
            "</SourceFilename>",
            "      <SourceBand>1</SourceBand>",
            f'      <SourceProperties RasterXSize="{scene.width}" RasterYSize="{scene.height}" '
            f'DataType="{_VRT_TYPES[scene.dtype]}" BlockXSize="512" BlockYSize="512"/>',
            f'      <SrcRect xOff="0" yOff="0" xSize="{scene.width}" ySize="{scene.height}"/>',
            f'      <DstRect xOff="{_fmt(x_off)}" yOff="{_fmt(y_off)}" xSize="{scene.width}" '
            f'ySize="{scene.height}"/>',
            f"      <NODATA>{scene.nodata}</NODATA>",
            "    </ComplexSource>",
        ]
    lines += ["  </VRTRasterBand>", "</VRTDataset>", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return True


# ------------------------------------------------------------------------- polygon dataset + merge


def read_scene_polygons(scene: SceneFiles) -> gpd.GeoDataFrame:
    """A scene's polygons with the dataset's columns and types (``fid`` from the file)."""
    assert scene.polygons is not None
    if scene.polygons.suffix == ".parquet":
        frame = gpd.read_parquet(scene.polygons)
        frame = frame.drop(columns=[c for c in ("bbox",) if c in frame.columns])
    else:
        frame = pyogrio.read_dataframe(scene.polygons, layer=LAYER, fid_as_index=True)
        if "fid" not in frame.columns:
            frame["fid"] = frame.index.to_numpy()
    frame = frame.reset_index(drop=True)
    for column, dtype in _DTYPES.items():
        if column not in frame.columns:
            frame[column] = pd.Series([None] * len(frame), dtype=dtype)
        else:
            frame[column] = frame[column].astype(dtype)
    return gpd.GeoDataFrame(frame[[*_DTYPES, "geometry"]], geometry="geometry")


def _write_frame(path: Path, frame: gpd.GeoDataFrame) -> None:
    frame.to_parquet(path, index=False, schema_version="1.1.0", write_covering_bbox=True)


def _neighbours(
    scenes: Sequence[SceneFiles], result: JobOutputs
) -> dict[tuple[int, int], shapely.Geometry]:
    """Adjacent scene pairs ``(i, j)``, i < j, and the border they share; warns on overlaps."""
    footprints = [s.footprint for s in scenes]
    tree = shapely.STRtree(footprints)
    pairs: dict[tuple[int, int], shapely.Geometry] = {}
    left, right = tree.query(footprints, predicate="intersects")
    for i, j in zip(left.tolist(), right.tolist(), strict=True):
        if i >= j:
            continue
        a, b = footprints[i], footprints[j]
        if shapely.intersection(a, b).area > 0:
            names = sorted((scenes[i].name, scenes[j].name))
            log.warning(
                "scenes %s and %s overlap: their polygons are not merged across the border "
                "(both kept in the job-level dataset)",
                *names,
            )
            result.overlapping_scenes.append(names)
            continue
        border = shapely.intersection(a.exterior, b.exterior)
        if shapely.length(border) > 0:
            pairs[(i, j)] = border
    return pairs


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _merge_groups(
    scenes: Sequence[SceneFiles], pairs: dict[tuple[int, int], shapely.Geometry]
) -> tuple[gpd.GeoDataFrame | None, dict[int, set[int]]]:
    """Merged features of the scenes' border polygons, and per scene the rows they replace."""
    borders: dict[int, list[shapely.Geometry]] = defaultdict(list)
    for (i, j), border in pairs.items():
        borders[i].append(border)
        borders[j].append(border)
    parts: list[gpd.GeoDataFrame] = []
    for index, lines in sorted(borders.items()):
        frame = read_scene_polygons(scenes[index])
        near = shapely.intersects(frame.geometry.to_numpy(), shapely.union_all(lines))
        part = frame.loc[near].copy()
        part["_scene"] = index
        part["_row"] = np.flatnonzero(near)
        parts.append(part)
    if not parts:
        return None, {}
    cand = pd.concat(parts, ignore_index=True)
    geoms = cand.geometry.to_numpy()
    classes = cand["class_id"].to_numpy()
    scene_of = cand["_scene"].to_numpy()
    left, right = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    keep = (left < right) & (classes[left] == classes[right]) & (scene_of[left] != scene_of[right])
    adjacent = {(min(a, b), max(a, b)) for a, b in pairs}
    keep &= np.array(
        [
            (min(a, b), max(a, b)) in adjacent
            for a, b in zip(scene_of[left].tolist(), scene_of[right].tolist(), strict=True)
        ],
        dtype=bool,
    )
    left, right = left[keep], right[keep]
    shared = shapely.length(
        shapely.intersection(shapely.boundary(geoms[left]), shapely.boundary(geoms[right]))
    )
    parent = list(range(len(cand)))
    for a, b in zip(left[shared > 0].tolist(), right[shared > 0].tolist(), strict=True):
        ra, rb = _find(parent, a), _find(parent, b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(cand)):
        groups[_find(parent, i)].append(i)
    members = [g for g in groups.values() if len(g) > 1]
    if not members:
        return None, {}
    replaced: dict[int, set[int]] = defaultdict(set)
    rows: list[dict[str, Any]] = []
    merged_geoms = []
    for group in members:
        sub = cand.iloc[group]
        for s, r in zip(sub["_scene"].tolist(), sub["_row"].tolist(), strict=True):
            replaced[int(s)].add(int(r))
        area = sub["area_m2"].to_numpy(dtype=np.float64)
        conf = sub["confidence_mean"].to_numpy(dtype=np.float64, na_value=np.nan)
        has = ~np.isnan(conf)
        models = set(sub["model_name"].dropna())
        weights = set(sub["weights_sha256"].dropna())
        rows.append(
            {
                "fid": None,
                "class_id": int(sub["class_id"].iloc[0]),
                "class_name": sub["class_name"].iloc[0],
                "confidence_mean": float((conf[has] * area[has]).sum() / area[has].sum())
                if has.any() and area[has].sum() > 0
                else None,
                "scene_id": ",".join(sorted({scenes[int(s)].name for s in sub["_scene"]})),
                "model_name": models.pop() if len(models) == 1 else None,
                "weights_sha256": weights.pop() if len(weights) == 1 else None,
            }
        )
        merged_geoms.append(shapely.union_all(sub.geometry.to_numpy()))
    crs_wkt = scenes[0].crs_wkt
    area_m2, perimeter_m = ground_area_perimeter(merged_geoms, crs_wkt)
    table = pd.DataFrame(rows)
    table["area_m2"] = area_m2
    table["perimeter_m"] = perimeter_m
    for column, dtype in _DTYPES.items():
        table[column] = table[column].astype(dtype)
    merged = gpd.GeoDataFrame(
        table[list(_DTYPES)], geometry=gpd.GeoSeries(merged_geoms, crs=crs_wkt)
    )
    return merged, replaced


def _write_dataset(folder: Path, scenes: Sequence[SceneFiles], result: JobOutputs) -> None:
    """One GeoParquet folder dataset of scenes in one CRS, border polygons merged."""
    folder.mkdir()
    merged, replaced = _merge_groups(scenes, _neighbours(scenes, result))
    for index, scene in enumerate(scenes):
        frame = read_scene_polygons(scene)
        gone = replaced.get(index)
        if gone:
            frame = frame.drop(index=sorted(gone))
        frame = frame.set_crs(scene.crs_wkt, allow_override=True)
        if len(frame):
            _write_frame(folder / f"scene-{scene.name}.parquet", frame)
    if merged is not None:
        _write_frame(folder / MERGED_FILE, merged)
        result.merged_features += len(merged)
        result.merged_from += sum(len(r) for r in replaced.values())
