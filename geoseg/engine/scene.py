"""Segmenting scenes: tiles out to the model actors, probabilities back, stitched and written.

Per scene: validate the input against the card, lay the tile grid, keep at most
``tiles_in_flight`` batches between reading and stitching (backpressure), turn each finished block
of blended probabilities into class ids and confidence, stream them to the COG writer, polygonise
the finished mask strip by strip, and commit the scene's folder atomically.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from numpy.typing import NDArray
from tqdm import tqdm

from geoseg.engine.actors import SegmentationWorker, read_batch
from geoseg.engine.runtime import cluster_cpus, cluster_gpus
from geoseg.errors import ConfigError
from geoseg.io.cog import ClassRasterWriter, mask_dtype
from geoseg.io.outputs import SceneOutput, read_mask_strips, scene_output_name
from geoseg.io.rasters import SceneInfo, open_scene
from geoseg.io.vectors import write_polygons
from geoseg.measure import ground_areas_m2
from geoseg.models.card import ModelCard
from geoseg.tiling.blend import Block, Stitcher
from geoseg.tiling.grid import Tile, TileGrid
from geoseg.vectorize import StripPolygonizer

log = logging.getLogger(__name__)

POLYGON_STRIP_ROWS = 512


@dataclass(frozen=True)
class SegmentOptions:
    """Everything that shapes a segmentation run (recorded in ``run.json``)."""

    tile_size: int | None = None  # None: the card's recommendation
    overlap: int | None = None
    batch_size: int = 4
    workers: int | None = None  # None: one per GPU, else one
    device: str = "auto"
    precision: str = "fp32"
    tiles_in_flight: int | None = (
        None  # batches between reading and stitching; None: 2 per worker + 1
    )
    confidence: bool = True
    polygons: bool = True
    overwrite: bool = False
    band_names: tuple[str, ...] | None = None
    progress: bool = True

    def grid_for(self, card: ModelCard, height: int, width: int) -> TileGrid:
        return TileGrid(
            height=height,
            width=width,
            tile_size=self.tile_size or card.tile_size,
            overlap=card.overlap if self.overlap is None else self.overlap,
            align=card.total_stride,
        )


@dataclass
class SceneResult:
    uri: str
    name: str | None
    status: str  # "ok" | "failed"
    error: str | None = None
    error_type: str | None = None
    height: int | None = None
    width: int | None = None
    tiles: int = 0
    tiles_skipped_nodata: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)
    class_pixels: dict[str, int] = field(default_factory=dict)
    polygons: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class WorkerPool:
    """Model actors, on GPUs when the cluster has any; restarted, tiles retried, on failure."""

    def __init__(self, model_dir: Path, options: SegmentOptions) -> None:
        gpus = cluster_gpus()
        use_gpu = options.device in ("auto", "cuda") and gpus >= 1
        if options.device == "cuda" and not use_gpu:
            raise ConfigError("--device cuda was requested but the Ray cluster has no GPU")
        count = options.workers or (int(gpus) if use_gpu else 1)
        cpus = cluster_cpus()
        # Fractional CPUs: actors holding whole CPUs would starve the read tasks (Ray then waits
        # forever). Torch threads share the machine's cores between the actors instead.
        threads = 0 if use_gpu else max(1, int(cpus // count))
        actor_cls = ray.remote(SegmentationWorker).options(
            num_cpus=0.5 if not use_gpu else 0.25,
            num_gpus=1 if use_gpu else 0,
            max_restarts=3,
            max_task_retries=3,
        )
        self.actors: list[Any] = [
            actor_cls.remote(  # type: ignore[attr-defined]
                str(model_dir), "cuda" if use_gpu else options.device, options.precision, threads
            )
            for _ in range(count)
        ]
        self.info = ray.get([a.ready.remote() for a in self.actors])
        self._load = [0] * count

    def submit(self, batch_ref: ray.ObjectRef[Any]) -> tuple[ray.ObjectRef[Any], int]:
        index = min(range(len(self.actors)), key=self._load.__getitem__)
        self._load[index] += 1
        return self.actors[index].predict.remote(batch_ref), index

    def done(self, index: int) -> None:
        self._load[index] -= 1

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


def blocks_to_classes(
    block: Block, nodata: int, dtype: str
) -> tuple[NDArray[np.integer], NDArray[np.uint8]]:
    """Class ids (nodata where not valid) and confidence ``round(255 x max prob)`` of a block.

    A running maximum over the class planes: the same first-maximum rule as ``argmax(axis=0)``,
    about twice as fast on a (classes, rows, cols) array, and it yields the maximum for free.
    """
    probs = block.probs
    best = probs[0].copy()
    ids = np.zeros(best.shape, dtype=dtype)
    for class_id in range(1, probs.shape[0]):
        np.copyto(ids, class_id, where=probs[class_id] > best, casting="unsafe")
        np.maximum(best, probs[class_id], out=best)
    ids[~block.valid] = nodata
    confidence = np.clip(np.rint(best * 255), 1, 255).astype(np.uint8)
    confidence[~block.valid] = 0
    return ids, confidence


def _chunks(tiles: list[Tile], size: int) -> list[list[Tile]]:
    return [tiles[i : i + size] for i in range(0, len(tiles), size)]


def _stitch_and_write(
    scene: SceneInfo,
    card: ModelCard,
    grid: TileGrid,
    pool: WorkerPool,
    writer: ClassRasterWriter,
    options: SegmentOptions,
    result: SceneResult,
) -> None:
    stitcher = Stitcher(grid, card.num_classes)
    dtype, nodata = mask_dtype(card.num_classes)
    batches = _chunks(grid.tiles(), options.batch_size)
    in_flight_max = options.tiles_in_flight or 2 * len(pool.actors) + 1
    pending: dict[ray.ObjectRef[Any], tuple[list[Tile], int]] = {}
    empty: NDArray[np.float16] | None = None
    timings = {"read_s": 0.0, "infer_s": 0.0, "stitch_s": 0.0, "wait_s": 0.0}
    progress = tqdm(
        total=len(grid),
        desc=result.name,
        unit="tile",
        disable=not (options.progress and sys.stderr.isatty()),
        leave=False,
    )
    next_batch = 0
    try:
        while next_batch < len(batches) or pending:
            while next_batch < len(batches) and len(pending) < in_flight_max:
                tiles = batches[next_batch]
                ref, actor = pool.submit(read_batch.remote(scene, tiles))
                pending[ref] = (tiles, actor)
                next_batch += 1
            t0 = time.perf_counter()
            ready, _ = ray.wait(list(pending), num_returns=1)
            tiles, actor = pending.pop(ready[0])
            pool.done(actor)
            probs, valid, stats = ray.get(ready[0])
            t1 = time.perf_counter()
            for key in ("read_s", "infer_s"):
                timings[key] += stats[key]
            result.tiles_skipped_nodata += int(stats["tiles_skipped"])
            for i, tile in enumerate(tiles):
                if probs is None:
                    if empty is None:
                        empty = np.zeros((card.num_classes, tile.height, tile.width), np.float16)
                    tile_probs = empty
                else:
                    tile_probs = probs[i]
                for block in stitcher.add(tile, tile_probs, valid[i]):
                    ids, confidence = blocks_to_classes(block, nodata, dtype)
                    writer.write(block.row_off, block.col_off, ids, confidence)
            progress.update(len(tiles))
            timings["wait_s"] += t1 - t0
            timings["stitch_s"] += time.perf_counter() - t1
    finally:
        progress.close()
        for ref in pending:
            ray.cancel(ref)
    result.timings_s.update(timings)


def _polygonize(out_dir: Path, scene: SceneInfo, card: ModelCard, nodata: int) -> int:
    polygonizer = StripPolygonizer(scene.transform, scene.width, scene.height, nodata)
    regions = []
    for row_off, strip in read_mask_strips(out_dir / "mask.tif", POLYGON_STRIP_ROWS):
        regions.extend(polygonizer.add_strip(row_off, strip))
    regions.extend(polygonizer.finish())
    # Sorted top-left first so feature order is stable across runs and strip sizes.
    regions.sort(key=lambda r: (-r.geometry.bounds[3], r.geometry.bounds[0], r.class_id))
    geometries = [r.geometry for r in regions]
    write_polygons(
        out_dir / "polygons.gpkg",
        [r.class_id for r in regions],
        geometries,
        ground_areas_m2(geometries, scene.crs_wkt).tolist(),
        card.classes,
        scene.crs_wkt,
    )
    return len(regions)


def segment_scene(
    uri: str,
    card: ModelCard,
    pool: WorkerPool,
    out_root: Path,
    options: SegmentOptions,
    name: str | None = None,
) -> SceneResult:
    """Segment one scene into ``out_root/<name>/``; failures are returned, never raised."""
    result = SceneResult(uri=uri, name=name, status="failed")
    start = time.perf_counter()
    output: SceneOutput | None = None
    writer: ClassRasterWriter | None = None
    try:
        result.name = name or scene_output_name(uri)
        output = SceneOutput(out_root, result.name, options.overwrite)
        scene = open_scene(uri, card, list(options.band_names) if options.band_names else None)
        result.height, result.width = scene.height, scene.width
        grid = options.grid_for(card, scene.height, scene.width)
        result.tiles = len(grid)
        writer = ClassRasterWriter(output.tmp, scene, card.classes, options.confidence)
        _stitch_and_write(scene, card, grid, pool, writer, options, result)
        t0 = time.perf_counter()
        writer.finish()
        result.timings_s["cog_s"] = time.perf_counter() - t0
        result.class_pixels = {
            c.name: int(n) for c, n in zip(card.classes, writer.class_pixels, strict=True)
        }
        writer = None
        if options.polygons:
            t0 = time.perf_counter()
            result.polygons = _polygonize(output.tmp, scene, card, mask_dtype(card.num_classes)[1])
            result.timings_s["polygons_s"] = time.perf_counter() - t0
        output.commit()
        output = None
        result.status = "ok"
    except Exception as exc:
        cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause else exc
        result.error = str(cause).strip()
        result.error_type = type(cause).__name__
        log.error("%s: failed: %s", uri, result.error)
        log.debug("traceback", exc_info=True)
    finally:
        if writer is not None:
            writer.close()
        if output is not None:
            output.abort()
        result.timings_s["total_s"] = time.perf_counter() - start
    return result
