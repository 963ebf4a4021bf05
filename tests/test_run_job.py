"""`geoseg run CONFIG`: incremental reruns, crash/resume after kill -9, the output root's lock, the
run report, and S3 inputs/outputs through a real S3 API server (moto) on loopback.

Runs that must be killed or must race each other are real `geoseg` processes; the others run in
this process on the session's local Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import geopandas as gpd
import numpy as np
import pytest
import rasterio
import yaml
from click.testing import CliRunner
from conftest import shared
from s3server import FAKE_CREDENTIALS, make_bucket

from geoseg.cli import EXIT_BUSY, main
from geoseg.engine.manifest import LOCK_KEY, MANIFEST_KEY, RunLock
from geoseg.errors import LockedError
from geoseg.io.storage import LocalStore
from geoseg.models.card import read_card

GEOSEG = str(Path(sys.executable).parent / "geoseg")
# Scenes 0 and 1 are cloud-covered (Dynamic World: all snow_and_ice); 2-4 hold several classes.
SLOVENIA = [f"sentinel2-l1c-slovenia/scene_{i}.tif" for i in (2, 3, 4)]
AERIAL_TILE = "aerial-new-brunswick/23322E759967N_clipped_1m_1of2.tif"


def write_config(path: Path, inputs: list[str], model: Path, root: str, **sections: Any) -> Path:
    config: dict[str, Any] = {
        "inputs": [{"path": p} for p in inputs],
        "model": str(model),
        "outputs": {"root": root, "polygons": {"formats": ["gpkg"]}},
        **sections,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def manifest(root: Path) -> dict[str, Any]:
    return dict(json.loads((root / MANIFEST_KEY).read_text())["scenes"])


def summary_line(output: str) -> str:
    return next(line for line in output.splitlines() if " new, " in line)


def features(path: Path) -> list[tuple[Any, ...]]:
    """Every feature of a polygon layer: its attributes and exact geometry (WKB)."""
    frame = gpd.read_file(path, layer="polygons")
    columns = [c for c in frame.columns if c != "geometry"]
    return [(*(row[c] for c in columns), row.geometry.wkb) for _, row in frame.iterrows()]


@pytest.fixture(scope="module")
def dynamicworld_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from geoseg.models.dynamicworld import import_dynamicworld

    out = tmp_path_factory.mktemp("models") / "dynamicworld"
    import_dynamicworld(shared("models/dynamicworld/forward"), out)
    return out


def slovenia_job(tmp_path: Path, model: Path) -> tuple[Path, Path, Path]:
    """An inbox folder holding two Sentinel-2 scenes, an output root and a job over the inbox
    with Dynamic World on 200/96 tiles: (inbox, root, config)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for relative in SLOVENIA[:2]:
        shutil.copy(shared(relative), inbox)
    root = tmp_path / "out"
    config = write_config(
        tmp_path / "job.yaml",
        [f"{inbox}/*.tif"],
        model,
        str(root),
        tiling={"tile_size": 200, "overlap": 96},
    )
    return inbox, root, config


# ---------------------------------------------------------------------------- incremental reruns


