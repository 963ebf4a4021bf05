"""geoseg.io.storage against a real S3 API (moto's server on loopback) and real local files."""

from __future__ import annotations

import hashlib
import http.server
import multiprocessing
import os
import socketserver
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import numpy as np
import pydantic
import pytest
import rasterio
from conftest import shared
from rasterio.windows import Window
from s3server import (
    FAKE_CREDENTIALS,
    free_port,
    make_bucket,
    s3_endpoint,  # noqa: F401  (registers the session fixture here)
)

from geoseg.errors import StorageError, UnsafeOutputNameError
from geoseg.io.storage import (
    LocalStore,
    OutputStore,
    S3Settings,
    gdal_options,
    gdal_path,
    input_identity,
    is_s3,
    list_inputs,
    open_store,
)

RACERS = 8


@pytest.fixture
def endpoint(request: pytest.FixtureRequest) -> str:
    """``http://127.0.0.1:PORT`` of the session's moto server (fixture ``s3_endpoint``)."""
    return str(request.getfixturevalue("s3_endpoint"))


@pytest.fixture
def settings(endpoint: str) -> S3Settings:
    return S3Settings(
        endpoint_url=endpoint, region="us-east-1", virtual_hosting=False, retry_delay_s=0.1
    )


@pytest.fixture
def bucket(endpoint: str) -> str:
    name = f"geoseg-{uuid.uuid4().hex[:12]}"
    make_bucket(endpoint, name)
    return name


def _client(endpoint: str) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where test objects live: a local folder or a fresh bucket (its URI prefix)."""
    if request.param == "local":
        return str(tmp_path / "objects")
    return f"s3://{request.getfixturevalue('bucket')}"


@pytest.fixture
def put(backend: str, endpoint: str) -> Callable[[str, bytes], str]:
    """Write bytes at ``<backend>/<key>``; the object's URI."""
    client = _client(endpoint)

    def write(key: str, data: bytes) -> str:
        if is_s3(backend):
            client.put_object(Bucket=backend.removeprefix("s3://"), Key=key, Body=data)
            return f"{backend}/{key}"
        path = Path(backend) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    return write


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, settings: S3Settings) -> OutputStore:
    if request.param == "local":
        return open_store(str(tmp_path / "out"), settings)
    return open_store(f"s3://{request.getfixturevalue('bucket')}/runs/out", settings)


# ------------------------------------------------------------------------------ paths, options


def test_gdal_path_and_is_s3() -> None:
    assert gdal_path("s3://bkt/in/a b.tif") == "/vsis3/bkt/in/a b.tif"
    assert gdal_path("/data/in/a.tif") == "/data/in/a.tif"
    assert is_s3("s3://bkt/k")
    assert not is_s3("/vsis3/bkt/k")
    assert not is_s3("data/s3://x")


def test_gdal_options() -> None:
    codes = (
        {"GDAL_HTTP_RETRY_CODES": "429,500,502,503,504"}
        if tuple(int(p) for p in rasterio.__gdal_version__.split(".")[:2]) >= (3, 10)
        else {}
    )
    local = S3Settings(
        endpoint_url="http://127.0.0.1:9000",
        region="eu-west-1",
        virtual_hosting=False,
        http_retries=3,
        retry_delay_s=0.5,
    )
    assert gdal_options(local) == {
        "GDAL_HTTP_MAX_RETRY": "3",
        "GDAL_HTTP_RETRY_DELAY": "0.5",
        "AWS_VIRTUAL_HOSTING": "FALSE",
        "AWS_S3_ENDPOINT": "127.0.0.1:9000",
        "AWS_HTTPS": "NO",
        "AWS_REGION": "eu-west-1",
        **codes,
    }
    assert gdal_options(S3Settings(endpoint_url="https://minio.example.org")) == {
        "GDAL_HTTP_MAX_RETRY": "5",
        "GDAL_HTTP_RETRY_DELAY": "1.0",
        "AWS_VIRTUAL_HOSTING": "TRUE",
        "AWS_S3_ENDPOINT": "minio.example.org",
        "AWS_HTTPS": "YES",
        **codes,
    }
    assert "AWS_S3_ENDPOINT" not in gdal_options(S3Settings())


