"""A job run: inputs from a config, incremental against the output root's manifest, under its lock.

``run_job`` lists the inputs (local or S3 globs, STAC items) with their identities, skips the
ones the manifest records as committed with the same identity, weights and output config, and
segments the rest on one actor pool. Each scene is built in a local folder (the output root
itself when it is local, a temporary staging folder for ``s3://`` roots), checked once more
against its input's identity, committed (renamed into place / uploaded), and only then recorded
``ok`` in the manifest. At the end, over every committed scene of the output root (not only this
run's): the job-level polygon dataset and mask VRTs, ``run.json`` and the report.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from geoseg.config import GlobInput, JobConfig
from geoseg.engine.job import job_outputs, record_progress, run_provenance
from geoseg.engine.manifest import Manifest, RunLock
from geoseg.engine.runtime import start_ray
from geoseg.engine.scene import (
    PendingScene,
    SceneOverlap,
    SceneResult,
    SegmentOptions,
    WorkerPool,
    infer_scene,
    resolve_crf,
)
from geoseg.errors import (
    GeosegError,
    InputChangedError,
    LockedError,
    OutputExistsError,
    StorageError,
)
from geoseg.io.job_outputs import JobOutputs
from geoseg.io.outputs import scene_output_name, write_json_atomic
from geoseg.io.stac import scenes_from_api, scenes_from_item_collection
from geoseg.io.storage import (
    OutputStore,
    gdal_options,
    gdal_path,
    input_identity,
    is_s3,
    list_inputs,
    open_store,
)
from geoseg.models.card import WEIGHTS_FILE, ModelCard, file_sha256, read_card
from geoseg.report import quicklook, write_report

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
QUICKLOOKS = "quicklooks"
# Files a scene's job-level outputs need when the output root is remote (see _stage_committed).
_JOB_OUTPUT_FILES = ("mask.tif", "polygons.gpkg", "polygons.parquet", "polygons.fgb")
_WILDCARD = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class PlannedInput:
    """One input of the job: its URI as the user wrote it, what GDAL opens, identity, name."""

    uri: str
    path: str
    identity: str
    name: str | None  # None when no safe, unique output name could be made
    check_identity: bool  # re-stat before commit (files and objects; STAC items are not)


def _glob_base(pattern: str) -> str:
    """The part of a glob before its first wildcard, cut back to a ``/``."""
    match = _WILDCARD.search(pattern)
    literal = pattern if match is None else pattern[: match.start()]
    return literal[: literal.rfind("/") + 1]


def _name_from(relative: str) -> str | None:
    """Output name of an input from its path below the glob's base: folders joined by ``_``."""
    try:
        return scene_output_name(relative.replace("/", "_"))
    except GeosegError:
        return None


def plan_inputs(config: JobConfig, vrt_dir: Path) -> list[PlannedInput]:
    """Every input of the config with its identity; names unique (a clash leaves it unnamed)."""
    planned: list[PlannedInput] = []
    for spec in config.inputs:
        if isinstance(spec, GlobInput):
            objects = list_inputs(spec.path, config.storage)
            if not objects:
                log.warning("%s: matches no file", spec.path)
            base = _glob_base(spec.path)
            for obj in objects:
                name = _name_from(obj.uri[len(base) :] if obj.uri.startswith(base) else obj.uri)
                planned.append(PlannedInput(obj.uri, gdal_path(obj.uri), obj.identity, name, True))
            continue
        stac = spec.stac
        if stac.items is not None:
            scenes = scenes_from_item_collection(Path(stac.items), stac.assets, vrt_dir)
        else:
            assert stac.api is not None
            scenes = scenes_from_api(
                stac.api,
                stac.assets,
                vrt_dir,
                collections=stac.collections,
                bbox=stac.bbox,
                datetime=stac.datetime,
                query=stac.query,
                max_items=stac.max_items,
            )
        for scene in scenes:
            planned.append(
                PlannedInput(
                    f"stac:{scene.item_id}",
                    scene.uri,
                    scene.identity,
                    _name_from(scene.name),
                    False,
                )
            )
    seen: set[str] = set()
    unique: list[PlannedInput] = []
    for planned_input in planned:
        clash = planned_input.name is not None and planned_input.name in seen
        if planned_input.name is not None:
            seen.add(planned_input.name)
        unique.append(replace(planned_input, name=None) if clash else planned_input)
    return unique


