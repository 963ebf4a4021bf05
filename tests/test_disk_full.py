"""Disk full while writing outputs: the scene that does not fit fails with a clear error, leaves
nothing partial, and the scene committed before it stays intact. The same when the disk fills
exactly as a record (the manifest, ``run.json``) is written.

The output root is a small tmpfs (mounting needs root, as in CI; skipped otherwise). Without
quicklooks, the first scene's outputs take about 120 KiB, the second's (a 3 x 3 mosaic) 190 KiB.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import rasterio
import yaml
from click.testing import CliRunner
from conftest import shared
from test_run_job import AERIAL_TILE, make_scenes, summary_line, write_config

import geoseg.engine.runner
from geoseg.cli import EXIT_SCENE_FAILED, main
from geoseg.engine.manifest import MANIFEST_KEY
from geoseg.errors import StorageError
from geoseg.io.outputs import write_json_atomic
from geoseg.io.storage import LocalStore, OutputStore


@contextmanager
def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
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


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", "256k") as disk:
        yield disk


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """Room for the scenes; :func:`full` fills what is left."""
    with tmpfs(tmp_path / "disk", "4m") as mount_point:
        yield mount_point


@contextmanager
def full(disk: Path) -> Iterator[None]:
    """Every free byte of ``disk`` taken (by a hidden file, removed on exit)."""
    filler = disk / ".filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):  # ENOSPC: full
            while True:
                os.write(fd, bytes(4096))
        yield
    finally:
        os.close(fd)
        filler.unlink()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def two_scene_job(tmp_path: Path, disk: Path, model: Path) -> tuple[Path, Path, str]:
    """A job over a small real scene and a 3 x 3 mosaic of it (last), its output root on
    ``disk``: (config, output root, the mosaic's URI)."""
    make_scenes(tmp_path / "in", 1)  # in/mosaic_0.tif
    shutil.copy(shared(AERIAL_TILE), tmp_path / "in" / "a_small.tif")  # sorts first
    root = disk / "out"
    config = write_config(
        tmp_path / "job.yaml",
        [f"{tmp_path}/in/*.tif"],
        model,
        str(root),
        tiling={"tile_size": 128, "overlap": 32},
    )
    job = yaml.safe_load(config.read_text())
    job["outputs"]["quicklooks"] = False
    config.write_text(yaml.safe_dump(job))
    return config, root, str(tmp_path / "in" / "mosaic_0.tif")


def test_disk_full_fails_that_scene_only_and_leaves_nothing_partial(
    tmp_path: Path, small_disk: Path, rgb_model: Path, ray_local: None
) -> None:
    config, root, _ = two_scene_job(tmp_path, small_disk, rgb_model)

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


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".*"))


def test_a_record_that_does_not_fit_keeps_the_old_one_and_leaves_no_temporary(disk: Path) -> None:
    path = disk / "run.json"
    write_json_atomic(path, {"scenes": ["a"]})
    store = LocalStore(disk)
    store.write_json(MANIFEST_KEY, {"version": 1, "scenes": {}})
    with full(disk):
        with pytest.raises(StorageError, match="No space left on device") as info:
            write_json_atomic(path, {"scenes": ["a", "b"]})
        assert str(info.value).startswith(f"{path}: could not be written completely")
        assert "0.0 MiB are free on its filesystem: if the disk is full, free space" in str(
            info.value
        )
        with pytest.raises(StorageError, match="No space left on device") as info:
            store.write_json(MANIFEST_KEY, {"version": 1, "scenes": {"x": {}}})
        assert str(info.value).startswith(f"{disk / MANIFEST_KEY}: could not write")
        assert hidden(disk) == [".filler"]
    assert json.loads(path.read_text()) == {"scenes": ["a"]}
    assert store.read_json(MANIFEST_KEY) == {"version": 1, "scenes": {}}


def test_a_record_in_a_missing_folder_is_a_storage_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "gone" / "run.json"
    with pytest.raises(StorageError) as info:
        write_json_atomic(path, {"scenes": []})
    assert str(info.value).startswith(
        f"{path}: could not be written completely ([Errno 2] No such file or directory"
    )
    assert "; its folder cannot be read: if the disk is full" in str(info.value)
    assert not (tmp_path / "gone").exists()


