"""How many GPUs and CPUs the model actors and read tasks ask Ray for (a request no node can
meet waits forever)."""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path

import pytest
import rasterio
from conftest import AERIAL

from geoseg.engine.job import segment
from geoseg.engine.scene import SceneResult, SegmentOptions, WorkerPool, cpu_shares, gpu_share

SCENE = AERIAL / "23322E759967N_clipped_1m_1of2.tif"  # 341 x 280 RGB


@pytest.mark.parametrize(
    ("gpus", "workers", "per_worker", "expected"),
    [
        (1.0, 1, 1.0, 1.0),  # one actor per GPU: the request as configured
        (4.0, 2, 1.0, 1.0),  # room to spare: not grown
        (1.0, 3, 0.25, 0.25),  # fractions that fit: kept
        (1.0, 2, 1.0, 0.5),  # --workers 2 on one GPU: they share it
        (1.0, 3, 0.5, 1 / 3),
        (2.0, 4, 1.0, 0.5),
        (3.0, 2, 2.0, 1.0),  # 1.5 GPUs each cannot be placed: whole GPUs
        (8.0, 3, 4.0, 2.0),
    ],
)
def test_actors_ask_for_what_the_gpus_hold(
    gpus: float, workers: int, per_worker: float, expected: float
) -> None:
    share = gpu_share(gpus, workers, per_worker)
    assert share == pytest.approx(expected)
    assert workers * share <= gpus


@pytest.mark.parametrize(
    ("cpus", "actors", "use_gpu", "expected"),
    [
        (2.0, 1, False, (0.5, 1.0)),  # the 2-core machine: one read at a time beside the actor
        (2.0, 2, False, (0.5, 1.0)),
        (2.0, 4, False, (0.25, 1.0)),  # more actors than cores: still room to read
        (4.0, 1, False, (0.5, 1.0)),  # three reads at a time
        (16.0, 1, True, (0.25, 1.0)),  # a GPU node: reads of one CPU each
        (64.0, 8, False, (0.5, 1.0)),  # a big cluster: no read asks for more than one CPU
        (0.0, 1, False, (0.05, 0.05)),  # no CPU yet (an autoscaler's head): both wait for one
    ],
)
def test_actors_leave_cpus_to_read_with(
    cpus: float, actors: int, use_gpu: bool, expected: tuple[float, float]
) -> None:
    actor, read = cpu_shares(cpus, actors, use_gpu)
    assert (actor, read) == pytest.approx(expected)
    if cpus:
        assert actors * actor + read <= cpus  # a read can always start beside every actor


def test_reads_run_one_at_a_time_beside_the_actor_on_two_cpus(
    ray_local: None, trained_aerial_model: Path
) -> None:
    """The session's Ray has 2 CPUs, as the development machine: with the pool's actor up,
    tasks asking for the pool's read share never overlap (a second would keep a second worker
    process: ~100 MiB of a 40k² run's RSS, or Ray's restarts of it when it sat idle)."""
    import ray

    def timed_sleep(seconds: float) -> tuple[float, float]:  # pickled by value for Ray
        start = time.time()
        time.sleep(seconds)
        return start, time.time()

    _, read = cpu_shares(ray.cluster_resources()["CPU"], 1, use_gpu=False)  # the pool's
    assert read == 1.0
    pool = WorkerPool(trained_aerial_model, SegmentOptions(progress=False))
    try:
        probe = ray.remote(timed_sleep).options(num_cpus=read)
        spans = sorted(ray.get([probe.remote(0.3) for _ in range(4)]))
    finally:
        pool.shutdown()
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end


def test_more_actors_than_cores_segment_a_scene(
    ray_local: None, trained_aerial_model: Path, tmp_path: Path
) -> None:
    """4 actors on the session's 2 CPUs: with half a CPU each they held all of them, and Ray
    waited forever for a CPU to read the first tile with."""
    masks = {}
    for workers in (1, 4):
        options = SegmentOptions(progress=False, polygons=False, workers=workers, batch_size=1)
        out = tmp_path / str(workers)
        finished: list[list[SceneResult]] = []
        runner = threading.Thread(
            target=lambda out, options, finished: finished.append(
                segment([str(SCENE)], trained_aerial_model, out, options)
            ),
            args=(out, options, finished),
            daemon=True,
        )
        runner.start()
        runner.join(timeout=300)
        assert finished, f"{workers} actors: no result after 300 s (Ray waiting for CPUs?)"
        assert [r.status for r in finished[0]] == ["ok"], [r.error for r in finished[0]]
        run = json.loads((out / "run.json").read_text())
        assert len(run["workers"]) == workers
        with rasterio.open(out / SCENE.stem / "mask.tif") as src:
            masks[workers] = src.read(1)
    assert masks[1].shape == (341, 280)
    # Other thread counts may round the last bits of a float32 sum differently.
    assert (masks[4] == masks[1]).mean() >= 0.9999