@pytest.mark.parametrize(
    "fields",
    [
        {"endpoint_url": "http://user:pw@127.0.0.1:9000"},
        {"endpoint_url": "http://127.0.0.1:9000/some/path"},
        {"endpoint_url": "ftp://127.0.0.1"},
        {"http_retries": -1},
        {"retry_delay_s": 0},
        {"access_key": "AKIA..."},
    ],
)
def test_settings_refuse(fields: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        S3Settings(**fields)


def test_gdal_reads_through_vsis3(settings: S3Settings, bucket: str, endpoint: str) -> None:
    local = shared("sentinel2-l1c-slovenia/scene_0.tif")
    _client(endpoint).upload_file(str(local), bucket, "in/scene_0.tif")
    window = Window(10, 20, 40, 30)
    with rasterio.open(local) as src:
        expected = src.read(window=window)
        profile = (src.crs, src.transform, src.count, src.descriptions)
    with (
        rasterio.Env(**gdal_options(settings)),
        rasterio.open(gdal_path(f"s3://{bucket}/in/scene_0.tif")) as src,
    ):
        got = src.read(window=window)
        assert (src.crs, src.transform, src.count, src.descriptions) == profile
    assert got.shape == (13, 30, 40)
    np.testing.assert_array_equal(got, expected)


class _FlakyS3(http.server.BaseHTTPRequestHandler):
    """Serves ``body`` at ``path`` (404 elsewhere: no sidecars), after answering the first
    ``failures`` requests for it with 503."""

    path = ""
    body = b""
    failures = 0
    statuses: list[int] = []  # noqa: RUF012  (shared on purpose: the test reads it)

    def log_message(self, format: str, *args: object) -> None:
        """Silent: the test asserts on ``statuses``."""

    def _answer(self, send_body: bool) -> None:
        if self.path != self.__class__.path:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.__class__.failures > 0:
            self.__class__.failures -= 1
            self.statuses.append(503)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = self.body
        start, end = 0, len(data) - 1
        if rng := self.headers.get("Range"):
            first, last = rng.removeprefix("bytes=").split("-")
            start, end = int(first), min(int(last), end)
        self.statuses.append(206 if rng else 200)
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if send_body:
            self.wfile.write(data[start : end + 1])

    def do_GET(self) -> None:
        self._answer(True)

    def do_HEAD(self) -> None:
        self._answer(False)


def test_gdal_options_retry_transient_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two 503s: read with 2 retries; fail with none (GDAL itself retries, no mocks)."""
    for name, value in FAKE_CREDENTIALS.items():  # else GDAL asks the EC2 metadata service
        monkeypatch.setenv(name, value)
    local = shared("sentinel2-l1c-slovenia/scene_1.tif")
    _FlakyS3.body = local.read_bytes()
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _FlakyS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for retries, name in ((2, "ok"), (0, "fails")):
            _FlakyS3.path, _FlakyS3.failures, _FlakyS3.statuses = f"/bkt/{name}.tif", 2, []
            options = gdal_options(
                S3Settings(
                    endpoint_url=endpoint,
                    virtual_hosting=False,
                    http_retries=retries,
                    retry_delay_s=0.01,
                )
            )
            # EMPTY_DIR: GDAL must not probe sidecars later, from calls made while holding the
            # GIL, which this in-process server could never answer.
            with rasterio.Env(**options, GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):
                if retries:
                    with rasterio.open(f"/vsis3/bkt/{name}.tif") as src:
                        assert src.read(3).shape == (101, 100)
                    assert _FlakyS3.statuses[:3] == [503, 503, 206]
                else:
                    with pytest.raises(rasterio.errors.RasterioIOError):
                        rasterio.open(f"/vsis3/bkt/{name}.tif")
                    assert _FlakyS3.statuses[:1] == [503]
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------- listing

OBJECTS = [
    "in/a.tif",
    "in/ab.tif",
    "in/sub/b.tif",
    "in/sub/b.tif.aux.xml",
    "in/sub/deep/c.TIF",
    "other/x.tif",
]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("in/**.tif", ["in/a.tif", "in/ab.tif", "in/sub/b.tif"]),
        ("in/**/*.tif", ["in/a.tif", "in/ab.tif", "in/sub/b.tif"]),
        ("in/*.tif", ["in/a.tif", "in/ab.tif"]),
        ("in/?.tif", ["in/a.tif"]),
        ("in/*/?.tif", ["in/sub/b.tif"]),
        ("in/**/c.TIF", ["in/sub/deep/c.TIF"]),
        (
            "**.[tT][iI][fF]",
            ["in/a.tif", "in/ab.tif", "in/sub/b.tif", "in/sub/deep/c.TIF", "other/x.tif"],
        ),
        ("in/[!a]*/**", ["in/sub/b.tif", "in/sub/b.tif.aux.xml", "in/sub/deep/c.TIF"]),
        ("in/sub/b.tif", ["in/sub/b.tif"]),
        ("in/none*.tif", []),
        ("missing/**.tif", []),
    ],
)
def test_list_inputs_globs(
    pattern: str,
    expected: list[str],
    backend: str,
    put: Callable[[str, bytes], str],
    settings: S3Settings,
) -> None:
    uris = {key: put(key, key.encode() * 3) for key in OBJECTS}
    found = list_inputs(f"{backend}/{pattern}", settings)
    assert [obj.uri for obj in found] == [uris[key] for key in expected]
    for obj, key in zip(found, expected, strict=True):
        assert obj.size == len(key) * 3
        if is_s3(backend):
            assert (
                obj.identity == f"etag={hashlib.md5(key.encode() * 3).hexdigest()};size={obj.size}"
            )
        else:
            st = os.stat(obj.uri)
            assert obj.identity == f"size={st.st_size};mtime_ns={st.st_mtime_ns}"
            assert os.path.isabs(obj.uri)


def test_identity_follows_overwrites(
    backend: str, put: Callable[[str, bytes], str], settings: S3Settings
) -> None:
    uri = put("in/a.tif", b"first")
    [listed] = list_inputs(f"{backend}/in/*.tif", settings)
    assert input_identity(uri, settings) == listed.identity
    put("in/a.tif", b"second version")
    changed = input_identity(uri, settings)
    assert changed != listed.identity
    assert changed == list_inputs(f"{backend}/in/*.tif", settings)[0].identity
    if is_s3(backend):  # same size, new bytes: the ETag alone tells them apart
        put("in/a.tif", b"SECOND VERSION")
        assert input_identity(uri, settings) not in (changed, listed.identity)


def test_missing_input_is_a_storage_error(backend: str, settings: S3Settings) -> None:
    uri = f"{backend}/in/gone.tif"
    with pytest.raises(StorageError, match=r"gone\.tif"):
        input_identity(uri, settings)


def test_missing_bucket_names_the_uri_and_no_secret(settings: S3Settings) -> None:
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    bucket = f"geoseg-missing-{uuid.uuid4().hex[:8]}"
    calls: list[tuple[str, Callable[[], object]]] = [
        (f"s3://{bucket}/in/**.tif", lambda: list_inputs(f"s3://{bucket}/in/**.tif", settings)),
        (f"s3://{bucket}/in/a.tif", lambda: input_identity(f"s3://{bucket}/in/a.tif", settings)),
        (f"s3://{bucket}/out", lambda: open_store(f"s3://{bucket}/out", settings)),
    ]
    for uri, call in calls:
        with pytest.raises(StorageError) as caught:
            call()
        message = str(caught.value)
        assert uri in message
        assert secret not in message
        assert FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in message
    with pytest.raises(StorageError, match="NoSuchBucket"):
        list_inputs(f"s3://{bucket}/in/**.tif", settings)


def test_unreachable_endpoint_is_a_storage_error() -> None:
    dead = S3Settings(
        endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1", http_retries=0
    )
    with pytest.raises(StorageError, match=r"s3://bkt/in/\*\.tif: could not list inputs"):
        list_inputs("s3://bkt/in/*.tif", dead)


# ---------------------------------------------------------------------------------- stores


def test_store_round_trip(store: OutputStore) -> None:
    assert store.read_json("state/lock.json") is None
    assert store.read_json_versioned("state/lock.json") is None
    assert not store.exists("state/lock.json")
    assert not store.exists("state")

    store.write_json("state/manifest.json", {"scenes": ["a", "b"], "n": 2})
    assert store.read_json("state/manifest.json") == {"scenes": ["a", "b"], "n": 2}
    assert store.exists("state/manifest.json")
    assert store.exists("state")  # a folder holding a file
    assert not store.exists("stat")  # a prefix of a name is not a folder

    assert store.create_exclusive("state/lock.json", {"owner": "me"})
    assert not store.create_exclusive("state/lock.json", {"owner": "other"})
    data, version = store.read_json_versioned("state/lock.json") or (None, "")
    assert data == {"owner": "me"}
    assert store.replace_if_version("state/lock.json", {"owner": "me", "beat": 1}, version)
    assert not store.replace_if_version("state/lock.json", {"owner": "late"}, version)
    data, newer = store.read_json_versioned("state/lock.json") or (None, "")
    assert (data, newer != version) == ({"owner": "me", "beat": 1}, True)
    assert not store.replace_if_version("state/absent.json", {"x": 1}, newer)

    store.delete("state/lock.json")
    store.delete("state/lock.json")  # absent: no error
    assert store.read_json("state/lock.json") is None
    assert store.create_exclusive("state/lock.json", {"owner": "next"})


def test_open_store_kinds(tmp_path: Path, settings: S3Settings, bucket: str) -> None:
    local = open_store(str(tmp_path / "new" / "root"), settings)
    assert isinstance(local, LocalStore)
    assert (tmp_path / "new" / "root").is_dir()
    assert local.uri == str((tmp_path / "new" / "root").resolve())
    assert open_store(f"s3://{bucket}/a/b/", settings).uri == f"s3://{bucket}/a/b"


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_publish_dir_replaces_stale_files(store: OutputStore, tmp_path: Path) -> None:
    first = tmp_path / "first"
    (first / "sub").mkdir(parents=True)
    (first / "mask.tif").write_bytes(b"old mask")
    (first / "sub" / "stale.json").write_bytes(b"{}")
    store.publish_dir(first, "scenes/s1")
    store.write_json("scenes/s1-sibling.json", {"kept": True})

    second = tmp_path / "second"
    second.mkdir()
    (second / "mask.tif").write_bytes(b"new mask")
    (second / "polygons.parquet").write_bytes(b"PAR1")
    store.publish_dir(second, "scenes/s1")

    fetched = store.download_dir("scenes/s1", tmp_path / "fetched")
    assert sorted(fetched) == [
        tmp_path / "fetched" / "mask.tif",
        tmp_path / "fetched" / "polygons.parquet",
    ]
    assert _tree(tmp_path / "fetched") == {"mask.tif": b"new mask", "polygons.parquet": b"PAR1"}
    only = store.download_dir("scenes/s1", tmp_path / "only", suffixes=(".parquet",))
    assert only == [tmp_path / "only" / "polygons.parquet"]
    assert store.download_dir("scenes/none", tmp_path / "none") == []
    assert store.read_json("scenes/s1-sibling.json") == {"kept": True}
    if isinstance(store, LocalStore):  # no temporary or old folder left behind
        assert sorted(p.name for p in (store.root / "scenes").iterdir()) == [
            "s1",
            "s1-sibling.json",
        ]


def test_s3_download_never_leaves_the_folder(
    settings: S3Settings,
    bucket: str,
    endpoint: str,
    tmp_path: Path,
) -> None:
    store = open_store(f"s3://{bucket}/out", settings)
    _client(endpoint).put_object(Bucket=bucket, Key="out/scene//evil.txt", Body=b"x")
    with pytest.raises(UnsafeOutputNameError):
        store.download_dir("scene", tmp_path / "dl")
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize(
    "key", ["/abs.json", "../up.json", "a/../../b", "a\\b", "a//b", "", ".", "a/./b", "a/"]
)
def test_unsafe_keys_are_refused(store: OutputStore, key: str, tmp_path: Path) -> None:
    calls: list[Callable[[], object]] = [
        lambda: store.read_json(key),
        lambda: store.write_json(key, {}),
        lambda: store.publish_dir(tmp_path, key),
        lambda: store.download_dir(key, tmp_path / "x"),
        lambda: store.exists(key),
        lambda: store.create_exclusive(key, {}),
        lambda: store.read_json_versioned(key),
        lambda: store.replace_if_version(key, {}, "v"),
        lambda: store.delete(key),
    ]
    for call in calls:
        with pytest.raises(UnsafeOutputNameError):
            call()


def _race(action: Callable[[int], bool]) -> list[bool]:
    """Run ``action(i)`` for RACERS threads released together; their results."""
    barrier = threading.Barrier(RACERS)
    results: list[bool] = [False] * RACERS

    def run(i: int) -> None:
        barrier.wait()
        results[i] = action(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_create_exclusive_race_has_one_winner(store: OutputStore) -> None:
    results = _race(lambda i: store.create_exclusive("lock.json", {"owner": i}))
    assert sum(results) == 1
    assert store.read_json("lock.json") == {"owner": results.index(True)}


def test_compare_and_swap_race_has_one_winner(store: OutputStore) -> None:
    store.write_json("lock.json", {"owner": "start"})
    _, version = store.read_json_versioned("lock.json") or (None, "")
    results = _race(lambda i: store.replace_if_version("lock.json", {"owner": i}, version))
    assert sum(results) == 1
    assert store.read_json("lock.json") == {"owner": results.index(True)}


def _process_racer(root: str, version: str, barrier: Any, out: Any, i: int) -> None:
    store = open_store(root, S3Settings())
    barrier.wait()
    created = store.create_exclusive("new.json", {"owner": i})
    swapped = store.replace_if_version("lock.json", {"owner": i}, version)
    out.put((i, created, swapped))


def test_local_races_between_processes(tmp_path: Path) -> None:
    """Separate processes (each its own flock and link calls) on one local root."""
    store = open_store(str(tmp_path / "out"), S3Settings())
    store.write_json("lock.json", {"owner": "start"})
    _, version = store.read_json_versioned("lock.json") or (None, "")
    ctx = multiprocessing.get_context("spawn")
    racers = 4
    barrier, out = ctx.Barrier(racers), ctx.Queue()
    procs = [
        ctx.Process(target=_process_racer, args=(store.uri, version, barrier, out, i))
        for i in range(racers)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    created = [i for i, c, _ in results if c]
    swapped = [i for i, _, s in results if s]
    assert len(created) == 1
    assert len(swapped) == 1
    assert store.read_json("new.json") == {"owner": created[0]}
    assert store.read_json("lock.json") == {"owner": swapped[0]}
