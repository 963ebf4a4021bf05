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
from click.testing import CliRunner

from geoseg.cli import main


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
            if "ModelActor" in " ".join(child.cmdline()):
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


def test_many_tiles_in_flight_through_a_small_object_store(
    rgb_model: Path, ray_local: None, tmp_path: Path
) -> None:
    """16 batches of 4 tiles of 512 px in flight (~180 MiB of tiles and probabilities) through an
    80 MiB object store: Ray spills or holds back, the job completes, and the mask equals a run
    with the default store and backpressure."""
    rng = np.random.default_rng(7)
    coarse = rng.integers(0, 256, size=(3, 48, 48), dtype=np.uint8)
    image = np.repeat(np.repeat(coarse, 64, axis=1), 64, axis=2)  # 3072 x 3072 blocks of colour
    scene = tmp_path / "big.tif"
    profile = {
        "driver": "GTiff", "height": 3072, "width": 3072, "count": 3, "dtype": "uint8",
        "crs": "EPSG:32633", "transform": Affine(10, 0, 500000, 0, -10, 5100000),
        "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate",
    }  # fmt: skip
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(image)
    common = [
        "segment", str(scene), "--model", str(rgb_model), "--tile-size", "512", "--overlap", "32",
        "--batch-size", "4", "--no-polygons", "--no-confidence",
    ]  # fmt: skip

    env = {**os.environ, "GEOSEG_OBJECT_STORE_BYTES": str(80 * 2**20)}
    env.pop("RAY_ADDRESS", None)
    pressed = subprocess.run(
        [str(Path(sys.executable).parent / "geoseg"), "-q", *common,
         "--tiles-in-flight", "16", "--out", str(tmp_path / "pressed")],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert pressed.returncode == 0, pressed.stderr[-3000:]
    reference = CliRunner().invoke(main, ["-q", *common, "--out", str(tmp_path / "reference")])
    assert reference.exit_code == 0, reference.output

    with (
        rasterio.open(tmp_path / "pressed" / "big" / "mask.tif") as a,
        rasterio.open(tmp_path / "reference" / "big" / "mask.tif") as b,
    ):
        assert (a.height, a.width) == (3072, 3072)
        mask = a.read(1)
        assert (mask == b.read(1)).all()
        assert (mask != a.nodata).all()
