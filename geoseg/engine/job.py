"""A segmentation run over many scenes: one actor pool, one ``run.json`` at the output root."""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import rasterio
import ray

from geoseg import __version__
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
from geoseg.errors import StorageError
from geoseg.io.job_outputs import JobOutputs, write_job_outputs
from geoseg.io.outputs import scene_output_name, write_json_atomic
from geoseg.models.card import WEIGHTS_FILE, file_sha256, read_card

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


def _names(uris: list[str]) -> list[str | None]:
    """Output names; a name already taken by an earlier input leaves the later one unnamed."""
    seen: dict[str, str] = {}
    names: list[str | None] = []
    for uri in uris:
        try:
            name = scene_output_name(uri)
        except ValueError:
            names.append(None)
            continue
        if name in seen:
            names.append(None)
        else:
            seen[name] = uri
            names.append(name)
    return names


def run_provenance(started: datetime) -> dict[str, Any]:
    """The head of run.json: geoseg and library versions, host, start time."""
    return {
        "geoseg_version": __version__,
        "started": started.isoformat(),
        "finished": None,
        "host": platform.node(),
        "versions": {
            "ray": ray.__version__,
            "torch": version("torch"),  # not imported: the actors use it
            "rasterio": rasterio.__version__,
            "gdal": rasterio.__gdal_version__,
        },
    }


def job_outputs(
    out_root: Path,
    names: list[str],
    *,
    prepare: Callable[[], None] | None = None,
    publish: Callable[[JobOutputs], None] | None = None,
) -> dict[str, Any]:
    """Job-level polygon dataset and mask VRTs (geoseg.io.job_outputs) over the scenes ``names``
    of ``out_root``, for run.json; a failure (also of ``prepare`` or ``publish``, which a remote
    output root uses to stage and upload) is logged and recorded, never raised."""
    t0 = time.perf_counter()
    try:
        if prepare is not None:
            prepare()
        outputs = write_job_outputs(out_root, names)
        if publish is not None:
            publish(outputs)
    except Exception as exc:
        log.error("job-level outputs failed: %s", exc)
        log.debug("traceback", exc_info=True)
        return {"error": str(exc), "error_type": type(exc).__name__}
    log.info(
        "job outputs: %s; %d features merged across scene borders",
        ", ".join(outputs.polygons + outputs.vrts) or "none",
        outputs.merged_features,
    )
    return {**outputs.to_json(), "seconds": time.perf_counter() - t0}


def record_progress(write: Callable[[], None]) -> None:
    """Write the run record after a scene. A failure (a full disk) is logged, not raised: the
    scene's outputs and manifest record stand on their own, and the record is written again after
    the next scene and at the end of the run, where a failure stops the command."""
    try:
        write()
    except StorageError as exc:
        log.error("%s; the run goes on and writes it again later", exc)


def _finish_and_log(pending: PendingScene) -> SceneResult:
    result = pending.finish()
    if result.status == "ok":
        log.info("%s", result.summary())
    return result


def segment(
    uris: list[str],
    model_dir: Path,
    out_root: Path,
    options: SegmentOptions,
    address: str | None = None,
    process_exits: bool = False,
) -> list[SceneResult]:
    """Segment every input; each failure is recorded and the others go on.

    ``process_exits``: the caller exits when this returns (the ``geoseg`` command), so Ray and
    the actors may stop as soon as the last tile is in (:meth:`WorkerPool.release`).
    """
    started = datetime.now(UTC)
    card = read_card(model_dir)
    weights_sha256 = file_sha256(model_dir / WEIGHTS_FILE)
    crf = resolve_crf(card, options)  # fails before any work on bad CRF options
    out_root.mkdir(parents=True, exist_ok=True)
    start_ray(address)
    pool = WorkerPool(model_dir, options)
    run: dict[str, Any] = {
        **run_provenance(started),
        "model": {
            "dir": str(model_dir),
            "card": card.model_dump(mode="json"),
            "weights_sha256": weights_sha256,
        },
        "workers": pool.info,
        "parameters": asdict(options),
        "crf": None if crf is None else {**asdict(crf), "halo": crf.halo},
        "scenes": [],
    }
    results: list[SceneResult] = []

    def record(done: list[SceneResult]) -> None:
        for result in done:
            results.append(result)
            run["scenes"].append(result.to_json())
            # Written after every scene: a crash later in the run keeps this record.
            record_progress(partial(write_json_atomic, out_root / RUN_FILE, run))

    try:
        # Each scene's COGs and polygons are written while the next one's tiles are inferred; an
        # interrupt still waits for the scene finishing and records it.
        with SceneOverlap[SceneResult]() as overlap:
            try:
                for uri, name in zip(uris, _names(uris), strict=True):
                    if name is None:
                        failed = SceneResult(
                            uri=uri,
                            name=None,
                            status="failed",
                            error_type="UnsafeOutputNameError",
                            error=f"{uri}: its output name is taken by an earlier input or cannot "
                            "be made safe; rename the file",
                        )
                        log.error(failed.error)
                        pending = PendingScene(failed, time.perf_counter())
                    else:
                        pending = infer_scene(uri, card, pool, out_root, options, name=name)
                    record(overlap.submit(partial(_finish_and_log, pending)))
                if process_exits:
                    pool.release()
            finally:
                record(overlap.drain())
    finally:
        pool.shutdown()
    run["job_outputs"] = job_outputs(
        out_root, [r.name for r in results if r.status == "ok" and r.name is not None]
    )
    run["finished"] = datetime.now(UTC).isoformat()
    run["summary"] = {
        "ok": sum(r.status == "ok" for r in results),
        "failed": sum(r.status == "failed" for r in results),
    }
    write_json_atomic(out_root / RUN_FILE, run)
    return results
