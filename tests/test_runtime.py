"""Stopping the embedded Ray: every process it started is gone, and a second stop does nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import rasterio
import yaml

# Child interpreters start with this: whether a process (of the stopped Ray) still exists.
ALIVE = textwrap.dedent(
    """
    import os

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    """
)

# In its own interpreter: the session's Ray (conftest's ray_local) must not be the one stopped.
CHILD = ALIVE + textwrap.dedent(
    """
    import json, os

    import ray

    from geoseg.engine import runtime

    runtime.start_ray(None, num_cpus=1)
    node = ray._private.worker._global_node
    pids = {k: [info.process.pid for info in infos] for k, infos in node.all_processes.items()}
    embedded = runtime.embedded()
    runtime.stop_ray()
    runtime.stop_ray()  # nothing left to stop
    print(json.dumps({
        "pids": pids,
        "alive": sorted(kind for kind, ps in pids.items() if any(alive(p) for p in ps)),
        "embedded_before": embedded,
        "embedded_after": runtime.embedded(),
        "initialized_after": ray.is_initialized(),
    }))
    """
)


def test_stop_ray_stops_every_process_of_the_embedded_ray_the_monitor_included() -> None:
    child = subprocess.run(
        [sys.executable, "-c", CHILD], check=False, capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr
    assert "Traceback" not in child.stderr
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert {"gcs_server", "raylet", "monitor"} <= set(report["pids"])
    assert report["alive"] == []
    assert report["embedded_before"] is True
    assert report["embedded_after"] is False
    assert report["initialized_after"] is False


# A job whose process exits afterwards (the `geoseg` command): Ray must stop once the last tile is
# in, before the last scene's COGs and polygons are written (they need no Ray), and the outputs
# must not change. The last scene's finishing waits for that stop (or fails after 120 s), so the
# order is checked, not raced. In a child interpreter: the session's Ray must stay up.
RELEASE_CHILD = ALIVE + textwrap.dedent(
    """
    import json, sys, threading
    from pathlib import Path

    import ray

    from geoseg.engine import job, runner, scene
    from geoseg.config import load_config

    mode, model, out, *inputs = sys.argv[1:]
    stopped = threading.Event()
    real_stop, real_finish = scene.stop_ray, scene.PendingScene.finish
    node_pids = []

    def stop():
        node = ray._private.worker._global_node
        node_pids.extend(i.process.pid for infos in node.all_processes.values() for i in infos)
        real_stop()
        stopped.set()

    def finish(self, *args, **kwargs):
        if self.result.uri == inputs[-1]:
            assert stopped.wait(120), "Ray was still running when the last scene finished"
        elif stopped.is_set():
            raise AssertionError("Ray stopped before the last scene's tiles were in")
        return real_finish(self, *args, **kwargs)

    scene.stop_ray, scene.PendingScene.finish = stop, finish
    if mode == "segment":
        options = scene.SegmentOptions(batch_size=2, progress=False)
        results = job.segment(inputs, Path(model), Path(out), options, process_exits=True)
        statuses = [r.status for r in results]
        polygons = [r.polygons for r in results]
    else:
        summary = runner.run_job(load_config(Path(out)), progress=False, process_exits=True)
        statuses = ["ok"] * len(summary.new) + ["failed"] * len(summary.failed)
        polygons = [r.polygons for r in summary.new]

    print(json.dumps({
        "stopped": stopped.is_set(),
        "initialized_after": ray.is_initialized(),
        "node_processes_alive": sum(alive(p) for p in node_pids),
        "node_processes": len(node_pids),
        "statuses": statuses,
        "polygons": polygons,
    }))
    """
)


def _release_child(*args: str) -> dict[str, object]:
    child = subprocess.run(
        [sys.executable, "-c", RELEASE_CHILD, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert child.returncode == 0, child.stderr[-3000:]
    report: dict[str, object] = json.loads(child.stdout.strip().splitlines()[-1])
    return report


def test_a_job_whose_process_exits_stops_ray_before_its_last_scene_finishes(
    fixtures: dict[str, Path], rgb_model: Path, tmp_path: Path, ray_local: None
) -> None:
    import ray

    from geoseg.engine.job import segment
    from geoseg.engine.scene import SegmentOptions

    first, last = tmp_path / "first.tif", tmp_path / "last.tif"
    shutil.copy(fixtures["good"], first)
    shutil.copy(fixtures["one_px_wide"], last)
    released = tmp_path / "released"
    report = _release_child("segment", str(rgb_model), str(released), str(first), str(last))
    assert report["stopped"] is True
    assert report["initialized_after"] is False
    assert report["node_processes"] >= 3  # GCS, raylet, monitor, ...
    assert report["node_processes_alive"] == 0
    assert report["statuses"] == ["ok", "ok"]

    # The same job in this process (the default, a library caller's): Ray stays up, same outputs.
    kept = tmp_path / "kept"
    options = SegmentOptions(batch_size=2, progress=False)
    results = segment([str(first), str(last)], rgb_model, kept, options)
    assert ray.is_initialized()
    assert [r.status for r in results] == ["ok", "ok"]
    assert report["polygons"] == [r.polygons for r in results]
    for name in ("first", "last"):
        for raster in ("mask.tif", "confidence.tif"):
            with (
                rasterio.open(released / name / raster) as a,
                rasterio.open(kept / name / raster) as b,
            ):
                assert a.profile == b.profile
                assert np.array_equal(a.read(), b.read()), (name, raster)


def test_a_run_whose_process_exits_stops_ray_before_its_last_scene_finishes(
    fixtures: dict[str, Path], rgb_model: Path, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    first, last = inbox / "a.tif", inbox / "b.tif"
    shutil.copy(fixtures["good"], first)
    shutil.copy(fixtures["good"], last)
    root = tmp_path / "root"
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "inputs": [{"path": str(first)}, {"path": str(last)}],
                "model": str(rgb_model),
                "outputs": {"root": str(root)},
            }
        )
    )
    report = _release_child("run", str(rgb_model), str(config), str(first), str(last))
    assert report["stopped"] is True
    assert report["initialized_after"] is False
    assert report["node_processes_alive"] == 0
    assert report["statuses"] == ["ok", "ok"]
    for name in ("a", "b"):
        with rasterio.open(root / name / "mask.tif") as src:
            assert src.shape == (200, 300)
            assert src.read(1).max() < 4


def test_the_segment_command_keeps_the_collector_on_and_a_caller_s_ray_up(
    fixtures: dict[str, Path], rgb_model: Path, tmp_path: Path, ray_local: None
) -> None:
    """In-process (not the console entry point): Ray stays up for the caller, and the collector,
    off while the engine is imported, is on again, the imported objects frozen out of its reach."""
    import gc

    import ray
    from click.testing import CliRunner

    from geoseg.cli import main

    frozen = gc.get_freeze_count()
    out = tmp_path / "out"
    args = ["-q", "segment", str(fixtures["good"]), "--model", str(rgb_model), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert gc.isenabled()
    assert gc.get_freeze_count() > frozen
    assert ray.is_initialized()
    assert json.loads((out / "run.json").read_text())["summary"] == {"ok": 1, "failed": 0}
