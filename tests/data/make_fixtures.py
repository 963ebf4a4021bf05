"""Generate the small test rasters, broken ones included (torchgeo-style committed generator).

Usage: python tests/data/make_fixtures.py OUT_DIR   (the tests call :func:`make_all` themselves)

Every fixture is an RGB uint8 scene in EPSG:32633 unless its name says what is wrong with it.
The fixtures added for tests/test_bad_inputs.py draw from their own generator, so adding them left
the older fixtures byte for byte as they were.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

TRANSFORM = Affine(10, 0, 500000, 0, -10, 5100000)


def _write(
    path: Path, data: np.ndarray, descriptions: tuple[str, ...] | None = None, **profile: object
) -> Path:
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
        if descriptions is not None:
            dst.descriptions = descriptions
        elif data.shape[0] == 3:
            dst.descriptions = ("red", "green", "blue")
    return path


def _rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(1, 255, (3, height, width), dtype=np.uint8)


def make_all(out: Path) -> dict[str, Path]:
    """Write every fixture into ``out`` and return their paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(42)
    good = _rgb(rng, 200, 300)
    paths = {
        "good": _write(out / "good.tif", good),
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
    paths.update(_more(out, good))
    return paths


def _more(out: Path, good: np.ndarray) -> dict[str, Path]:
    """The fixtures of tests/test_bad_inputs.py (own generator: the others stay as they were)."""
    rng = np.random.default_rng(43)
    paths = {
        "identity_transform": _write(
            out / "identity_transform.tif", _rgb(rng, 64, 64), transform=Affine.identity()
        ),
        "sheared": _write(
            out / "sheared.tif", _rgb(rng, 64, 64), transform=TRANSFORM @ Affine.shear(15, 0)
        ),
        # Same pixels as good.tif, in the next UTM zone: a job with both spans two CRSs.
        "other_crs": _write(out / "other_crs.tif", good, crs="EPSG:32634"),
        # good.tif's bands in another order (blue, green, red) after an extra first band (nir).
        "bands_reordered": _write(
            out / "bands_reordered.tif",
            np.concatenate([rng.integers(1, 255, (1, 200, 300), dtype=np.uint8), good[::-1]]),
            descriptions=("nir", "blue", "green", "red"),
        ),
        "odd_size": _write(out / "odd_size.tif", _rgb(rng, 203, 317)),  # 203, 317: primes
        "int16": _write(out / "int16.tif", rng.integers(-1000, 10000, (3, 64, 80), dtype=np.int16)),
    }
    # Float reflectance in [0, 1) with NaN as nodata: a 20 x 30 block NaN in every band, and a
    # diagonal NaN in the green band only (a pixel with any NaN band cannot be classified).
    floats = rng.random((3, 90, 110), dtype=np.float32)
    floats[:, 10:30, 40:70] = np.nan
    diagonal = np.arange(60, 90)
    floats[1, diagonal, diagonal] = np.nan
    paths["float32_nan"] = _write(out / "float32_nan.tif", floats, nodata=float("nan"))

    # Truncated: a COG (directory first, then the blocks) cut after 60% of its bytes opens and
    # fails when a block past the cut is read; a plain GeoTIFF (GDAL writes its directory last)
    # cut the same way loses its directory and fails at open.
    source = _write(out / "truncated_source.tif", _rgb(rng, 512, 512))
    cog = out / "truncated_cog.tif"
    rasterio.shutil.copy(
        source, cog, driver="COG", blocksize=128, compress="DEFLATE", overviews="NONE"
    )
    plain = _write(
        out / "truncated.tif",
        _rgb(rng, 512, 512),
        tiled=True,
        blockxsize=128,
        blockysize=128,
        compress="DEFLATE",
    )
    source.unlink()
    for path in (cog, plain):
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) * 6 // 10])
    paths["truncated_cog"] = cog
    paths["truncated"] = plain
    paths.update(_rgbn_tagged_rgba(out))
    return paths


def _rgbn_tagged_rgba(out: Path) -> dict[str, Path]:
    """Red, green, blue, NIR written as GDAL writes four uint8 bands by default (PHOTOMETRIC=RGB,
    the fourth an alpha extra sample), as many RGBN files are. NIR is 0 over a 20 x 30 block (dark
    water); no nodata is declared."""
    rgbn = np.random.default_rng(44).integers(1, 255, (4, 60, 80), dtype=np.uint8)
    rgbn[3, 20:40, 10:40] = 0
    return {
        "rgbn_tagged_rgba": _write(
            out / "rgbn_tagged_rgba.tif",
            rgbn,
            descriptions=("red", "green", "blue", "nir"),
        )
    }


if __name__ == "__main__":
    for name, path in make_all(Path(sys.argv[1])).items():
        print(f"{name}: {path}")