def test_rerun_segments_only_new_and_changed_inputs(
    tmp_path: Path, ray_local: None, dynamicworld_model: Path
) -> None:
    inbox, root, config = slovenia_job(tmp_path, dynamicworld_model)
    runner = CliRunner()

    first = runner.invoke(main, ["-q", "run", str(config)])
    assert first.exit_code == 0, first.output
    assert summary_line(first.output).startswith("2 new, 0 unchanged, 0 failed")
    records = manifest(root)
    assert sorted(r["name"] for r in records.values()) == ["scene_2", "scene_3"]
    assert {r["status"] for r in records.values()} == {"ok"}
    with rasterio.open(root / "scene_2" / "mask.tif") as src:
        assert (src.height, src.width) == (101, 100)
        assert src.crs.to_epsg() == 32633
        counts = np.bincount(src.read(1).ravel(), minlength=256)
    recorded = records[str(inbox / "scene_2.tif")]["class_pixels"]
    assert sum(recorded.values()) == 101 * 100
    classes = read_card(dynamicworld_model).classes
    assert len([v for v in recorded.values() if v]) >= 2
    assert {k: v for k, v in recorded.items() if v} == {
        c.name: int(counts[i]) for i, c in enumerate(classes) if counts[i]
    }

    again = runner.invoke(main, ["-q", "run", str(config)])
    assert again.exit_code == 0, again.output
    assert summary_line(again.output).startswith("0 new, 2 unchanged, 0 failed")
    assert manifest(root) == records  # nothing was rewritten

    shutil.copy(shared(SLOVENIA[2]), inbox)  # a new scene
    changed = inbox / "scene_3.tif"  # and a changed one: new bytes, new mtime
    with rasterio.open(changed, "r+") as dst:
        dst.write(np.flipud(dst.read()))
    third = runner.invoke(main, ["-q", "run", str(config)])
    assert third.exit_code == 0, third.output
    assert summary_line(third.output).startswith("2 new, 1 unchanged, 0 failed")
    after = manifest(root)
    assert after[str(inbox / "scene_2.tif")] == records[str(inbox / "scene_2.tif")]
    assert after[str(changed)]["identity"] != records[str(changed)]["identity"]
    assert after[str(inbox / "scene_4.tif")]["status"] == "ok"

    run = json.loads((root / "run.json").read_text())
    assert run["summary"] == {"new": 2, "unchanged": 1, "failed": 0}
    assert sorted((s["name"], s["status"]) for s in run["scenes"]) == [
        ("scene_2", "unchanged"),
        ("scene_3", "ok"),
        ("scene_4", "ok"),
    ]
    report = json.loads((root / "report.json").read_text())
    with rasterio.open(inbox / "scene_2.tif") as src:
        pixel_m2 = abs(src.transform.a * src.transform.e)  # 9.995 m x 9.997 m
    # 3 scenes of 101 x 100 pixels, all classes: the whole mapped area.
    assert sum(report["area_km2"].values()) == pytest.approx(3 * 10100 * pixel_m2 / 1e6, abs=1e-5)
    html = (root / "report.html").read_text()
    for name in ("scene_2", "scene_3", "scene_4"):
        png = root / "quicklooks" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"quicklooks/{name}.png" in html


def test_overwritten_input_fails_that_scene_only(
    tmp_path: Path, ray_local: None, dynamicworld_model: Path
) -> None:
    from geoseg.config import load_config
    from geoseg.engine.runner import run_job

    inbox, root, config_path = slovenia_job(tmp_path, dynamicworld_model)
    config = load_config(config_path)
    victim = inbox / "scene_2.tif"

    def overwrite_victim_once(path: Path = victim) -> None:
        if not hasattr(overwrite_victim_once, "done"):
            overwrite_victim_once.done = True  # type: ignore[attr-defined]
            os.utime(path, ns=(1, 1))

    from geoseg.engine import runner as runner_module

    original = runner_module.infer_scene

    def segment_then_overwrite(*args: Any, **kwargs: Any) -> Any:
        if args[0] == str(victim):
            overwrite_victim_once()
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner_module, "infer_scene", segment_then_overwrite)
        summary = run_job(config, progress=False)
    assert summary.line == "1 new, 0 unchanged, 1 failed"
    [failed] = summary.failed
    assert failed.uri == str(victim)
    assert failed.error_type == "InputChangedError"
    assert "changed while it was segmented" in str(failed.error)
    assert not (root / "scene_2").exists()  # nothing partial
    assert (root / "scene_3" / "mask.tif").is_file()
    assert manifest(root)[str(victim)]["status"] == "failed"

    rerun = run_job(config, progress=False)  # the next run segments it again
    assert rerun.line == "1 new, 1 unchanged, 0 failed"


# ------------------------------------------------------------------------------------- the lock


def test_lock_refuses_live_holder_and_takes_over_stale_ones(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    first = RunLock(store, ttl_s=60)
    first.acquire()
    try:
        with pytest.raises(LockedError, match=r"another geoseg run holds this output root"):
            RunLock(store, ttl_s=60).acquire()
    finally:
        first.release()
    assert not (tmp_path / LOCK_KEY).exists()

    # Expired: taken over.
    store.write_json(LOCK_KEY, {"run_id": "old", "host": "elsewhere", "pid": 1, "expires_at": 0})
    lock = RunLock(store, ttl_s=60)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_KEY).read_text())["run_id"] == lock.run_id
    lock.release()

    # Held by a process of this host that is gone: taken over even before expiry.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = RunLock(store, ttl_s=60)
    store.write_json(
        LOCK_KEY,
        {**lock._body(), "run_id": "dead", "pid": dead.pid, "expires_at": time.time() + 600},
    )
    lock.acquire()
    assert json.loads((tmp_path / LOCK_KEY).read_text())["run_id"] == lock.run_id
    lock.release()


