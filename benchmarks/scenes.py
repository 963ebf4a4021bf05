"""Synthetic benchmark scenes: a streamed 4-band GeoTIFF and VRT mosaics of it.

The GeoTIFF is written one block row (512 lines, the whole width) at a time, so a 10k x 10k scene
never sits in memory whole. Its pixels come from hash-based value noise evaluated at *global*
pixel coordinates: any window can be computed on its own and the result does not depend on how the
scene is cut into strips. Three octaves of noise pick one of four land-cover-like palettes
(water, vegetation, built, bare) per pixel, and a fine octave adds texture, so the image is smooth
at the scale of a tile (DEFLATE compresses it, the model's mask is not pure noise) but not flat.

A large scene is a VRT that mosaics the GeoTIFF ``n x n`` times: GDAL reads it as one raster with
a proper geotransform and CRS, without a multi-gigabyte file on disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from affine import Affine
from numpy.typing import NDArray
from rasterio.windows import Window

SCENE_VERSION = 1  # bump when the pattern changes: cached scenes are keyed by it
BAND_NAMES = ("red", "green", "blue", "nir")
CLASSES = ("water", "vegetation", "built", "bare")
CRS = "EPSG:32633"
PIXEL_M = 10.0
ORIGIN = (500_000.0, 5_200_000.0)  # upper-left corner (x, y) in UTM 33N
BLOCK = 512

# Mean value per land-cover class and band (red, green, blue, nir).
_PALETTE = np.array(
    [
        [40, 60, 90, 20],  # water
        [50, 110, 40, 200],  # vegetation
        [150, 140, 140, 110],  # built
        [190, 160, 110, 150],  # bare
    ],
    dtype=np.float32,
)
_THRESHOLDS = (0.38, 0.55, 0.70)


def _lattice(ix: NDArray[np.int64], iy: NDArray[np.int64], seed: int) -> NDArray[np.float32]:
    """Pseudo-random value in [0, 1) for each integer lattice point (a 32-bit integer hash)."""
    h = (ix * 374_761_393 + iy * 668_265_263 + seed * 982_451_653) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 1_274_126_177) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return (h.astype(np.float64) / 2**32).astype(np.float32)


def value_noise(
    row0: int, col0: int, rows: int, cols: int, cell: int, seed: int
) -> NDArray[np.float32]:
    """Smooth noise in [0, 1) on the window ``rows x cols`` at ``(row0, col0)`` of the plane.

    Lattice values every ``cell`` pixels, interpolated with a smoothstep: continuous across any
    window boundary because only global coordinates enter.
    """
    y = (np.arange(row0, row0 + rows, dtype=np.float64) + 0.5) / cell
    x = (np.arange(col0, col0 + cols, dtype=np.float64) + 0.5) / cell
    iy, ix = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = (y - iy).astype(np.float32), (x - ix).astype(np.float32)
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    # Lattice values of the corners, evaluated on the (small) set of lattice rows and columns.
    ly = np.arange(iy[0], iy[-1] + 2)
    lx = np.arange(ix[0], ix[-1] + 2)
    grid = _lattice(lx[None, :], ly[:, None], seed)
    ry, rx = iy - ly[0], ix - lx[0]
    top = grid[ry][:, rx] * (1 - fx) + grid[ry][:, rx + 1] * fx
    bottom = grid[ry + 1][:, rx] * (1 - fx) + grid[ry + 1][:, rx + 1] * fx
    return np.asarray(top * (1 - fy[:, None]) + bottom * fy[:, None], dtype=np.float32)


def _field(row0: int, col0: int, rows: int, cols: int, seed: int) -> NDArray[np.float32]:
    return (
        0.55 * value_noise(row0, col0, rows, cols, 700, seed)
        + 0.30 * value_noise(row0, col0, rows, cols, 160, seed + 1)
        + 0.15 * value_noise(row0, col0, rows, cols, 40, seed + 2)
    )


def scene_classes(row0: int, col0: int, rows: int, cols: int, seed: int = 0) -> NDArray[np.int64]:
    """The land-cover class (index into ``CLASSES``) the scene paints on a window."""
    return np.digitize(_field(row0, col0, rows, cols, seed), _THRESHOLDS)


def scene_window(row0: int, col0: int, rows: int, cols: int, seed: int = 0) -> NDArray[np.uint8]:
    """The scene's pixels ``(4, rows, cols)`` uint8 on a window, from global coordinates only."""
    field = _field(row0, col0, rows, cols, seed)
    classes = np.digitize(field, _THRESHOLDS)
    texture = value_noise(row0, col0, rows, cols, 6, seed + 3) - 0.5
    image = _PALETTE[classes].transpose(2, 0, 1)  # (4, rows, cols)
    image = image * (1 + 0.25 * texture)[None] + 30 * (field - 0.5)[None]
    out: NDArray[np.uint8] = np.clip(image, 1, 255).astype(np.uint8)
    return out