def segment_options(config: JobConfig, overwrite: bool, progress: bool) -> SegmentOptions:
    min_area, fill_holes_below, simplify = config.outputs.polygons.quantities()
    return SegmentOptions(
        tile_size=config.tiling.tile_size,
        overlap=config.tiling.overlap,
        batch_size=config.tiling.batch_size,
        workers=config.runtime.workers,
        streams=config.runtime.streams,
        gpus_per_worker=config.runtime.gpus_per_worker,
        device=config.runtime.device,
        precision=config.runtime.precision,
        compile=config.runtime.compile,
        tiles_in_flight=config.runtime.tiles_in_flight,
        confidence=config.outputs.confidence,
        polygons=config.outputs.polygons.enabled,
        overwrite=overwrite,
        band_names=tuple(config.bands) if config.bands else None,
        progress=progress,
        crf=config.crf.enabled,
        crf_params=dict(config.crf.params),
        crf_backend=config.crf.backend,
        crf_band_rows=config.crf.band_rows,
        min_area=min_area,
        fill_holes_below=fill_holes_below,
        simplify=simplify,
        vector_formats=tuple(config.outputs.polygons.formats),
    )


@dataclass
class RunSummary:
    """What a run did, for the command line's one-line summary and exit code."""

    new: list[SceneResult]
    unchanged: list[str]
    failed: list[SceneResult]
    run_file: str

    @property
    def line(self) -> str:
        return f"{len(self.new)} new, {len(self.unchanged)} unchanged, {len(self.failed)} failed"


def _failed(uri: str, name: str | None, exc: GeosegError | str, error_type: str) -> SceneResult:
    message = str(exc)
    log.error("%s: failed: %s", uri, message)
    return SceneResult(uri=uri, name=name, status="failed", error=message, error_type=error_type)


def _clean_partials(local_root: Path) -> None:
    """Remove temporary folders a killed run left behind (safe: this run holds the lock)."""
    for path in local_root.glob(".*"):
        if path.is_dir() and (".partial-" in path.name or ".old-" in path.name):
            log.info("removing %s, left by an interrupted run", path)
            shutil.rmtree(path, ignore_errors=True)


def _header(
    config: JobConfig, card: ModelCard, weights_sha256: str, pool: WorkerPool | None
) -> Any:
    crf = resolve_crf(card, segment_options(config, False, False))
    return {
        **run_provenance(datetime.now(UTC)),
        "model": {
            "dir": config.model,
            "card": card.model_dump(mode="json"),
            "weights_sha256": weights_sha256,
        },
        "config": config.model_dump(mode="json"),
        "config_digest": config.output_digest(),
        "workers": None if pool is None else pool.info,
        "crf": None if crf is None else {**asdict(crf), "halo": crf.halo},
        "scenes": [],
    }