def test_lock_heartbeat_keeps_it_alive_and_notices_loss(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    lock = RunLock(store, ttl_s=0.3)
    lock.acquire()
    try:
        first = json.loads((tmp_path / LOCK_KEY).read_text())["expires_at"]
        time.sleep(0.5)
        assert json.loads((tmp_path / LOCK_KEY).read_text())["expires_at"] > first
        assert not lock.lost.is_set()
        store.write_json(LOCK_KEY, {"run_id": "thief", "expires_at": time.time() + 600})
        assert lock.lost.wait(2)
    finally:
        lock.release()
    assert json.loads((tmp_path / LOCK_KEY).read_text())["run_id"] == "thief"  # not ours to drop


def test_two_runs_at_once_one_refuses_with_exit_3(tmp_path: Path, dynamicworld_model: Path) -> None:
    root = tmp_path / "out"
    config = write_config(
        tmp_path / "job.yaml",
        [str(shared(p)) for p in SLOVENIA[:1]],
        dynamicworld_model,
        str(root),
        tiling={"tile_size": 200, "overlap": 96},
    )
    procs = [
        subprocess.Popen(
            [GEOSEG, "-q", "run", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outcomes = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs if p.stderr)
    (ok_code, ok_err), (busy_code, busy_err) = outcomes
    assert (ok_code, busy_code) == (0, EXIT_BUSY), outcomes
    assert "1 new, 0 unchanged, 0 failed" in ok_err
    assert "another geoseg run holds this output root" in busy_err
    assert str(root) in busy_err
    assert manifest(root)[str(shared(SLOVENIA[0]))]["status"] == "ok"


# ------------------------------------------------------------------------------- kill -9, resume


def make_scenes(folder: Path, count: int) -> list[Path]:
    """``count`` 3 x 3 mosaics of a real aerial tile (flipped differently each) on its grid."""
    source = shared(AERIAL_TILE)
    with rasterio.open(source) as src:
        image = src.read()
        profile = src.profile
    folder.mkdir()
    paths = []
    for k in range(count):
        rows = [
            np.concatenate(
                [image[:, :: 1 - 2 * ((k + r + c) % 2), ::-1 if (k + r) % 3 == 0 else 1]
                 for c in range(3)], axis=2,
            )
            for r in range(3)
        ]  # fmt: skip
        mosaic = np.ascontiguousarray(np.concatenate(rows, axis=1))
        profile.update(height=mosaic.shape[1], width=mosaic.shape[2], tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate")  # fmt: skip
        path = folder / f"mosaic_{k}.tif"
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(mosaic)
        paths.append(path)
    return paths


def test_kill_9_mid_run_then_rerun_equals_an_uninterrupted_run(
    tmp_path: Path, trained_aerial_model: Path, ray_local: None
) -> None:
    make_scenes(tmp_path / "in", 4)
    sections = {
        "tiling": {"tile_size": 128, "overlap": 32},
        "outputs": {"polygons": {"formats": ["gpkg"]}, "confidence": True},
    }

    def config_for(root: Path) -> Path:
        path = write_config(
            tmp_path / f"{root.name}.yaml",
            [f"{tmp_path}/in/*.tif"],
            trained_aerial_model,
            str(root),
            tiling=sections["tiling"],
        )
        data = yaml.safe_load(path.read_text())
        data["outputs"] = {"root": str(root), **sections["outputs"]}
        path.write_text(yaml.safe_dump(data))
        return path

    clean_root = tmp_path / "clean"
    clean = CliRunner().invoke(main, ["-q", "run", str(config_for(clean_root))])
    assert clean.exit_code == 0, clean.output

    root = tmp_path / "resumed"
    driver = subprocess.Popen(
        [GEOSEG, "-q", "run", str(config_for(root))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # kill once a scene is committed and one is running
            try:
                statuses = [r["status"] for r in manifest(root).values()]
            except (FileNotFoundError, json.JSONDecodeError):
                statuses = []
            if "ok" in statuses and "running" in statuses:
                break
            assert driver.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        else:
            pytest.fail("no scene was committed in time")
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        # The driver is dead; the embedded Ray it started would linger a while: clean it up.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    at_kill = manifest(root)
    committed = {u: r for u, r in at_kill.items() if r["status"] == "ok"}
    assert 1 <= len(committed) < 4
    assert json.loads((root / LOCK_KEY).read_text())["pid"] == driver.pid  # left behind

    rerun = subprocess.run(
        [GEOSEG, "-q", "run", str(config_for(root))],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert summary_line(rerun.stderr).startswith(
        f"{4 - len(committed)} new, {len(committed)} unchanged, 0 failed"
    )
    assert "took over a stale lock" in rerun.stderr or "took over" in rerun.stderr
    final = manifest(root)
    for uri, record in committed.items():
        assert final[uri] == record  # not redone
    assert not [p for p in root.iterdir() if p.name.startswith(".") and p.is_dir()]
    assert not (root / LOCK_KEY).exists()

    names = sorted(p.name for p in clean_root.iterdir() if p.name.startswith("mosaic_"))
    assert names == [f"mosaic_{k}" for k in range(4)]
    for name in names:
        for raster in ("mask.tif", "confidence.tif"):
            assert (root / name / raster).read_bytes() == (clean_root / name / raster).read_bytes()
        resumed_features = features(root / name / "polygons.gpkg")
        assert resumed_features == features(clean_root / name / "polygons.gpkg")
        assert len(resumed_features) > 0


# ------------------------------------------------------------------------------------------- S3


def test_s3_bucket_in_and_out_rerun_processes_exactly_the_new_object(
    tmp_path: Path, s3_endpoint: str, dynamicworld_model: Path
) -> None:
    make_bucket(s3_endpoint, "imagery")
    make_bucket(s3_endpoint, "landcover")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")  # fake keys: env
    for relative in SLOVENIA[:2]:
        s3.upload_file(str(shared(relative)), "imagery", f"s2/2024/{Path(relative).name}")
    config = tmp_path / "job.yaml"
    write_config(
        config,
        ["s3://imagery/s2/**.tif"],
        dynamicworld_model,
        "s3://landcover/nightly",
        tiling={"tile_size": 200, "overlap": 96},
        storage={
            "endpoint_url": s3_endpoint,
            "region": "us-east-1",
            "virtual_hosting": False,
            "http_retries": 2,
            "retry_delay_s": 0.1,
        },
    )
    env = {**os.environ, **FAKE_CREDENTIALS, "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)

    def geoseg_run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [GEOSEG, "run", str(config)],
            capture_output=True, text=True, env=env, timeout=600, check=False,
        )  # fmt: skip

    first = geoseg_run()
    assert first.returncode == 0, first.stderr[-3000:]
    assert summary_line(first.stderr).startswith("2 new, 0 unchanged, 0 failed")

    s3.upload_file(str(shared(SLOVENIA[2])), "imagery", "s2/2024/scene_4.tif")
    second = geoseg_run()
    assert second.returncode == 0, second.stderr[-3000:]
    assert summary_line(second.stderr).startswith("1 new, 2 unchanged, 0 failed")

    keys = sorted(
        o["Key"] for o in s3.list_objects_v2(Bucket="landcover", Prefix="nightly/")["Contents"]
    )
    for name in ("2024_scene_2", "2024_scene_3", "2024_scene_4"):
        assert f"nightly/{name}/mask.tif" in keys
        assert f"nightly/{name}/polygons.gpkg" in keys
        assert f"nightly/quicklooks/{name}.png" in keys
    for key in ("manifest.json", "run.json", "report.json", "report.html"):
        assert f"nightly/{key}" in keys
    assert f"nightly/{LOCK_KEY}" not in keys
    manifest_s3 = json.loads(
        s3.get_object(Bucket="landcover", Key="nightly/manifest.json")["Body"].read()
    )
    assert sorted(manifest_s3["scenes"]) == [
        f"s3://imagery/s2/2024/scene_{i}.tif" for i in (2, 3, 4)
    ]
    assert {r["identity"].split(";")[0][:5] for r in manifest_s3["scenes"].values()} == {"etag="}

    local_mask = tmp_path / "mask.tif"
    s3.download_file("landcover", "nightly/2024_scene_4/mask.tif", str(local_mask))
    with rasterio.open(local_mask) as src:
        assert (src.height, src.width) == (101, 100)
        assert src.crs.to_epsg() == 32633
        counts = np.bincount(src.read(1).ravel())
    recorded = manifest_s3["scenes"]["s3://imagery/s2/2024/scene_4.tif"]["class_pixels"]
    assert sum(recorded.values()) == 101 * 100 == counts.sum()

    # Credentials never reach an output or the log.
    secret = FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    key_id = FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"]
    for key in keys:
        body = s3.get_object(Bucket="landcover", Key=key)["Body"].read()
        assert secret.encode() not in body and key_id.encode() not in body, key
    for output in (first.stdout, first.stderr, second.stdout, second.stderr):
        assert secret not in output and key_id not in output


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_run_cleanly_and_a_rerun_resumes(
    tmp_path: Path, trained_aerial_model: Path, ray_local: None, signum: signal.Signals
) -> None:
    make_scenes(tmp_path / "in", 3)
    root = tmp_path / "out"
    config = write_config(
        tmp_path / "job.yaml",
        [f"{tmp_path}/in/*.tif"],
        trained_aerial_model,
        str(root),
        tiling={"tile_size": 128, "overlap": 32},
    )
    # Started from a background shell, pytest (and so the run) inherits SIGINT ignored, and Python
    # then leaves it ignored, as any program does in a shell's background job: the run would not
    # stop. A handled signal is reset to the default across exec, which Python maps to Ctrl-C.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        driver = subprocess.Popen(
            [GEOSEG, "-q", "run", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    finally:
        signal.signal(signal.SIGINT, inherited)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # signal it while a scene is being segmented
            try:
                statuses = [r["status"] for r in manifest(root).values()]
            except (FileNotFoundError, json.JSONDecodeError):
                statuses = []
            if "running" in statuses:
                break
            assert driver.poll() is None, "the run ended before it could be stopped"
            time.sleep(0.02)
        else:
            pytest.fail("no scene started in time")
        sent = time.monotonic()
        driver.send_signal(signum)
        _, stderr = driver.communicate(timeout=30)
        stopped_after = time.monotonic() - sent
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, stderr[-2000:]
    assert stopped_after < 15
    assert "Interrupted: committed scenes are kept" in stderr
    assert not (root / LOCK_KEY).exists()  # released
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # nothing partial
    committed = {u: r for u, r in manifest(root).items() if r["status"] == "ok"}
    for record in committed.values():
        assert (root / record["name"] / "mask.tif").is_file()
    unfinished = [r["name"] for r in manifest(root).values() if r["status"] != "ok"]
    assert unfinished and not any((root / name).exists() for name in unfinished)

    rerun = CliRunner().invoke(main, ["-q", "run", str(config)])
    assert rerun.exit_code == 0, rerun.output
    assert summary_line(rerun.output).startswith(
        f"{3 - len(committed)} new, {len(committed)} unchanged, 0 failed"
    )


def test_fail_fast_stops_at_the_first_failed_scene(
    tmp_path: Path, ray_local: None, dynamicworld_model: Path
) -> None:
    inbox, _, base_config = slovenia_job(tmp_path, dynamicworld_model)
    (inbox / "a_broken.tif").write_bytes(b"not a raster")  # sorts first
    outcomes = {True: "0 new, 0 unchanged, 1 failed", False: "2 new, 0 unchanged, 1 failed"}
    for fail_fast, expected in outcomes.items():
        job = yaml.safe_load(base_config.read_text())
        job["runtime"] = {"fail_fast": fail_fast}
        job["outputs"]["root"] = str(tmp_path / f"out-{fail_fast}")
        config = tmp_path / f"job-{fail_fast}.yaml"
        config.write_text(yaml.safe_dump(job))
        result = CliRunner().invoke(main, ["-q", "run", str(config)])
        assert result.exit_code == 1, result.output
        assert summary_line(result.output).startswith(expected)
        assert f"FAILED {inbox / 'a_broken.tif'}: " in result.output


def test_embedded_ray_serves_no_dashboard(ray_local: None) -> None:
    import ray

    # No dashboard, so no Jobs API or dashboard port is opened by a local run at all.
    assert not ray._private.worker.global_worker.node.address_info.get("webui_url")
