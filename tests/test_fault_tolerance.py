"""A model actor killed mid-scene is restarted by Ray, its tiles retried, the outputs unchanged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import rasterio
from affine import Affine


def _scene(path: Path) -> Path:
    rng = np.random.default_rng(7)
    coarse = rng.integers(0, 255, (3, 32, 32), dtype=np.uint8)
    data = np.kron(coarse, np.ones((1, 32, 32), dtype=np.uint8))  # 1024 x 1024 blocks
    profile = {
        "driver": "GTiff", "width": 1024, "height": 1024, "count": 3, "dtype": "uint8",
        "crs": "EPSG:32633", "transform": Affine(1, 0, 400000, 0, -1, 5000000),
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = ("red", "green", "blue")
    return path


def _command(scene: Path, model: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "geoseg", "-q", "segment", str(scene), "--model", str(model),
        "--out", str(out), "--tile-size", "128", "--overlap", "32", "--batch-size", "1",
        "--tiles-in-flight", "2", "--no-polygons",
    ]  # fmt: skip


def _actor_pids(root: psutil.Process) -> list[int]:
    pids = []
    for child in root.children(recursive=True):
        try:
            if "SegmentationWorker" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:
            continue
    return pids


def test_killed_actor_is_restarted_and_outputs_equal_a_clean_run(
    rgb_model: Path, tmp_path: Path
) -> None:
    scene = _scene(tmp_path / "scene.tif")
    env = {**os.environ, "RAY_ADDRESS": ""}
    clean = subprocess.run(
        _command(scene, rgb_model, tmp_path / "clean"), env=env, check=False, timeout=300
    )
    assert clean.returncode == 0

    faulty_out = tmp_path / "faulty"
    proc = subprocess.Popen(_command(scene, rgb_model, faulty_out), env=env)
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        partial = list(faulty_out.glob(".scene.partial-*")) if faulty_out.exists() else []
        pids = _actor_pids(psutil.Process(proc.pid))
        if partial and pids:  # the scene is under way and the actor is working on it
            time.sleep(0.5)
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.05)
    assert killed is not None, "never caught the actor mid-scene"
    assert proc.wait(timeout=300) == 0
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == "zombie"
    with (
        rasterio.open(tmp_path / "clean" / "scene" / "mask.tif") as a,
        rasterio.open(faulty_out / "scene" / "mask.tif") as b,
    ):
        np.testing.assert_array_equal(a.read(1), b.read(1))
