"""Disk full while writing outputs: the scene that does not fit fails with a clear error, leaves
nothing partial, and the scene committed before it stays intact.

The output root is a 256 KiB tmpfs (mounting needs root, as in CI; skipped otherwise). Without
quicklooks, the first scene's outputs take about 120 KiB, the second's (a 3 x 3 mosaic) 190 KiB.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import rasterio
import yaml
from click.testing import CliRunner
from conftest import shared
from test_run_job import AERIAL_TILE, make_scenes, summary_line, write_config

from geoseg.cli import EXIT_SCENE_FAILED, main


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_disk_full_fails_that_scene_only_and_leaves_nothing_partial(
    tmp_path: Path, small_disk: Path, rgb_model: Path, ray_local: None
) -> None:
    make_scenes(tmp_path / "in", 1)  # in/mosaic_0.tif
    shutil.copy(shared(AERIAL_TILE), tmp_path / "in" / "a_small.tif")  # sorts first
    root = small_disk / "out"
    config = write_config(
        tmp_path / "job.yaml",
        [f"{tmp_path}/in/*.tif"],
        rgb_model,
        str(root),
        tiling={"tile_size": 128, "overlap": 32},
    )
    job = yaml.safe_load(config.read_text())
    job["outputs"]["quicklooks"] = False
    config.write_text(yaml.safe_dump(job))

    result = CliRunner().invoke(main, ["-q", "run", str(config)])

    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == EXIT_SCENE_FAILED, result.output
    assert summary_line(result.output).startswith("1 new, 0 unchanged, 1 failed")
    failed_line = next(line for line in result.output.splitlines() if line.startswith("FAILED"))
    assert str(tmp_path / "in" / "mosaic_0.tif") in failed_line
    assert "could not be written completely" in failed_line
    assert "MiB are free on its filesystem: if the disk is full, free space" in failed_line
    # Nothing partial: no mosaic_0 folder, no hidden temporary folder or file.
    assert not (root / "mosaic_0").exists()
    assert not [p.name for p in root.rglob(".*")]
    # The scene committed before is intact and readable.
    with rasterio.open(root / "a_small" / "mask.tif") as src:
        assert (src.height, src.width) == (341, 280)
        assert src.read(1).shape == (341, 280)
    records = json.loads((root / "manifest.json").read_text())["scenes"]
    assert records[str(tmp_path / "in" / "a_small.tif")]["status"] == "ok"
    assert records[str(tmp_path / "in" / "mosaic_0.tif")]["status"] == "failed"
    run = json.loads((root / "run.json").read_text())
    [failed] = [s for s in run["scenes"] if s["status"] == "failed"]
    assert failed["name"] == "mosaic_0"
    assert failed["error_type"] == "StorageError"
    assert f"{root}/.mosaic_0.partial-" in failed["error"]  # names the file that did not fit
    kept = digest(root / "a_small" / "mask.tif")

    # Space freed (here: the big scene removed from the inputs): the rerun redoes nothing done.
    (tmp_path / "in" / "mosaic_0.tif").unlink()
    rerun = CliRunner().invoke(main, ["-q", "run", str(config)])
    assert rerun.exit_code == 0, rerun.output
    assert summary_line(rerun.output).startswith("0 new, 1 unchanged, 0 failed")
    assert digest(root / "a_small" / "mask.tif") == kept