def scene_path(out_dir: Path, size: int) -> Path:
    return out_dir / f"scene{size}-v{SCENE_VERSION}.tif"


def make_scene(out_dir: Path, size: int, seed: int = 0) -> Path:
    """Write (or reuse) the ``size x size`` 4-band uint8 GeoTIFF, one block row at a time.

    Tiled 512, DEFLATE, EPSG:32633 at 10 m, band descriptions red, green, blue, nir. Written under
    a temporary name and renamed when complete, so an interrupted run is never reused.
    """
    path = scene_path(out_dir, size)
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": len(BAND_NAMES),
        "dtype": "uint8",
        "crs": CRS,
        "transform": Affine(PIXEL_M, 0, ORIGIN[0], 0, -PIXEL_M, ORIGIN[1]),
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "compress": "DEFLATE",
        "predictor": 2,
        "interleave": "pixel",
        "bigtiff": "IF_SAFER",
    }
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.descriptions = BAND_NAMES
        for row0 in range(0, size, BLOCK):
            rows = min(BLOCK, size - row0)
            dst.write(scene_window(row0, 0, rows, size, seed), window=Window(0, row0, size, rows))
    tmp.replace(path)
    return path


def make_mosaic_vrt(src: Path, repeat: int, out: Path) -> Path:
    """Write a VRT that tiles ``src`` ``repeat x repeat`` times into one georeferenced raster.

    Hand-written XML (no ``gdalbuildvrt`` needed): one ``SimpleSource`` per band and copy, with
    the source's size, type and block size declared so GDAL opens the source lazily. The source is
    referenced relative to the VRT, so the pair can be moved together.
    """
    with rasterio.open(src) as ds:
        width, height = ds.width, ds.height
        transform, crs = ds.transform, ds.crs
        block_h, block_w = ds.block_shapes[0]
        dtype = ds.dtypes[0]
        descriptions = ds.descriptions
        nodata = ds.nodata
    if crs is None:
        raise ValueError(f"{src}: no CRS")
    gdal_type = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "float32": "Float32"}[dtype]
    rel = os.path.relpath(src.resolve(), out.resolve().parent)
    geotransform = ", ".join(
        repr(v)
        for v in (transform.c, transform.a, transform.b, transform.f, transform.d, transform.e)
    )
    lines = [
        f'<VRTDataset rasterXSize="{width * repeat}" rasterYSize="{height * repeat}">',
        f"  <SRS>{escape(crs.to_wkt())}</SRS>",
        f"  <GeoTransform>{geotransform}</GeoTransform>",
    ]
    for band, description in enumerate(descriptions, start=1):
        lines.append(
            f'  <VRTRasterBand dataType="{gdal_type}" band="{band}" '
            f'blockXSize="{block_w}" blockYSize="{block_h}">'
        )
        if description:
            lines.append(f"    <Description>{escape(description)}</Description>")
        if nodata is not None:
            lines.append(f"    <NoDataValue>{nodata!r}</NoDataValue>")
        for i in range(repeat):
            for j in range(repeat):
                lines += [
                    "    <SimpleSource>",
                    f'      <SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>',
                    f"      <SourceBand>{band}</SourceBand>",
                    f'      <SourceProperties RasterXSize="{width}" RasterYSize="{height}" '
                    f'DataType="{gdal_type}" BlockXSize="{block_w}" BlockYSize="{block_h}" />',
                    f'      <SrcRect xOff="0" yOff="0" xSize="{width}" ySize="{height}" />',
                    f'      <DstRect xOff="{j * width}" yOff="{i * height}" '
                    f'xSize="{width}" ySize="{height}" />',
                    "    </SimpleSource>",
                ]
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    return out
