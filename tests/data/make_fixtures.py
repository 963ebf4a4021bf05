"""Generate the small test rasters, broken ones included (torchgeo-style committed generator).

Usage: python tests/data/make_fixtures.py OUT_DIR   (the tests call :func:`make_all` themselves)

Every fixture is an RGB uint8 scene in EPSG:32633 unless its name says what is wrong with it.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

TRANSFORM = Affine(10, 0, 500000, 0, -10, 5100000)


def _write(path: Path, data: np.ndarray, **profile: object) -> Path:
    base: dict[str, object] = {
        "driver": "GTiff",
        "height": data.shape[1],
        "width": data.shape[2],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "crs": "EPSG:32633",
        "transform": TRANSFORM,
    }
    base.update(profile)
    path.unlink(missing_ok=True)  # GDAL would try to open (and choke on) a broken older file
    with warnings.catch_warnings():
        # The no-CRS fixture is meant to be ungeoreferenced.
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        dst = rasterio.open(path, "w", **base)
    with dst:
        dst.write(data)
        if data.shape[0] == 3:
            dst.descriptions = ("red", "green", "blue")
    return path


def _rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(1, 255, (3, height, width), dtype=np.uint8)


def make_all(out: Path) -> dict[str, Path]:
    """Write every fixture into ``out`` and return their paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(42)
    paths = {
        "good": _write(out / "good.tif", _rgb(rng, 200, 300)),
        "two_band": _write(out / "two_band.tif", rng.integers(0, 255, (2, 64, 64), dtype=np.uint8)),
        "no_crs": _write(
            out / "no_crs.tif", _rgb(rng, 64, 64), crs=None, transform=Affine.identity()
        ),
        "rotated": _write(
            out / "rotated.tif", _rgb(rng, 64, 64), transform=TRANSFORM @ Affine.rotation(10)
        ),
        "uint16": _write(out / "uint16.tif", rng.integers(0, 9999, (3, 64, 64), dtype=np.uint16)),
        "all_nodata": _write(out / "all_nodata.tif", np.zeros((3, 100, 120), np.uint8), nodata=0),
        "one_px_wide": _write(out / "one_px_wide.tif", _rgb(rng, 300, 1)),
        "tiny": _write(out / "tiny.tif", _rgb(rng, 5, 7)),
    }
    # Corrupt: the middle of the compressed blocks is overwritten with junk, the header and the
    # directory survive, so it opens and fails only when a damaged block is read.
    corrupt = _write(
        out / "corrupt.tif",
        _rgb(rng, 512, 512),
        tiled=True,
        blockxsize=128,
        blockysize=128,
        compress="DEFLATE",
    )
    raw = bytearray(corrupt.read_bytes())
    start, stop = len(raw) * 3 // 10, len(raw) * 6 // 10
    raw[start:stop] = rng.integers(0, 256, stop - start, dtype=np.uint8).tobytes()
    corrupt.write_bytes(bytes(raw))
    paths["corrupt"] = corrupt
    (out / "not_a_raster.tif").write_text("this is a text file, not a GeoTIFF\n")
    paths["not_a_raster"] = out / "not_a_raster.tif"
    (out / "empty.tif").write_bytes(b"")
    paths["empty"] = out / "empty.tif"
    return paths


if __name__ == "__main__":
    for name, path in make_all(Path(sys.argv[1])).items():
        print(f"{name}: {path}")