class _Run:
    """State of one run (see :func:`run_job`)."""

    def __init__(self, config: JobConfig, store: OutputStore, local_root: Path) -> None:
        self.config = config
        self.store = store
        self.local_root = local_root
        self.remote = is_s3(config.outputs.root)
        self.card = read_card(Path(config.model))
        self.weights_sha256 = file_sha256(Path(config.model) / WEIGHTS_FILE)
        self.digest = config.output_digest()
        self.gdal_env = gdal_options(config.storage)
        self.manifest = Manifest.load(store)

    def publish(self, local_file: Path, key: str) -> None:
        if self.remote:
            self.store.put_file(local_file, key)

    def quicklook(self, item: PlannedInput, name: str, band_indexes: tuple[int, ...]) -> None:
        if not self.config.outputs.quicklooks:
            return
        png = self.local_root / QUICKLOOKS / f"{name}.png"
        png.parent.mkdir(exist_ok=True)
        try:
            quicklook(
                item.path,
                [band_indexes[i] for i in self.card.display_band_indexes()],
                self.local_root / name / "mask.tif",
                self.card.classes,
                png,
                gdal_env=self.gdal_env,
            )
            self.publish(png, f"{QUICKLOOKS}/{name}.png")
        except Exception as exc:  # noqa: BLE001 - a quicklook never fails a committed scene
            log.warning("%s: quicklook failed: %s", item.uri, exc)

    def segment(
        self, item: PlannedInput, pool: WorkerPool, options: SegmentOptions
    ) -> Callable[[], SceneResult]:
        """Infer ``item``'s tiles; what is left (COGs, polygons, commit, upload, manifest,
        quicklook) is returned, to run while the next scene is inferred."""
        name = item.name
        if name is None:
            failed = _failed(
                item.uri,
                None,
                f"{item.uri}: its output name is taken by an earlier input or cannot be made "
                "safe; rename the file",
                "UnsafeOutputNameError",
            )
            return lambda: failed
        if not (options.overwrite or self.manifest.owns(name)) and self.store.exists(name):
            exists = _failed(
                item.uri,
                name,
                OutputExistsError(
                    f"{self.store.uri}/{name}: outputs exist that no geoseg run of this output "
                    "root recorded; pass --overwrite to replace them"
                ),
                "OutputExistsError",
            )
            return lambda: exists
        try:
            self.manifest.record(
                item.uri, name=name, identity=item.identity, status="running",
                weights_sha256=self.weights_sha256, config_digest=self.digest,
            )  # fmt: skip
        except StorageError as exc:
            unrecorded = _failed(
                item.uri, name, f"{exc}; the scene was not started", "StorageError"
            )
            return lambda: unrecorded
        pending = infer_scene(
            item.path, self.card, pool, self.local_root,
            SegmentOptions(**{**asdict(options), "overwrite": True}),
            name=name, gdal_env=self.gdal_env,
        )  # fmt: skip
        return partial(self._finish, item, name, pending)

    def _finish(self, item: PlannedInput, name: str, pending: PendingScene) -> SceneResult:
        def unchanged_input() -> None:
            if item.check_identity:
                now = input_identity(item.uri, self.config.storage)
                if now != item.identity:
                    raise InputChangedError(
                        f"{item.uri}: the input changed while it was segmented ({item.identity} "
                        f"-> {now}); its outputs were discarded, the next run segments it again"
                    )

        result = pending.finish(before_commit=unchanged_input)
        result.uri = item.uri
        if result.status == "ok" and self.remote:
            try:
                self.store.publish_dir(self.local_root / name, name)
            except GeosegError as exc:
                result = _failed(item.uri, name, exc, type(exc).__name__)
        if result.status != "ok":
            try:
                self.manifest.record(
                    item.uri, name=name, identity=item.identity, status="failed",
                    error=result.error, error_type=result.error_type,
                )  # fmt: skip
            except StorageError as exc:
                log.error("%s: its failure could not be recorded: %s", item.uri, exc)
            return result
        try:
            self.manifest.record(
                item.uri,
                name=name,
                identity=item.identity,
                status="ok",
                weights_sha256=self.weights_sha256,
                config_digest=self.digest,
                height=result.height,
                width=result.width,
                pixel_area_m2=result.pixel_area_m2,
                class_pixels=result.class_pixels,
                polygons=result.polygons,
            )
        except StorageError as exc:
            # The manifest still says "running": the next run replaces the folder, it never
            # skips a scene no record vouches for.
            return _failed(
                item.uri,
                name,
                f"{exc}; its outputs {self.store.uri}/{name} are complete but not recorded, so "
                "the next run segments this scene again",
                "StorageError",
            )
        self.quicklook(item, name, result.band_indexes or (1,))
        log.info("%s", result.summary())
        return result

    def stage_committed(self, names: list[str]) -> None:
        """Bring committed scenes of a remote root into the staging folder for job outputs."""
        if not self.remote:
            return
        for name in names:
            if not (self.local_root / name / "mask.tif").exists():
                self.store.download_dir(name, self.local_root / name, _JOB_OUTPUT_FILES)
                if self.config.outputs.quicklooks:
                    quick = f"{QUICKLOOKS}/{name}.png"
                    self.store.download_file(quick, self.local_root / quick)

    def publish_job_outputs(self, outputs: JobOutputs) -> None:
        if not self.remote:
            return
        for folder in outputs.polygons:
            self.store.publish_dir(self.local_root / folder, folder)
        for vrt in outputs.vrts:
            self.store.put_file(self.local_root / vrt, vrt)

    def job_outputs(self, names: list[str]) -> dict[str, Any]:
        return job_outputs(
            self.local_root,
            names,
            prepare=lambda: self.stage_committed(names),
            publish=self.publish_job_outputs,
        )

    def write_run(self, run: dict[str, Any]) -> None:
        write_json_atomic(self.local_root / RUN_FILE, run)
        self.publish(self.local_root / RUN_FILE, RUN_FILE)

    def report(self, run: dict[str, Any]) -> None:
        quicklooks = {p.stem: p for p in (self.local_root / QUICKLOOKS).glob("*.png")}
        files = write_report(self.local_root, run, self.card.classes, quicklooks)
        for path in (files.json, files.html):
            self.publish(path, path.name)


