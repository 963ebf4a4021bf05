"""Run NRCan's geo-inference 3.2.4 on one GeoTIFF on CPU and print one JSON line.

Standalone: run it with the geo-inference venv's python (built by
``bash benchmarks/make_geoinference_env.sh``); it does not import geoseg::

    benchmarks/out/envs/geoinference/bin/python benchmarks/geoinference_runner.py \\
        --image scene.tif --model model_ts.pt --out-dir out/gi --classes 4 \\
        --tile 512 --overlap 64 --batch 4 --threads 2

The last stdout line is ``{"mask": ..., "wall_s": ..., "tool": "geo-inference", "version":
"3.2.4", "params": {...}}``; everything geo-inference prints (dask progress bar, logs) goes to
stderr. ``wall_s`` times ``GeoInference.__call__`` only (read, tile, infer, blend, write the mask);
imports, ``torch.jit.load`` (``load_s``) and the preflight call are outside it.

What geo-inference does (read from geo_inference/geo_inference.py and geo_dask.py, 3.2.4):

* Input to the model: one patch at a time, a ``torch.Tensor`` of shape ``(1, bands, tile, tile)``
  in the raster's own dtype (``uint8`` for a uint8 GeoTIFF), raw pixel values, no cast to float,
  no scaling, no normalisation. Bands: all of them in file order, or ``--bands`` (1-based, picked
  and reordered). The TorchScript model must therefore do ``x.float()`` and its own
  normalisation (e.g. ``(x - mean) / std``) inside ``forward``. Pixels of the zero padding at the
  right/bottom edges reach the model as 0.
* Model output: ``(1, classes, tile, tile)``, same H x W as the input. Logits or probabilities
  both work for ``classes > 1`` (the blend is a weighted mean of the raw outputs, then argmax).
  With ``classes == 1`` the blended output is thresholded at ``--threshold`` (default 0.3), so
  the model must output a probability. An output of any other spatial size is silently replaced
  by zeros (class 0); an exception in the model (e.g. a conv fed uint8) is logged per patch and
  the run then dies with an unrelated ``TypeError``. The preflight below (one call on a zero
  patch of the raster's dtype, untimed) reports both clearly before the timed run.
* Tiling: a dask array chunked into ``tile/2`` squares (zero-padded to a multiple of ``tile/2``);
  each chunk plus its right and bottom neighbours forms one ``tile x tile`` patch, so the stride
  is always ``tile/2`` (50 % overlap, ~4x the scene pixels go through the model). The overlap is
  not configurable: ``--overlap`` is recorded but geo-inference's effective overlap is
  ``tile/2``. ``--tile`` maps to ``patch_size`` (must be even).
* Blending: each output patch is multiplied by a 2-D Hann window (flattened to 1 at the image
  borders), windows and weighted outputs are summed over the overlapping patches, divided, then
  ``argmax`` -> uint8 class ids.
* Batching: none; the model is called with batch 1. ``--batch`` is recorded and ignored.
  Parallelism: dask's threaded scheduler with ``--workers`` threads (geo-inference's own default
  is cores - 1) each calling the model; ``--threads`` is ``torch.set_num_threads``.
* No-data: the raster's nodata, or 0 when it has none (NaN for float rasters). A pixel where
  *any* band equals it gets 255 in the mask (the mask's nodata); patches entirely of nodata are
  skipped.
* Output: ``<out-dir>/<image stem>_mask_<6 hex>.tif`` (a new random suffix each run), 1 band
  uint8, CRS and transform of the input, nodata 255, tiled 256 x 256, uncompressed (its
  ``compress=lzw``/``BIGTIFF`` profile ends up as TIFF metadata tags only). No probabilities
  are written. Polygons (GeoJSON), YOLO and COCO are written only when asked (``mask_to_vec``,
  off by default); this runner never asks.
* Memory: a lazy dask graph (threaded scheduler, no distributed cluster) written to the GeoTIFF
  block by block (``rio.to_raster`` with a lock), so neither the image nor the class-score cube is
  materialised at once; but each patch result is a float64 ``(classes + 1, tile, tile)`` array and
  dask keeps many alive between the two overlap passes: peak RSS was 1.3 GiB for a 2048^2 scene
  and 3.3 GiB for 10000^2 (4 classes, ~1.1 GiB of it torch and imports).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

TOOL_VERSION = "3.2.4"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", type=Path, required=True, help="input GeoTIFF")
    p.add_argument("--model", type=Path, required=True, help="TorchScript model (.pt)")
    p.add_argument("--out-dir", type=Path, required=True, help="geo-inference work_dir")
    p.add_argument("--classes", type=int, required=True, help="number of model output channels")
    p.add_argument("--tile", type=int, default=512, help="patch_size (even); stride is tile/2")
    p.add_argument("--overlap", type=int, default=64, help="recorded only: overlap is tile/2")
    p.add_argument("--batch", type=int, default=4, help="recorded only: geo-inference uses 1")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--workers", type=int, default=1, help="dask threads calling the model")
    p.add_argument("--bands", default="", help="1-based bands, e.g. '1,2,3' (default: all)")
    p.add_argument("--threshold", type=float, default=0.3, help="used when --classes 1")
    p.add_argument("--no-preflight", action="store_true", help="skip the model shape check")
    return p.parse_args(argv)


def preflight(model: Any, image: Path, bands: list[str], tile: int, classes: int) -> None:
    """Call the model once the way geo-inference will; fail loudly where it would stay silent."""
    import numpy as np
    import rasterio
    import torch

    with rasterio.open(image) as src:
        count = len(bands) if bands else src.count
        dtype = np.dtype(src.dtypes[0])
    x = torch.as_tensor(np.zeros((1, count, tile, tile), dtype=dtype))
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        raise SystemExit(
            f"model fails on a raw {dtype} (1, {count}, {tile}, {tile}) tensor, as "
            f"geo-inference feeds it (cast/normalise inside the model): {e}"
        ) from e
    want = (1, classes, tile, tile)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SystemExit(
            f"model returns {got} for a {dtype} (1, {count}, {tile}, {tile}) input; "
            f"geo-inference needs a tensor of shape {want}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tile % 2:
        raise SystemExit("--tile must be even (geo-inference strides by tile/2)")
    bands = [b.strip() for b in args.bands.split(",") if b.strip()]
    args.out_dir.mkdir(parents=True, exist_ok=True)

    # geo-inference prints to stdout (dask worker count, progress bar): keep stdout for the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        import torch

        torch.set_num_threads(args.threads)
        from geo_inference.geo_inference import GeoInference

        t0 = time.perf_counter()
        gi = GeoInference(
            model=str(args.model),
            work_dir=str(args.out_dir),
            mask_to_vec=False,
            device="cpu",
            num_classes=args.classes,
            prediction_threshold=args.threshold,
        )
        load_s = time.perf_counter() - t0
        if not args.no_preflight:
            preflight(gi.model, args.image, bands, args.tile, args.classes)

        t0 = time.perf_counter()
        name = gi(
            inference_input=str(args.image),
            bands_requested=bands,
            patch_size=args.tile,
            workers=args.workers,
        )
        wall_s = time.perf_counter() - t0

    mask = (args.out_dir / str(name)).resolve()
    if not mask.is_file():
        raise SystemExit(f"geo-inference returned {name!r} but {mask} does not exist")
    result = {
        "mask": str(mask),
        "wall_s": round(wall_s, 3),
        "tool": "geo-inference",
        "version": TOOL_VERSION,
        "params": {
            "patch_size": args.tile,
            "stride": args.tile // 2,
            "effective_overlap": args.tile // 2,
            "requested_overlap": args.overlap,
            "effective_batch": 1,
            "requested_batch": args.batch,
            "torch_threads": args.threads,
            "dask_workers": args.workers,
            "classes": args.classes,
            "bands": bands or "all",
            "device": "cpu",
            "blend": "hann-window weighted mean, argmax",
            "load_s": round(load_s, 3),
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "torch": torch.__version__,
        },
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
