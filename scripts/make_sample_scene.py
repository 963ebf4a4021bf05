"""Write a small synthetic RGB scene for the quickstart (no network, no shared data needed).

Usage: python scripts/make_sample_scene.py OUT.tif [--size 1200]

Smooth random fields make water/vegetation/built/bare-like patches; a tilted nodata (0) border
like Landsat's exercises the nodata path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    coarse = rng.random((size // scale + 2, size // scale + 2))
    rows = np.linspace(0, coarse.shape[0] - 1.001, size)
    r0 = rows.astype(int)
    fr = (rows - r0)[:, None]
    fc = (rows - r0)[None, :]
    c = coarse
    top = c[r0][:, r0] * (1 - fc) + c[r0][:, r0 + 1] * fc
    bottom = c[r0 + 1][:, r0] * (1 - fc) + c[r0 + 1][:, r0 + 1] * fc
    return np.asarray(top * (1 - fr) + bottom * fr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--size", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    size = args.size
    field = _smooth_noise(rng, size, 60)
    palette = np.array([[40, 60, 120], [50, 120, 40], [150, 140, 140], [190, 160, 110]])
    classes = np.digitize(field, [0.3, 0.55, 0.75])
    image = palette[classes].transpose(2, 0, 1).astype(np.float64)
    image += rng.normal(0, 8, image.shape)
    image = np.clip(image, 1, 255).astype(np.uint8)
    rows, cols = np.mgrid[0:size, 0:size]
    outside = (rows + 0.3 * cols < 0.1 * size) | (rows - 0.3 * cols > 0.85 * size)
    image[:, outside] = 0
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": Affine(10, 0, 500000, 0, -10, 5100000),
        "nodata": 0,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "DEFLATE",
        "photometric": "RGB",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(args.out, "w", **profile) as dst:
        dst.write(image)
        dst.descriptions = ("red", "green", "blue")


if __name__ == "__main__":
    main()