class FillsDiskAtRecord:
    """The real local store, except that the manifest write giving ``scene`` the record ``status``
    meets a full disk (once): the disk fills exactly as the record is written, and is freed
    after that write, or only when the test closes ``filled`` (``stays_full``)."""

    def __init__(
        self, store: OutputStore, disk: Path, scene: str, status: str, stays_full: bool = False
    ) -> None:
        self.store, self.disk, self.scene, self.status = store, disk, scene, status
        self.stays_full = stays_full
        self.filled = contextlib.ExitStack()
        self.fired = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def write_json(self, key: str, data: Any) -> None:
        record = data["scenes"].get(self.scene, {}) if key == MANIFEST_KEY else {}
        if not self.fired and record.get("status") == self.status:
            self.fired = True
            self.filled.enter_context(full(self.disk))
            try:
                self.store.write_json(key, data)  # raises: no space left
            finally:
                if not self.stays_full:
                    self.filled.close()
            return
        self.store.write_json(key, data)


def rerun_redoes_only(config: Path, root: Path, mosaic: str) -> None:
    kept = digest(root / "a_small" / "mask.tif")
    rerun = CliRunner().invoke(main, ["-q", "run", str(config)])
    assert rerun.exit_code == 0, rerun.output
    assert summary_line(rerun.output).startswith("1 new, 1 unchanged, 0 failed")
    assert digest(root / "a_small" / "mask.tif") == kept
    assert json.loads((root / MANIFEST_KEY).read_text())["scenes"][mosaic]["status"] == "ok"


@pytest.mark.parametrize("status", ["running", "ok"])
def test_disk_full_at_a_manifest_record_fails_that_scene_and_the_rerun_redoes_only_it(
    tmp_path: Path,
    disk: Path,
    rgb_model: Path,
    ray_local: None,
    monkeypatch: pytest.MonkeyPatch,
    status: str,
) -> None:
    config, root, mosaic = two_scene_job(tmp_path, disk, rgb_model)
    store = FillsDiskAtRecord(LocalStore(root), disk, mosaic, status)
    with monkeypatch.context() as patch:
        patch.setattr(geoseg.engine.runner, "open_store", lambda *args: store)
        result = CliRunner().invoke(main, ["-q", "run", str(config)])

    assert store.fired
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == EXIT_SCENE_FAILED, result.output
    assert summary_line(result.output).startswith("1 new, 0 unchanged, 1 failed")
    failed_line = next(line for line in result.output.splitlines() if line.startswith("FAILED"))
    assert failed_line.startswith(
        f"FAILED {mosaic}: {root / MANIFEST_KEY}: could not write: No space left on device"
    )
    records = json.loads((root / MANIFEST_KEY).read_text())["scenes"]
    assert records[str(Path(mosaic).with_name("a_small.tif"))]["status"] == "ok"
    if status == "running":
        assert failed_line.endswith("; the scene was not started")
        assert mosaic not in records
        assert not (root / "mosaic_0").exists()
    else:
        assert failed_line.endswith(
            f"; its outputs {root}/mosaic_0 are complete but not recorded, so the next run "
            "segments this scene again"
        )
        assert records[mosaic]["status"] == "running"  # as before the record that did not fit
        with rasterio.open(root / "mosaic_0" / "mask.tif") as src:
            assert (src.height, src.width) == (1023, 840)
    run = json.loads((root / "run.json").read_text())
    assert [(s["name"], s["status"], s["error_type"]) for s in run["scenes"]] == [
        ("a_small", "ok", None),
        ("mosaic_0", "failed", "StorageError"),
    ]
    assert hidden(root) == []  # no temporary record, folder or lock left
    rerun_redoes_only(config, root, mosaic)


def test_a_disk_that_stays_full_ends_the_run_with_an_error_naming_its_record(
    tmp_path: Path,
    disk: Path,
    rgb_model: Path,
    ray_local: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, root, mosaic = two_scene_job(tmp_path, disk, rgb_model)
    store = FillsDiskAtRecord(LocalStore(root), disk, mosaic, "ok", stays_full=True)
    with monkeypatch.context() as patch, store.filled:
        patch.setattr(geoseg.engine.runner, "open_store", lambda *args: store)
        result = CliRunner().invoke(main, ["-q", "run", str(config)])
        assert hidden(root) == []  # the records that did not fit left no temporary file

    assert store.fired
    # The scene's failure and the run records after it did not fit either: logged, and the
    # run's last record, which did not fit, ends the command (exit 2 from the entry point).
    assert isinstance(result.exception, StorageError), result.output
    assert str(result.exception).startswith(
        f"{root}/run.json: could not be written completely ([Errno 28] No space left on device)"
    )
    records = json.loads((root / MANIFEST_KEY).read_text())["scenes"]
    assert [r["status"] for r in records.values()] == ["ok", "running"]
    assert json.loads((root / "run.json").read_text())["scenes"][0]["name"] == "a_small"
    assert hidden(root) == []
    rerun_redoes_only(config, root, mosaic)
