"""S3 reliability: `geoseg run` reading inputs through a fault-injecting proxy in front of the moto
S3 server. A server that answers 503/429 for a while is retried with back-off and the run succeeds;
an object that stays unavailable fails its scene clearly while the other scenes complete.

`geoseg` runs as a subprocess: the proxy serves from threads of this process (see faultproxy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import rasterio
import yaml
from conftest import shared
from faultproxy import Fault, FaultProxy, fault_proxy
from s3server import FAKE_CREDENTIALS, make_bucket

GEOSEG = str(Path(sys.executable).parent / "geoseg")
SCENES = [f"sentinel2-l1c-slovenia/scene_{i}.tif" for i in (2, 3)]


@pytest.fixture(scope="module")
def dynamicworld_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from geoseg.models.dynamicworld import import_dynamicworld

    out = tmp_path_factory.mktemp("models") / "dynamicworld"
    import_dynamicworld(shared("models/dynamicworld/forward"), out)
    return out


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    with fault_proxy(s3_endpoint) as started:
        yield started


def upload(endpoint: str, bucket: str, relatives: list[str]) -> list[str]:
    """Put the shared scenes under ``s3://bucket/s2/``; their URIs."""
    make_bucket(endpoint, bucket)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")  # fake keys: env
    uris = []
    for relative in relatives:
        key = f"s2/{Path(relative).name}"
        s3.upload_file(str(shared(relative)), bucket, key)
        uris.append(f"s3://{bucket}/{key}")
    return uris


