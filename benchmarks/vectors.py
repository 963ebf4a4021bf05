"""Vector benchmark: ``geoseg vectorize`` on a generated 10k x 10k class mask.

Usage (from the repository root)::

    python -m benchmarks.vectors [--size 10000] [--out benchmarks/out/vectors]

1. Generates a mask with 6 classes in realistic blobs (two octaves of smooth value noise,
   thresholded), streamed 512 rows at a time into a tiled DEFLATE GeoTIFF with geoseg's
   conventions (uint8, nodata 255, EPSG:32633, 10 m, palette and ``CLASS_NAMES`` tags); the pixels
   are never held whole.
2. Runs ``geoseg vectorize --simplify 1px`` on it as a subprocess, once writing GeoPackage (the
   default) and once GeoParquet, with the honest wall clock and the peak RSS of the process tree
   (:mod:`benchmarks.proctree`).
3. Converts the mask to a COG (DEFLATE, MODE overviews) to compare file sizes.

Prints the figures and writes ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import rasterio
import rasterio.shutil
import rasterio.windows
from numpy.typing import NDArray
from rasterio.crs import CRS
from rasterio.transform import from_origin

from benchmarks.proctree import run_monitored

CLASSES = ["water", "forest", "grass", "crop", "built", "bare"]
COLORS = [
    (31, 120, 180),
    (27, 94, 32),
    (130, 200, 90),
    (240, 220, 110),
    (220, 40, 40),
    (160, 130, 100),
]
STRIP = 512
NODATA = 255


def _octave(rng: np.random.Generator, size: int, cell: int) -> tuple[NDArray[np.float64], int]:
    """A coarse grid of random values, one per ``cell`` pixels (plus one for the far edge)."""
    n = size // cell + 2
    return rng.random((n, n)), cell


def _sample(
    grid: NDArray[np.float64], cell: int, rows: NDArray[np.float64], width: int
) -> NDArray[np.float64]:
    """Value noise of ``grid`` at pixel rows ``rows`` and columns ``0..width-1`` (smoothstep)."""
    y = rows / cell
    x = np.arange(width, dtype=np.float64) / cell
    y0 = np.floor(y).astype(np.int64)
    x0 = np.floor(x).astype(np.int64)
    ty = y - y0
    tx = x - x0
    ty = (ty * ty * (3 - 2 * ty))[:, None]
    tx = (tx * tx * (3 - 2 * tx))[None, :]
    a = grid[np.ix_(y0, x0)]
    b = grid[np.ix_(y0, x0 + 1)]
    c = grid[np.ix_(y0 + 1, x0)]
    d = grid[np.ix_(y0 + 1, x0 + 1)]
    top = a + (b - a) * tx
    bottom = c + (d - c) * tx
    return np.asarray(top + (bottom - top) * ty)


def generate_mask(path: Path, size: int, seed: int = 0) -> float:
    """Writes the blob mask to ``path`` strip by strip; returns the seconds it took."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    octaves = [_octave(rng, size, 400), _octave(rng, size, 90), _octave(rng, size, 25)]
    weights = [0.6, 0.3, 0.1]
    # Thresholds at the quantiles of a sample, so that all six classes get a fair share.
    sample = sum(
        w * _sample(g, c, np.linspace(0, size - 1, 64), size)
        for w, (g, c) in zip(weights, octaves, strict=True)
    )
    edges = np.quantile(np.asarray(sample), np.linspace(0, 1, len(CLASSES) + 1)[1:-1])
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 1,
        "dtype": "uint8",
        "nodata": NODATA,
        "crs": CRS.from_epsg(32633),
        "transform": from_origin(500000.0, 5200000.0, 10.0, 10.0),
        "tiled": True,
        "blockxsize": STRIP,
        "blockysize": STRIP,
        "compress": "DEFLATE",
        "bigtiff": "IF_SAFER",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write_colormap(1, {i: (*c, 255) for i, c in enumerate(COLORS)})
        dst.update_tags(
            CLASS_NAMES=json.dumps(dict(enumerate(CLASSES))),
            CLASS_COLORS=json.dumps({i: list(c) for i, c in enumerate(COLORS)}),
        )
        for row_off in range(0, size, STRIP):
            rows = np.arange(row_off, min(size, row_off + STRIP), dtype=np.float64)
            field = sum(
                w * _sample(g, c, rows, size) for w, (g, c) in zip(weights, octaves, strict=True)
            )
            ids = np.searchsorted(edges, np.asarray(field)).astype(np.uint8)
            window = rasterio.windows.Window(0, row_off, size, len(rows))
            dst.write(ids, 1, window=window)
    return time.perf_counter() - t0


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=10000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/vectors"))
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    mask = out / f"mask{args.size}.tif"
    results: dict[str, Any] = {"size": args.size}
    if not mask.exists():
        results["generate_s"] = generate_mask(mask, args.size)
    cog = out / f"mask{args.size}.cog.tif"
    t0 = time.perf_counter()
    with rasterio.Env(GDAL_NUM_THREADS="2"):
        rasterio.shutil.copy(
            mask, cog, driver="COG", compress="DEFLATE", overview_resampling="MODE"
        )
    results["cog_s"] = time.perf_counter() - t0
    results["mask_deflate_bytes"] = mask.stat().st_size
    results["mask_cog_bytes"] = cog.stat().st_size
    for fmt in ("gpkg", "parquet"):
        target = out / fmt
        command = [
            sys.executable, "-m", "geoseg", "vectorize", str(mask), "--out", str(target),
            "--simplify", "1px", "--vector-format", fmt, "--overwrite",
        ]  # fmt: skip
        run = run_monitored(command, out / f"vectorize-{fmt}.log", timeout_s=600)
        if run.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed, see {out / f'vectorize-{fmt}.log'}")
        polygons = target / f"polygons.{fmt}"
        count = pyogrio.read_info(polygons, layer="polygons")["features"] if fmt == "gpkg" else None
        if count is None:
            import pyarrow.parquet as pq

            count = pq.ParquetFile(polygons).metadata.num_rows
        results[fmt] = {
            "wall_s": run.wall_s,
            "peak_tree_rss_bytes": run.tree.peak_tree_rss,
            "peak_tree_pss_bytes": run.tree.peak_tree_pss,
            "foreign_cpu_share": run.foreign_cpu_share,
            "polygons": int(count),
            "bytes": polygons.stat().st_size,
        }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"mask {args.size} x {args.size}, 6 classes, 10 m, EPSG:32633")
    print(
        f"  mask: tiled DEFLATE GeoTIFF {_mib(results['mask_deflate_bytes'])}, "
        f"COG (DEFLATE, MODE overviews) {_mib(results['mask_cog_bytes'])}"
    )
    for fmt in ("gpkg", "parquet"):
        r = results[fmt]
        print(
            f"  geoseg vectorize --simplify 1px --vector-format {fmt}: {r['wall_s']:.1f} s, "
            f"peak RSS {_mib(r['peak_tree_rss_bytes'])} (PSS {_mib(r['peak_tree_pss_bytes'])}), "
            f"{r['polygons']} polygons, file {_mib(r['bytes'])}, "
            f"other load on the machine {r['foreign_cpu_share']:.0%}"
        )
    return results


if __name__ == "__main__":
    main()
