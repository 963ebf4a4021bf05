"""CRF quality and cost on real labelled data, with and without the CRF, in one run.

Usage: python -m benchmarks.crf_quality [--steps 400] [--out benchmarks/out/crf]

Sentinel-2 Slovenia (10 m, dense land-cover labels ``lulc.tif``): the Dynamic World port,
imported from ../shared/data/models/dynamicworld, on the cloud-free scenes 2-4, its classes mapped
to the labels' (crops -> cultivated, trees -> forest, grass -> grassland, shrub_and_scrub ->
shrubland, built -> artificial; anything else counts as wrong).

New Brunswick aerial tiles (0.5 m RGB, polygons ``Niveau_2``): a U-Net is trained on tile 2 with
``geoseg.training.fit`` and evaluated on tile 1 (never seen), through the real pipeline
(``geoseg.engine.job.segment``), without CRF, with the local CRF, and with the dense reference
CRF (when pydensecrf2 is installed). Prints mIoU, overall accuracy and boundary F1 (2 px), CRF
seconds per megapixel next to the model's, and the dense / local time ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
import torch

from geoseg.engine.job import segment
from geoseg.engine.scene import SegmentOptions
from geoseg.metrics import Scores, score
from geoseg.models.dynamicworld import import_dynamicworld
from geoseg.models.store import init_model, load_model, save_model
from geoseg.training import fit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import AERIAL, AERIAL_CLASSES, rasterize_aerial_labels  # noqa: E402

TRAIN, TEST = "23322E759967N_clipped_1m_2of2", "23322E759967N_clipped_1m_1of2"
SLOVENIA = ROOT.parent / "shared" / "data" / "sentinel2-l1c-slovenia"
DYNAMICWORLD = ROOT.parent / "shared" / "data" / "models" / "dynamicworld" / "forward"
# lulc.tif ids -> evaluation ids; Dynamic World ids -> the same ids (5 = no counterpart).
LULC_TO_EVAL = {1: 0, 2: 1, 3: 2, 4: 3, 8: 4}
DW_TO_EVAL = {4: 0, 1: 1, 2: 2, 5: 3, 6: 4}
EVAL_CLASSES = 6


def _remap(values: np.ndarray, mapping: dict[int, int], default: int) -> np.ndarray:
    table = np.full(256, default, dtype=np.uint8)
    for src, dst in mapping.items():
        table[src] = dst
    return table[values]


def slovenia(out: Path) -> list[dict[str, object]]:
    """Dynamic World on the labelled Slovenia scenes, with and without the CRF."""
    model_dir = out / "dynamicworld"
    import_dynamicworld(DYNAMICWORLD, model_dir, overwrite=True)
    with rasterio.open(SLOVENIA / "lulc.tif") as src:
        labels = _remap(src.read(1), LULC_TO_EVAL, 255)
    scenes = [str(SLOVENIA / f"scene_{i}.tif") for i in (2, 3, 4)]
    rows: list[dict[str, object]] = []
    for name, crf in (("no CRF", False), ("local CRF", True)):
        run_dir = out / f"slovenia-{name.split()[0]}"
        options = SegmentOptions(crf=crf, polygons=False, progress=False, overwrite=True)
        results = segment(scenes, model_dir, run_dir, options)
        confusion = np.zeros((EVAL_CLASSES, EVAL_CLASSES), dtype=np.int64)
        bp, br = [], []
        for result in results:
            with rasterio.open(run_dir / str(result.name) / "mask.tif") as src:
                pred = _remap(src.read(1), DW_TO_EVAL, 5)
            s = score(pred, labels, EVAL_CLASSES, ignore=255)
            confusion += s.confusion
            bp.append(s.boundary_precision)
            br.append(s.boundary_recall)
        total = Scores(confusion, float(np.mean(bp)), float(np.mean(br)))
        rows.append({"variant": f"Dynamic World, {name}", "miou": total.miou,
                     "overall_accuracy": total.overall_accuracy,
                     "boundary_f1_2px": total.boundary_f1})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "crf")
    args = parser.parse_args()
    out: Path = args.out
    torch.set_num_threads(2)

    model_dir = out / "model"
    init_model(
        "unet", ["red", "green", "blue"], AERIAL_CLASSES, model_dir, overwrite=True,
        arch_args={"depth": 3, "base_channels": 16}, tile_size=256, overlap=64,
    )  # fmt: skip
    card, model, _ = load_model(model_dir)
    with rasterio.open(AERIAL / f"{TRAIN}.tif") as src:
        image = src.read()
    t0 = time.perf_counter()
    fit(model, card, image, rasterize_aerial_labels(AERIAL / f"{TRAIN}.tif"),
                 steps=args.steps, crop=96, batch_size=8)  # fmt: skip
    train_s = time.perf_counter() - t0
    save_model(model, card, model_dir, overwrite=True)

    labels = rasterize_aerial_labels(AERIAL / f"{TEST}.tif")
    variants: dict[str, SegmentOptions] = {
        "no CRF": SegmentOptions(crf=False, polygons=False, progress=False, overwrite=True),
        "local CRF": SegmentOptions(crf=True, polygons=False, progress=False, overwrite=True),
    }
    try:
        import pydensecrf  # noqa: F401

        variants["dense CRF (reference)"] = SegmentOptions(
            crf=True, crf_backend="dense", polygons=False, progress=False, overwrite=True
        )
    except ImportError:
        print("pydensecrf2 not installed: dense reference skipped (pip install geoseg[crf-dense])")
    rows = []
    for name, options in variants.items():
        run_dir = out / name.split()[0]
        result = segment([str(AERIAL / f"{TEST}.tif")], model_dir, run_dir, options)[0]
        with rasterio.open(run_dir / TEST / "mask.tif") as src:
            pred = src.read(1)
        s = score(pred, labels, len(AERIAL_CLASSES), ignore=255, nodata=255)
        mp = pred.size / 1e6
        rows.append({
            "variant": name, "miou": s.miou, "overall_accuracy": s.overall_accuracy,
            "boundary_f1_2px": s.boundary_f1, "boundary_precision": s.boundary_precision,
            "boundary_recall": s.boundary_recall,
            "model_s_per_mp": result.timings_s["infer_s"] / mp,
            "crf_s_per_mp": result.timings_s.get("crf_s", 0.0) / mp,
        })  # fmt: skip
    majority = np.bincount(labels[labels != 255]).argmax()
    baseline = score(np.full_like(labels, majority), labels, len(AERIAL_CLASSES), ignore=255)
    print(f"\nU-Net (depth 3, base 16) trained {args.steps} steps in {train_s:.0f} s on {TRAIN};")
    labelled = int((labels != 255).sum())
    print(f"evaluated on {TEST} ({labels.shape[1]}x{labels.shape[0]} px, {labelled} labelled); "
          f"majority-class mIoU {baseline.miou:.3f}\n")  # fmt: skip
    print("| variant | mIoU | OA | boundary F1 (2 px) | BF precision | BF recall | "
          "model s/MP | CRF s/MP |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['miou']:.3f} | {r['overall_accuracy']:.3f} | "
              f"{r['boundary_f1_2px']:.3f} | {r['boundary_precision']:.3f} | "
              f"{r['boundary_recall']:.3f} | {r['model_s_per_mp']:.2f} | "
              f"{r['crf_s_per_mp']:.2f} |")  # fmt: skip
    local = next(r for r in rows if r["variant"] == "local CRF")
    dense = next((r for r in rows if r["variant"].startswith("dense")), None)
    ratio = local["crf_s_per_mp"] / local["model_s_per_mp"]
    print(f"\nlocal CRF time / model forward time: {ratio:.2f}")
    if dense:
        print(f"dense / local CRF time: {dense['crf_s_per_mp'] / local['crf_s_per_mp']:.2f}")
    print("\nSentinel-2 Slovenia scenes 2-4 (10 m, dense labels), Dynamic World port:\n")
    print("| variant | mIoU | OA | boundary F1 (2 px) |")
    print("|---|---|---|---|")
    for r in slovenia(out):
        print(f"| {r['variant']} | {r['miou']:.3f} | {r['overall_accuracy']:.3f} | "
              f"{r['boundary_f1_2px']:.3f} |")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"baseline_miou": baseline.miou, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