def run_job(
    config: JobConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    address: str | None = None,
    on_scene: Callable[[SceneResult], None] | None = None,
    process_exits: bool = False,
) -> RunSummary:
    """Run ``config`` (see the module docstring). Raises LockedError if another run holds the
    output root; every other failure is per scene and recorded. ``process_exits``: the caller
    exits when this returns, so Ray may stop once the last tile is in (:meth:`WorkerPool.release`).
    """
    store = open_store(config.outputs.root, config.storage)
    lock = RunLock(store, config.runtime.lock_ttl_s)
    lock.acquire()
    staging = None
    try:
        if is_s3(config.outputs.root):
            staging = Path(tempfile.mkdtemp(prefix="geoseg-staging-"))
            local_root = staging
        else:
            local_root = Path(config.outputs.root)
            _clean_partials(local_root)
        job = _Run(config, store, local_root)
        return _run(
            job,
            lock,
            overwrite,
            progress,
            address or config.runtime.address,
            on_scene,
            process_exits,
        )
    finally:
        lock.release()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _run(
    job: _Run,
    lock: RunLock,
    overwrite: bool,
    progress: bool,
    address: str | None,
    on_scene: Callable[[SceneResult], None] | None,
    process_exits: bool,
) -> RunSummary:
    config = job.config
    options = segment_options(config, overwrite, progress)
    resolve_crf(job.card, options)  # fails before any work on bad CRF options
    vrt_dir = job.local_root / ".stac"
    planned = plan_inputs(config, vrt_dir)
    todo = [
        p
        for p in planned
        if overwrite
        or not job.manifest.unchanged(p.uri, p.identity, job.weights_sha256, job.digest)
    ]
    unchanged = [p.uri for p in planned if p not in todo]
    log.info("%d inputs: %d to segment, %d unchanged", len(planned), len(todo), len(unchanged))
    results: list[SceneResult] = []
    pool = None
    run: dict[str, Any] | None = None
    try:
        if todo:  # nothing new: no cluster, no model
            start_ray(address)
            pool = WorkerPool(Path(config.model), options)
        run = _header(config, job.card, job.weights_sha256, pool)
        run["scenes"] = [
            {"uri": u, "name": job.manifest.scenes[u].get("name"), "status": "unchanged"}
            for u in unchanged
        ]
        stop = False

        def collect(done: list[SceneResult]) -> None:
            nonlocal stop
            for result in done:
                results.append(result)
                run["scenes"].append(result.to_json())
                record_progress(partial(job.write_run, run))
                if on_scene is not None:
                    on_scene(result)
                if result.status != "ok" and config.runtime.fail_fast:
                    stop = True

        # Each scene's COGs, polygons and upload run while the next one's tiles are inferred; an
        # interrupt still waits for the scene finishing and records it.
        with SceneOverlap[SceneResult]() as overlap:
            try:
                for item in todo:
                    assert pool is not None
                    if lock.lost.is_set():
                        raise LockedError(f"{job.store.uri}: lost the output root's lock; stopping")
                    collect(overlap.submit(job.segment(item, pool, options)))
                    if config.runtime.fail_fast:
                        collect(overlap.drain())  # stop before the next scene: no overlap
                    if stop:
                        break
                if pool is not None and process_exits:
                    pool.release()
            finally:
                collect(overlap.drain())
        if stop:
            log.error("fail_fast: stopped after the first failed scene")
    finally:
        if pool is not None:
            pool.shutdown()
        shutil.rmtree(vrt_dir, ignore_errors=True)
    committed = job.manifest.committed()
    names = sorted({r["name"] for r in committed.values() if r.get("name")})
    run["job_outputs"] = job.job_outputs(names)
    run["finished"] = datetime.now(UTC).isoformat()
    new = [r for r in results if r.status == "ok"]
    failed = [r for r in results if r.status != "ok"]
    run["summary"] = {"new": len(new), "unchanged": len(unchanged), "failed": len(failed)}
    for scene in run["scenes"]:  # the report's areas for unchanged scenes come from the manifest
        record = committed.get(scene["uri"], {})
        if scene["status"] == "unchanged":
            for key in ("height", "width", "pixel_area_m2", "class_pixels", "polygons"):
                scene[key] = record.get(key)
    job.write_run(run)
    try:
        job.report(run)
    except Exception as exc:  # noqa: BLE001 - the report never fails a finished run
        log.error("report failed: %s", exc)
    return RunSummary(new, unchanged, failed, f"{config.outputs.root}/{RUN_FILE}")
