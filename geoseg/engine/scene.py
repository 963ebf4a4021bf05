"""Segmenting scenes: tiles out to the model actors, blended there, stitched and written.

Per scene: validate the input against the card, lay the tile grid, send its tiles to the actors in
batches (each blended there in runs of one tile row), keep at most ``tiles_in_flight`` of them
between reading and stitching (backpressure), write what each run finished (class ids and
confidence, made by the actor), add the frames the runs share, classify each cell they finish, and
stream it all to the COG writer (:func:`infer_scene`); then convert to COGs, polygonise the finished
mask strip by strip, and commit the scene's folder atomically (:meth:`PendingScene.finish`), on a
background thread while the next scene is inferred (:class:`SceneOverlap`).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import ray
from numpy.typing import NDArray
from tqdm import tqdm

from geoseg.crf import CRFParams
from geoseg.engine.model_actor import ModelActor
from geoseg.engine.reads import read_batch, read_rows
from geoseg.engine.runtime import cluster_cpus, cluster_gpus, embedded, stop_ray
from geoseg.errors import ConfigError
from geoseg.io.cog import ClassRasterWriter, mask_dtype
from geoseg.io.outputs import SceneOutput, scene_output_name
from geoseg.io.rasters import SceneInfo, open_scene
from geoseg.io.vectors import (
    Provenance,
    complete_classes,
    write_polygons,
)
from geoseg.measure import Quantity, pixel_area_m2
from geoseg.models.card import ModelCard, read_card
from geoseg.tiling.bands import BandAssembler
from geoseg.tiling.blend import Block, Stitcher, classes_and_confidence
from geoseg.tiling.grid import Tile, TileGrid
from geoseg.vectorize import CoverageOptions, PolygonLayer, vectorize_strips

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class SegmentOptions:
    """Everything that shapes a segmentation run (recorded in ``run.json``)."""

    tile_size: int | None = None  # None: the card's recommendation
    overlap: int | None = None
    batch_size: int = 4
    workers: int | None = None  # None: one per GPU, else one
    streams: int | None = None  # passes per actor at once; None: 2 on >= 2 CPU cores, else 1
    gpus_per_worker: float = 1.0
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    tiles_in_flight: int | None = (
        None  # batches between reading and stitching; None: 2 per stream + 1
    )
    confidence: bool = True
    polygons: bool = True
    overwrite: bool = False
    band_names: tuple[str, ...] | None = None
    progress: bool = True
    # CRF (geoseg.crf): None follows the card's recommendation; crf_params override the card's
    # parameters; "dense" is the fully connected reference (pydensecrf2), whole scene at once.
    crf: bool | None = None
    crf_params: dict[str, float] = field(default_factory=dict)
    crf_backend: str = "local"
    crf_band_rows: int = 256
    # Polygons (see geoseg.vectorize.CoverageOptions): minimum mapping unit, hole filling and
    # topology-preserving simplification, all off by default; output formats (io.vectors.FORMATS).
    min_area: Quantity | None = None
    fill_holes_below: Quantity | None = None
    simplify: Quantity | None = None
    vector_formats: tuple[str, ...] = ("gpkg",)

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
    pixel_area_m2: float | None = None  # None in a geographic CRS
    band_indexes: tuple[int, ...] | None = None  # 1-based file bands feeding the card's bands
    # Wall clock (UTC, ISO 8601): the first tile's start, the commit (or failure). A scene's
    # finishing overlaps the next one's tiles, so these can interleave.
    started: str | None = None
    finished: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """The log line of a committed scene."""
        mp = (self.height or 0) * (self.width or 0) / 1e6
        return (
            f"{self.uri}: ok, {self.tiles} tiles, {mp:.2f} MP in "
            f"{self.timings_s['total_s']:.1f} s, {self.polygons} polygons"
        )


def gpu_share(gpus: float, workers: int, gpus_per_worker: float) -> float:
    """GPUs each of ``workers`` model actors asks a fixed-size Ray for: ``gpus_per_worker``,
    shrunk to ``gpus / workers`` when the ``gpus`` there cannot hold them all at once.

    Ray waits without an error for resources that no node has (an autoscaler may add them), so
    ``--workers 2`` on a one-GPU machine would hang; shrunk, the actors share the GPU.
    """
    if workers * gpus_per_worker <= gpus:
        return gpus_per_worker
    share = gpus / workers
    # Ray accepts a fraction of one GPU, or whole GPUs: an actor cannot straddle two.
    return share if share <= 1 else float(math.floor(share))


def default_streams(cores_per_actor: int, use_gpu: bool) -> int:
    """Forward passes an actor runs at once when not told, each on cores / streams threads.

    On CPU cores, two passes of half the threads lose less to the reading, blending and writing
    beside them than one (every thread of a pass waits at each layer for the one that lost its
    core): on 2 cores a 10k² scene took 72-74 s instead of 78-80 (default U-Net, bf16
    compiled), the small U-Net 12-17% less time compiled, 13-15% eager fp32. A GPU runs one.
    """
    return 2 if not use_gpu and cores_per_actor >= 2 else 1


MIN_CPU_SHARE = 0.05


def cpu_shares(cpus: float, actors: int, use_gpu: bool) -> tuple[float, float]:
    """Ray CPUs each model actor and each read task asks for, on a cluster of ``cpus``.

    Actors: ``min(0.5 (0.25 on GPUs), cpus / (2 actors))``. Fractional, because actors holding
    whole CPUs would leave none to the read tasks and Ray would wait forever; at most half the
    cluster, so that even many actors on few cores leave room to read. Torch threads, not Ray's
    accounting, share the cores between the actors.

    Reads: ``min(1, cpus - actors' share)``: one at a time on a small machine (2 cores), one per
    CPU beyond the actors' on a larger one. A read takes ~0.03 s a batch against a stream's
    ~0.5-1 s, so one keeps a 2-core machine's streams fed. A tenth of a CPU each let Ray start a
    worker process (~170 MiB) for every batch in flight at a scene's start (5 with 2 streams);
    two at a time (0.75 each) kept a second worker, idle between reads, which Ray killed and
    started again every few seconds, or (kept) which added ~100 MiB of tree RSS to a 40k²
    scene. One CPU at most: a task asking for more than a node has would never start. Neither
    below 0.05: on a cluster that has no CPU yet (an autoscaler's head), both wait for one.
    """
    actor = max(MIN_CPU_SHARE, min(0.25 if use_gpu else 0.5, cpus / (2 * actors)))
    read = max(MIN_CPU_SHARE, min(1.0, cpus - actors * actor))
    return actor, read


class WorkerPool:
    """Model actors, on GPUs when the cluster has any; restarted, tiles retried, on failure."""

    def __init__(self, model_dir: Path, options: SegmentOptions) -> None:
        read_card(model_dir).check_precision(options.precision)
        gpus = cluster_gpus()
        use_gpu = options.device in ("auto", "cuda") and gpus >= 1
        if options.device == "cuda" and not use_gpu:
            raise ConfigError("--device cuda was requested but the Ray cluster has no GPU")
        if options.precision == "fp16" and not use_gpu:
            raise ConfigError("--precision fp16 needs a GPU and the Ray cluster has none: use bf16")
        count = options.workers or (max(1, int(gpus // options.gpus_per_worker)) if use_gpu else 1)
        gpus_each = 0.0
        if use_gpu:
            gpus_each = options.gpus_per_worker
            if embedded():
                gpus_each = gpu_share(gpus, count, options.gpus_per_worker)
            elif count * gpus_each > gpus:
                log.warning(
                    "%d model actors of %g GPU each need more than the %g GPU(s) the cluster has "
                    "now: the run waits for its autoscaler to add them",
                    count, gpus_each, gpus,
                )  # fmt: skip
        cpus = cluster_cpus()
        cores_per_actor = max(1, int(cpus // count))
        self.streams = options.streams or default_streams(cores_per_actor, use_gpu)
        threads = 0 if use_gpu else max(1, cores_per_actor // self.streams)
        actor_cpus, read_cpus = cpu_shares(cpus, count, use_gpu)
        # The scene's read tasks: tiles for the model, rows for the CRF's features.
        self.read_batch = read_batch.options(num_cpus=read_cpus)
        self.read_rows = read_rows.options(num_cpus=read_cpus)
        actor_cls = ray.remote(ModelActor).options(
            num_cpus=actor_cpus,
            num_gpus=gpus_each,
            max_concurrency=self.streams,
            max_restarts=3,
            max_task_retries=3,
        )
        self.actors: list[Any] = [
            actor_cls.remote(  # type: ignore[attr-defined]
                str(model_dir),
                "cuda" if use_gpu else options.device,
                options.precision,
                threads,
                options.compile,
                options.batch_size,
                self.streams,
            )
            for _ in range(count)
        ]
        self.info = [
            {**info, "streams": self.streams}
            for info in ray.get([a.ready.remote() for a in self.actors])
        ]
        self._load = [0] * count

    def call(self, method: str, *args: Any) -> tuple[ray.ObjectRef[Any], int]:
        """Call ``method`` on the least loaded actor; give its index back to :meth:`done`."""
        index = min(range(len(self.actors)), key=self._load.__getitem__)
        self._load[index] += 1
        return getattr(self.actors[index], method).remote(*args), index

    def done(self, index: int) -> None:
        self._load[index] -= 1

    def shutdown(self) -> None:
        """Kill the actors (again: nothing)."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def release(self) -> None:
        """Stop the actors and Ray once a job's last tile is in, when the process exits after the
        job (the ``geoseg`` command): the last scene's COGs and polygons need neither, and Ray's
        teardown (~1 s: its gRPC threads, its processes) then runs beside them instead of after.
        A library caller keeps both for its next job."""
        self.shutdown()
        stop_ray()


def resolve_crf(card: ModelCard, options: SegmentOptions) -> CRFParams | None:
    """The CRF parameters in force (card's, overridden by the options), or None when off."""
    enabled = card.crf.recommended if options.crf is None else options.crf
    if not enabled:
        return None
    if options.crf_backend not in ("local", "dense"):
        raise ConfigError(f"--crf-backend must be local or dense, got {options.crf_backend!r}")
    merged = {**card.crf.params, **options.crf_params}
    known = set(CRFParams.__dataclass_fields__)
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ConfigError(f"unknown CRF parameters {unknown}; known: {sorted(known)}")
    integers = {"iterations", "window"}
    values: dict[str, Any] = {k: int(v) if k in integers else float(v) for k, v in merged.items()}
    return CRFParams(**values)


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
    crf = resolve_crf(card, options)
    bands: BandAssembler | None = None
    if crf is not None:
        # The dense reference has no window: it must see the whole scene in one band.
        band_rows = scene.height if options.crf_backend == "dense" else options.crf_band_rows
        bands = BandAssembler(scene.height, scene.width, card.num_classes, band_rows, crf.halo)
    refining: dict[ray.ObjectRef[Any], tuple[int, int]] = {}  # CRF calls -> (row_off, actor)

    def collect_refined(block_until_below: int) -> None:
        """Write refined bands that are ready; wait while more than the bound are pending."""
        while refining:
            ready, _ = ray.wait(list(refining), num_returns=1, timeout=0)
            if not ready and len(refining) <= block_until_below:
                return
            if not ready:
                ready, _ = ray.wait(list(refining), num_returns=1)
            row_off, actor = refining.pop(ready[0])
            pool.done(actor)
            ids, confidence, seconds = ray.get(ready[0])
            for key in ("crf_s", "read_s"):
                timings[key] += seconds[key]
            writer.write(row_off, 0, ids, confidence)

    batches = _chunks(grid.tiles(), options.batch_size)
    in_flight_max = options.tiles_in_flight or 2 * len(pool.actors) * pool.streams + 1
    pending: dict[ray.ObjectRef[Any], tuple[list[Tile], int]] = {}
    timings = {
        "read_s": 0.0,
        "infer_s": 0.0,
        "blend_s": 0.0,
        "stitch_s": 0.0,
        "wait_s": 0.0,
        "crf_s": 0.0,
    }
    progress = tqdm(
        total=len(grid),
        desc=result.name,
        unit="tile",
        disable=not (options.progress and sys.stderr.isatty()),
        leave=False,
    )

    def finished(block: Block) -> None:
        if bands is None:
            ids, confidence = classes_and_confidence(block.probs, block.valid, nodata, dtype)
            writer.write(block.row_off, block.col_off, ids, confidence)
            return
        for band in bands.add(block):
            assert crf is not None
            rows_read = pool.read_rows.remote(scene, band.context_row_off, band.probs.shape[1])
            ref, actor = pool.call(
                "refine", band, rows_read, card.crf_feature_indexes(), crf, options.crf_backend
            )
            refining[ref] = (band.row_off, actor)
            collect_refined(block_until_below=2)

    next_batch = 0
    try:
        while next_batch < len(batches) or pending:
            while next_batch < len(batches) and len(pending) < in_flight_max:
                tiles = batches[next_batch]
                read = pool.read_batch.remote(scene, tiles)
                ref, actor = pool.call("predict", grid, tiles, read, bands is None)
                pending[ref] = (tiles, actor)
                next_batch += 1
            t0 = time.perf_counter()
            ready, _ = ray.wait(list(pending), num_returns=1)
            tiles, actor = pending.pop(ready[0])
            pool.done(actor)
            outputs, stats = ray.get(ready[0])
            t1 = time.perf_counter()
            for key in ("read_s", "infer_s", "blend_s"):
                timings[key] += stats[key]
            result.tiles_skipped_nodata += int(stats["tiles_skipped"])
            for run in outputs:
                if run.layout.final is not None:
                    row_off, col_off, _, _ = run.layout.final
                    if bands is None:
                        ids, confidence = run.final
                        writer.write(row_off, col_off, ids.astype(dtype, copy=False), confidence)
                    else:
                        finished(Block(row_off, col_off, *run.final))
                for block in stitcher.add_partial(run.layout, run.partial, run.partial_valid):
                    finished(block)
            progress.update(len(tiles))
            timings["wait_s"] += t1 - t0
            timings["stitch_s"] += time.perf_counter() - t1
        collect_refined(block_until_below=0)
    finally:
        # Tasks still in flight after a failure are left to finish and be dropped (at most
        # tiles_in_flight of them): ray.cancel on queued actor tasks stalled the next scene ~30 s.
        progress.close()
    result.timings_s.update(timings)


class _StreamStoppedError(Exception):
    """The scene failed or was interrupted: its polygon stream gives up."""


class PolygonStream:
    """A scene's polygons, made on a thread while its mask is still being written.

    The mask's writer hands over each finished block row (:data:`geoseg.io.cog.BLOCK` rows, in
    whatever order the tiles finish them); the thread feeds them in row order to
    :func:`geoseg.vectorize.vectorize_strips`, whose result does not depend on where strips
    are cut. Polygonising after the last tile kept a single scene's polygons on one core while
    everything else waited (8.4 s of a 10k² scene on the 2-core VM, 14.6 s on a GPU machine).

    Backpressure: while ``backlog`` block rows wait ready for the thread, the writer waits (a GPU
    streams rows faster than one core polygonises them; the mask must not pile up in memory).
    Rows that arrive ahead of a missing one never make it wait: the missing one needs the writer.
    """

    def __init__(
        self,
        scene: SceneInfo,
        nodata: int,
        options: SegmentOptions,
        with_confidence: bool,
        backlog: int = 4,
    ) -> None:
        self._height = scene.height
        self._received = 0  # rows handed over
        self._backlog = backlog
        self._rows: dict[int, tuple[NDArray[np.integer], NDArray[np.uint8] | None]] = {}
        self._next = 0  # first row the thread has not taken yet
        self._stopped = False
        self._changed = threading.Condition()
        self._layer: PolygonLayer | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run,
            args=(scene, nodata, _coverage(options), with_confidence),
            name="geoseg-polygons",
            daemon=True,  # an interrupted run never waits for it
        )
        self._thread.start()

    def add(
        self, row_off: int, classes: NDArray[np.integer], confidence: NDArray[np.uint8] | None
    ) -> None:
        """Hand over a finished block row (the arrays are the stream's from now on)."""
        with self._changed:
            self._received += len(classes)
            if self._stopped:  # nothing will take it
                return
            self._rows[row_off] = (classes, confidence)
            self._changed.notify_all()
            while self._ready() >= self._backlog and self._thread.is_alive():
                self._changed.wait()

    def result(self) -> PolygonLayer:
        """The polygons, once the last row is in; the thread's error if it failed."""
        if self._received < self._height:  # the thread would wait for them forever
            self.stop()
            self._thread.join()
            raise RuntimeError(
                f"only {self._received} of the mask's {self._height} rows reached its polygons"
            )
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._layer is None:
            raise RuntimeError("the polygon stream was stopped before its last row")
        return self._layer

    def stop(self) -> None:
        """Give up (the scene failed): the thread ends without polygons; safe to call again."""
        with self._changed:
            self._stopped = True
            self._rows.clear()
            self._changed.notify_all()

    def _ready(self) -> int:
        row, count = self._next, 0
        while row in self._rows:
            row += len(self._rows[row][0])
            count += 1
        return count

    def _strips(self) -> Iterator[tuple[int, NDArray[np.integer], NDArray[np.uint8] | None]]:
        while self._next < self._height:
            with self._changed:
                while self._next not in self._rows:
                    if self._stopped:
                        raise _StreamStoppedError
                    self._changed.wait()
                row_off = self._next
                classes, confidence = self._rows.pop(row_off)
                self._next += len(classes)
                self._changed.notify_all()
            yield row_off, classes, confidence

    def _run(
        self, scene: SceneInfo, nodata: int, coverage: CoverageOptions, with_confidence: bool
    ) -> None:
        try:
            self._layer = vectorize_strips(
                self._strips(),
                scene.transform,
                scene.width,
                scene.height,
                nodata,
                scene.crs_wkt,
                coverage,
                with_confidence=with_confidence,
            )
        except _StreamStoppedError:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to result(), on the scene's thread
            self._error = exc
        finally:
            with self._changed:
                self._changed.notify_all()  # a writer waiting for room stops waiting


def _coverage(options: SegmentOptions) -> CoverageOptions:
    return CoverageOptions(options.min_area, options.fill_holes_below, options.simplify)


def _write_polygons(
    out_dir: Path,
    scene: SceneInfo,
    card: ModelCard,
    layer: PolygonLayer,
    options: SegmentOptions,
    weights_sha256: str | None = None,
    scene_id: str | None = None,
) -> int:
    """A scene's polygons (its :class:`PolygonStream`'s) in every format, plus ``mask.qml``."""
    provenance = Provenance(
        scene_id=scene_id or scene_output_name(scene.uri),
        model_name=card.name,
        weights_sha256=weights_sha256,
    )
    classes = complete_classes(card.classes, layer.class_ids.tolist())
    write_polygons(out_dir, layer, classes, scene.crs_wkt, provenance, options.vector_formats)
    return len(layer)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _record_failure(result: SceneResult, exc: Exception) -> None:
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause else exc
    result.error = str(cause).strip()
    result.error_type = type(cause).__name__
    log.error("%s: failed: %s", result.uri, result.error)
    log.debug("traceback", exc_info=True)


class PendingScene:
    """A scene whose tiles are all inferred and whose streamed rasters are closed (or that failed).

    What is left, :meth:`finish` (COG conversion, polygons, the atomic commit), needs neither Ray
    nor the model and runs on any thread: :class:`SceneOverlap` runs it while the next scene's
    tiles stream through the actors.
    """

    def __init__(
        self,
        result: SceneResult,
        started: float,
        work: tuple[
            SceneOutput,
            ClassRasterWriter,
            SceneInfo,
            ModelCard,
            SegmentOptions,
            Any,
            PolygonStream | None,
        ]
        | None = None,
    ) -> None:
        self.result = result
        self.started = started
        self._work = work  # None: failed already (the outputs were removed)

    def finish(self, before_commit: Callable[[], None] | None = None) -> SceneResult:
        """COGs, polygons and commit; failures are recorded in the result, never raised.

        ``before_commit`` runs when every output is complete, just before the folder is renamed
        into place: whatever it raises fails the scene (the job runner checks there that the
        input did not change during the run).
        """
        result = self.result
        if self._work is None:
            return result
        output, writer, scene, card, options, weights_sha256, polygons = self._work
        self._work = None
        committed = False
        try:
            t0 = time.perf_counter()
            writer.write_cogs()
            result.timings_s["cog_s"] += time.perf_counter() - t0
            if polygons is not None:
                # What is left of the stream (sieve, hole filling, simplification) and writing.
                t0 = time.perf_counter()
                result.polygons = _write_polygons(
                    output.tmp, scene, card, polygons.result(), options, weights_sha256, result.name
                )
                result.timings_s["polygons_s"] = time.perf_counter() - t0
            if before_commit is not None:
                before_commit()
            output.commit()
            committed = True
            result.status = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure is this scene's, in its result
            _record_failure(result, exc)
        finally:
            if not committed:
                output.abort()
            if polygons is not None:
                polygons.stop()
            result.timings_s["total_s"] = time.perf_counter() - self.started
            result.finished = _now()
        return result


def infer_scene(
    uri: str,
    card: ModelCard,
    pool: WorkerPool,
    out_root: Path,
    options: SegmentOptions,
    name: str | None = None,
    gdal_env: dict[str, str] | None = None,
) -> PendingScene:
    """Stream one scene's tiles through the model into ``out_root/<name>/`` (not yet committed).

    Failures are recorded in the result, never raised: the pending scene then has nothing left to
    do. An interrupt (KeyboardInterrupt) removes the partial outputs and propagates.
    """
    result = SceneResult(uri=uri, name=name, status="failed", started=_now())
    start = time.perf_counter()
    output: SceneOutput | None = None
    writer: ClassRasterWriter | None = None
    polygons: PolygonStream | None = None
    try:
        result.name = name or scene_output_name(uri)
        output = SceneOutput(out_root, result.name, options.overwrite)
        bands = list(options.band_names) if options.band_names else None
        scene = open_scene(uri, card, bands, gdal_env)
        result.height, result.width = scene.height, scene.width
        result.pixel_area_m2 = pixel_area_m2(scene.transform, scene.crs_wkt)
        result.band_indexes = scene.band_indexes
        grid = options.grid_for(card, scene.height, scene.width)
        result.tiles = len(grid)
        if options.polygons:
            nodata = mask_dtype(card.num_classes)[1]
            polygons = PolygonStream(scene, nodata, options, with_confidence=options.confidence)
        writer = ClassRasterWriter(
            output.tmp,
            scene,
            card.classes,
            options.confidence,
            on_block_row=polygons.add if polygons is not None else None,
        )
        _stitch_and_write(scene, card, grid, pool, writer, options, result)
        t0 = time.perf_counter()
        writer.close_streams()
        result.timings_s["cog_s"] = time.perf_counter() - t0
        result.class_pixels = {
            c.name: int(n) for c, n in zip(card.classes, writer.class_pixels, strict=True)
        }
        weights = pool.info[0].get("weights_sha256") if pool.info else None
        pending = PendingScene(
            result, start, (output, writer, scene, card, options, weights, polygons)
        )
        output = writer = polygons = None
        return pending
    except Exception as exc:  # noqa: BLE001 - any failure is this scene's, in its result
        _record_failure(result, exc)
    finally:
        if writer is not None:
            writer.close()
        if output is not None:
            output.abort()
        if polygons is not None:
            polygons.stop()
    result.timings_s["total_s"] = time.perf_counter() - start
    result.finished = _now()
    return PendingScene(result, start)


class SceneOverlap(Generic[T]):
    """Runs the finishing of one scene on a background thread while the caller infers the next.

    A scene's COGs and polygons took 12-17 s of the driver's time on 2 cores (a generated 10k x
    10k scene; 5.6k x 4.3k NAIP mosaics), most of it on one core, while the model actors had
    nothing to do; overlapped, the next scene's tiles use that time (a bucket of 4 NAIP mosaics
    with polygons: 160 -> 142 s).
    ``submit(finish)`` first waits for the scene finishing before (one at a time: one scene's
    polygons in memory), then starts ``finish`` and returns what the one before returned (nothing
    the first time); :meth:`drain` waits for the last. Leaving the ``with`` block waits too, also
    on an interrupt: a scene whose tiles were all inferred is still committed and recorded.
    """

    def __enter__(self) -> SceneOverlap[T]:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="geoseg-finish")
        self._running: Future[T] | None = None
        return self

    def submit(self, finish: Callable[[], T]) -> list[T]:
        done = self.drain()
        self._running = self._executor.submit(finish)
        return done

    def drain(self) -> list[T]:
        if self._running is None:
            return []
        # Forgotten only once it is in hand: an interrupt during the wait leaves it to the
        # caller's next drain (its ``finally``), which records the scene that still commits.
        result = self._running.result()
        self._running = None
        return [result]

    def __exit__(self, *exc_info: object) -> None:
        self._executor.shutdown(wait=True)
