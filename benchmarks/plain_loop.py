"""The baseline most tutorials teach: a rasterio + torch sliding-window loop, for the side by side.

Usage (from the repository root)::

    python -m benchmarks.plain_loop IMAGE MODEL_DIR OUT.tif [--tile 512] [--overlap 64] [--batch 4]

Windows of ``tile`` pixels every ``tile - overlap`` pixels (the last row and column shifted back to
end at the image's edge), read with rasterio, normalised as geoseg's model card says, batched
through the same model in fp32, and the argmax of each window written over the mask in reading
order: a later window overwrites the overlap of an earlier one, so the class map changes
abruptly along every window's top and left edge (the seams ``benchmarks.run`` measures). The mask
is written window by window to a tiled GeoTIFF: memory stays flat. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from geoseg.models.store import load_model, normalize


def starts(size: int, tile: int, stride: int) -> list[int]:
    """Window offsets along one axis: every ``stride``, the last one ending at ``size``."""
    if size <= tile:
        return [0]
    offsets = list(range(0, size - tile, stride))
    return [*offsets, size - tile]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    card, model, _ = load_model(args.model)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    start = time.perf_counter()
    with rasterio.open(args.image) as src:
        profile = {
            "driver": "GTiff",
            "width": src.width,
            "height": src.height,
            "count": 1,
            "dtype": "uint8",
            "crs": src.crs,
            "transform": src.transform,
            "tiled": True,
            "blockxsize": 512,
            "blockysize": 512,
            "compress": "DEFLATE",
        }
        tile, stride = args.tile, args.tile - args.overlap
        windows = [
            Window(col, row, min(tile, src.width), min(tile, src.height))
            for row in starts(src.height, tile, stride)
            for col in starts(src.width, tile, stride)
        ]
        with rasterio.open(args.out, "w", **profile) as dst, torch.inference_mode():
            for i in range(0, len(windows), args.batch):
                batch = windows[i : i + args.batch]
                x = torch.from_numpy(np.stack([src.read(window=w) for w in batch]))
                x = normalize(x, card).contiguous(memory_format=torch.channels_last)
                classes = model(x).argmax(1).to(torch.uint8).numpy()
                for window, mask in zip(batch, classes, strict=True):
                    dst.write(mask[None], window=window)
    print(
        json.dumps(
            {
                "tool": "rasterio + torch loop",
                "mask": str(args.out),
                "wall_s": time.perf_counter() - start,
                "windows": len(windows),
            }
        )
    )


if __name__ == "__main__":
    main()
