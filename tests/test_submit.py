"""geoseg.engine.submit against a real Ray head with token authentication (tests/raycluster.py)."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from geoseg.engine import submit as jobs
from geoseg.errors import ConfigError

if TYPE_CHECKING:
    # Imported for the type only: importing the plugin module first would keep pytest from
    # rewriting its asserts.
    from raycluster import RayHead

pytest_plugins = ["raycluster"]  # the ray_head fixture


def _job_dir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir(parents=True)
    (work / "greeting.txt").write_text("hello from geoseg job\n")
    return work


def _wait_for(address: str, job_id: str, wanted: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (status := jobs.job_status(address, job_id)) != wanted:
        assert status not in jobs.TERMINAL_STATUSES, f"{job_id} ended {status}, not {wanted}"
        assert time.monotonic() < deadline, f"{job_id} still {status} after {timeout_s} s"
        time.sleep(0.5)


def test_submission_id_is_deterministic() -> None:
    a = jobs.submission_id("cfg-digest", ["s3://b/x.tif@etag1", "s3://b/y.tif@etag2"])
    assert re.fullmatch(r"geoseg-[0-9a-f]{16}", a)
    assert a == jobs.submission_id("cfg-digest", ["s3://b/y.tif@etag2", "s3://b/x.tif@etag1"])
    assert a != jobs.submission_id("cfg-digest2", ["s3://b/x.tif@etag1", "s3://b/y.tif@etag2"])
    assert a != jobs.submission_id("cfg-digest", ["s3://b/x.tif@etag1", "s3://b/y.tif@etag3"])
    # The parts are framed: moving characters between the digest and an input changes the id.
    assert jobs.submission_id("ab", ["c"]) != jobs.submission_id("a", ["bc"])


def test_the_head_requires_the_token(ray_head: RayHead) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_head.dashboard_url}/api/jobs/", timeout=5)
    assert refused.value.code == 401


def test_submit_wait_logs_and_duplicate(ray_head: RayHead, tmp_path: Path) -> None:
    address = ray_head.dashboard_url
    job_id = jobs.submission_id("test-config", ["hello"])
    # Reads a file of working_dir and an env var: both travel with the job.
    entrypoint = (
        "python -c \"import os; print(open('greeting.txt').read().strip(), "
        "os.environ['GEOSEG_TEST_VAR'])\""
    )
    env = {"GEOSEG_TEST_VAR": "with env"}
    assert jobs.submit(address, entrypoint, job_id, _job_dir(tmp_path), env) == job_id

    assert jobs.wait(address, job_id, timeout_s=60) == "SUCCEEDED"
    assert "hello from geoseg job with env" in jobs.job_logs(address, job_id)
    assert "hello from geoseg job with env" in "".join(jobs.follow_logs(address, job_id))

    with pytest.raises(jobs.DuplicateSubmissionError, match=rf"{job_id}.*SUCCEEDED"):
        jobs.submit(address, entrypoint, job_id, _job_dir(tmp_path / "again"), env)


def test_stop_a_running_job(ray_head: RayHead, tmp_path: Path) -> None:
    address = ray_head.dashboard_url
    job_id = jobs.submission_id("test-config", ["sleeper"])
    entrypoint = 'python -c "import time; time.sleep(600)"'
    jobs.submit(address, entrypoint, job_id, _job_dir(tmp_path))
    _wait_for(address, job_id, "RUNNING")

    with pytest.raises(jobs.DuplicateSubmissionError, match=rf"{job_id}.*RUNNING"):
        jobs.submit(address, entrypoint, job_id, _job_dir(tmp_path / "again"))

    assert jobs.stop_job(address, job_id) is True
    assert jobs.wait(address, job_id, timeout_s=30) == "STOPPED"
    assert jobs.stop_job(address, job_id) is False


def test_unknown_job_is_a_clear_error(ray_head: RayHead) -> None:
    address = ray_head.dashboard_url
    unknown = "geoseg-0000000000000000"
    for call in (jobs.job_status, jobs.job_logs, jobs.stop_job):
        with pytest.raises(ConfigError, match=f"no job '{unknown}' on the Ray cluster at"):
            call(address, unknown)
    with pytest.raises(ConfigError, match="no job"):
        list(jobs.follow_logs(address, unknown))


def test_missing_or_wrong_token_is_a_clear_error(
    ray_head: RayHead, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    address = ray_head.dashboard_url
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token to fall back on
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_MODE")
    with pytest.raises(ConfigError, match="requires a token and none was found"):
        jobs.job_status(address, "geoseg-0000000000000000")

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(ConfigError, match="no Ray token was found"):
        jobs.job_status(address, "geoseg-0000000000000000")

    wrong = "not-the-token-0123456789"
    monkeypatch.setenv("RAY_AUTH_TOKEN", wrong)
    with pytest.raises(ConfigError, match="refused the token from RAY_AUTH_TOKEN") as refused:
        jobs.job_status(address, "geoseg-0000000000000000")
    assert wrong not in str(refused.value)

    token_file = tmp_path / "token"
    token_file.write_text(ray_head.env["RAY_AUTH_TOKEN"] + "\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    with pytest.raises(ConfigError, match="no job"):
        jobs.job_status(address, "geoseg-0000000000000000")


def test_submit_refuses_bad_arguments_before_contacting_ray(tmp_path: Path) -> None:
    nowhere = "http://127.0.0.1:9"  # discard port: a call that got this far would fail otherwise
    with pytest.raises(ConfigError, match="must not carry RAY_AUTH_TOKEN"):
        jobs.submit(nowhere, "true", "geoseg-x", tmp_path, {"RAY_AUTH_TOKEN": "x"})
    with pytest.raises(ConfigError, match="is not a directory"):
        jobs.submit(nowhere, "true", "geoseg-x", tmp_path / "missing")
    with pytest.raises(ConfigError, match="dashboard's URL"):
        jobs.job_status("127.0.0.1:6379", "geoseg-x")


def test_geoseg_submit_runs_the_job_on_the_cluster_and_refuses_a_duplicate(
    ray_head: RayHead, tmp_path: Path, rgb_model: Path
) -> None:
    """`geoseg submit CONFIG` -> SUCCEEDED with outputs; the same config and inputs again -> 3."""
    import json
    import os
    import subprocess
    import sys

    import rasterio
    import yaml
    from conftest import shared

    geoseg = str(Path(sys.executable).parent / "geoseg")
    image = shared("landsat7-rgb/RGB.byte.tif")
    root = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "inputs": [{"path": str(image)}],
                "model": str(rgb_model),
                "tiling": {"tile_size": 256, "overlap": 32},
                "outputs": {"root": str(root), "polygons": {"enabled": False}},
                "runtime": {"lock_ttl_s": 60},
            }
        )
    )
    env = {**os.environ, **ray_head.env}
    env.pop("RAY_ADDRESS", None)
    submit = [geoseg, "-q", "submit", str(config), "--address", ray_head.dashboard_url]

    first = subprocess.run(
        [*submit, "--wait"], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    job_id = first.stdout.splitlines()[0]
    assert re.fullmatch(r"geoseg-[0-9a-f]{16}", job_id)
    assert "1 new, 0 unchanged, 0 failed" in first.stdout  # the job's own log, followed
    assert jobs.job_status(ray_head.dashboard_url, job_id) == "SUCCEEDED"
    status = subprocess.run(
        [geoseg, "status", job_id, "--address", ray_head.dashboard_url],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert (status.returncode, status.stdout.strip()) == (0, "SUCCEEDED")
    logs = subprocess.run(
        [geoseg, "logs", job_id, "--address", ray_head.dashboard_url],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert logs.returncode == 0 and "1 new, 0 unchanged, 0 failed" in logs.stdout

    with rasterio.open(root / "RGB.byte" / "mask.tif") as mask, rasterio.open(image) as src:
        assert (mask.height, mask.width) == (src.height, src.width) == (718, 791)
        assert mask.crs == src.crs
        assert mask.transform == src.transform
    manifest = json.loads((root / "manifest.json").read_text())["scenes"]
    assert [r["status"] for r in manifest.values()] == ["ok"]
    run = json.loads((root / "run.json").read_text())
    assert run["summary"] == {"new": 1, "unchanged": 0, "failed": 0}

    duplicate = subprocess.run(
        submit, capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert duplicate.returncode == 3, duplicate.stderr
    assert f"job {job_id} exists already" in duplicate.stderr
    assert "status SUCCEEDED" in duplicate.stderr