def geoseg_run(
    tmp_path: Path, bucket: str, model: Path, endpoint: str, root: Path, http_retries: int
) -> subprocess.CompletedProcess[str]:
    config: dict[str, Any] = {
        "inputs": [{"path": f"s3://{bucket}/s2/**.tif"}],
        "model": str(model),
        "outputs": {"root": str(root), "polygons": {"formats": ["gpkg"]}},
        "tiling": {"tile_size": 200, "overlap": 96},
        "storage": {
            "endpoint_url": endpoint,
            "region": "us-east-1",
            "virtual_hosting": False,
            "http_retries": http_retries,
            "retry_delay_s": 0.05,
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, **FAKE_CREDENTIALS, "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [GEOSEG, "run", str(path)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip


def summary_line(output: str) -> str:
    return next(line for line in output.splitlines() if " new, " in line)


def scenes(root: Path) -> dict[str, dict[str, Any]]:
    return {s["uri"]: s for s in json.loads((root / "run.json").read_text())["scenes"]}


def assert_retried(proxy: FaultProxy, fault: Fault) -> None:
    """Every request the fault answered was retried and later succeeded."""
    log = proxy.requests
    answered = [i for i, request in enumerate(log) if request.fault is fault]
    assert len(answered) == fault.injected
    for i in answered:
        failed = log[i]
        assert any(
            (r.method, r.path, r.range) == (failed.method, failed.path, failed.range)
            and r.status < 300
            for r in log[i + 1 :]
        ), failed


def test_transient_5xx_and_429_are_retried_and_the_run_succeeds(
    tmp_path: Path, s3_endpoint: str, proxy: FaultProxy, dynamicworld_model: Path
) -> None:
    (uri,) = upload(s3_endpoint, "faults-transient", SCENES[:1])
    # Every read of the object (the driver's open, the workers' tile reads) fails twice, 503 then
    # 429, before its second retry gets through; the listing fails once.
    pixels = proxy.add(
        Fault(
            path="/faults-transient/s2/scene_2.tif",
            statuses=(503, 429),
            times=2,
            per_range=True,
        )
    )
    listing = proxy.add(Fault(path="/faults-transient?list-type=2", statuses=(503,), times=1))
    root = tmp_path / "out"

    run = geoseg_run(tmp_path, "faults-transient", dynamicworld_model, proxy.url, root, 4)

    assert run.returncode == 0, run.stderr[-3000:]
    assert summary_line(run.stderr).startswith("1 new, 0 unchanged, 0 failed")
    failed_reads = {r.range for r in proxy.requests if r.fault is pixels}
    assert len(failed_reads) >= 2  # the driver's open and the workers' tile reads, at least
    assert pixels.injected == 2 * len(failed_reads)
    assert pixels.injected_statuses.count(503) == pixels.injected_statuses.count(429)
    assert listing.injected == 1  # boto3's listing
    assert_retried(proxy, pixels)
    assert_retried(proxy, listing)
    record = scenes(root)[uri]
    assert record["status"] == "ok"
    with rasterio.open(root / record["name"] / "mask.tif") as src:
        assert (src.height, src.width) == (101, 100)
        assert src.crs.to_epsg() == 32633


def test_object_that_stays_unavailable_fails_its_scene_only(
    tmp_path: Path, s3_endpoint: str, proxy: FaultProxy, dynamicworld_model: Path
) -> None:
    down, fine = upload(s3_endpoint, "faults-down", SCENES)
    fault = proxy.add(Fault(path="/faults-down/s2/scene_2.tif", statuses=(503,)))
    root = tmp_path / "out"

    run = geoseg_run(tmp_path, "faults-down", dynamicworld_model, proxy.url, root, 2)

    assert run.returncode == 1, run.stderr[-3000:]
    assert summary_line(run.stderr).startswith("1 new, 0 unchanged, 1 failed")
    assert fault.injected >= 3  # the first attempt and both retries, at least
    recorded = scenes(root)
    failed = recorded[down]
    assert failed["status"] == "failed"
    assert failed["error_type"] == "StorageError", failed
    assert failed["error"].startswith(f"{down}: could not open it: the request failed: "), failed
    assert "Please reduce your request rate." in failed["error"]  # S3's own message
    assert "retried 2 time(s)" in failed["error"] and "endpoint_url" in failed["error"]
    assert "/vsis3/" not in failed["error"] and "GeoTIFF" not in failed["error"]
    assert recorded[fine]["status"] == "ok"
    name = recorded[fine]["name"]
    for output in ("mask.tif", "confidence.tif", "polygons.gpkg"):
        assert (root / name / output).is_file(), output
    manifest = json.loads((root / "manifest.json").read_text())["scenes"]
    assert manifest[fine]["status"] == "ok"
    assert manifest[down]["status"] == "failed" and manifest[down]["error"] == failed["error"]
    # Nothing partial of the failed scene: no output folder, no hidden temporary folders.
    assert failed["name"] != name and not (root / failed["name"]).exists()
    assert not [p.name for p in root.iterdir() if p.name.startswith(".") and p.is_dir()]


# Opens the scene, then waits for a line on stdin (the test breaks the object meanwhile) and reads
# a tile; prints the error's type and message as JSON.
READ_AFTER_OPEN = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    from geoseg.io.rasters import open_scene, read_tile
    from geoseg.io.storage import S3Settings, gdal_options
    from geoseg.models.card import read_card

    endpoint, path, model = sys.argv[1:]
    settings = S3Settings(
        endpoint_url=endpoint, region="us-east-1", virtual_hosting=False,
        http_retries=1, retry_delay_s=0.05,
    )
    scene = open_scene(path, read_card(Path(model)), gdal_env=gdal_options(settings))
    print("opened", flush=True)
    sys.stdin.readline()
    try:
        read_tile(scene, 0, 0, 64, 64)
        print(json.dumps(None))
    except Exception as exc:
        print(json.dumps([type(exc).__name__, str(exc)]))
    """
)


def test_object_that_goes_down_after_open_fails_the_tile_read_clearly(
    s3_endpoint: str, proxy: FaultProxy, dynamicworld_model: Path
) -> None:
    (uri,) = upload(s3_endpoint, "faults-midread", SCENES[:1])
    env = {**os.environ, **FAKE_CREDENTIALS}
    reader = subprocess.Popen(
        [sys.executable, "-c", READ_AFTER_OPEN, proxy.url, "/vsis3/faults-midread/s2/scene_2.tif",
         str(dynamicworld_model)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert reader.stdout is not None and reader.stdout.readline() == "opened\n"
        fault = proxy.add(Fault(path="/faults-midread/s2/scene_2.tif", statuses=(500, 503)))
        out, _ = reader.communicate("go\n", timeout=60)
    finally:
        reader.kill()
    error_type, message = json.loads(out)
    assert error_type == "StorageError"
    # GDAL reports the failed requests as a short read: not to be taken for a truncated file.
    assert message.startswith(f"{uri}: could not read rows 0:64, cols 0:64: the request failed: ")
    assert "HTTP 500" in message or "HTTP 503" in message
    assert "retried 1 time(s)" in message and "corrupt" not in message
    assert fault.injected >= 2  # the first attempt and its one retry, at least
