"""A real S3 API (moto's server) on loopback for tests: fixture ``s3_endpoint``, ``make_bucket``.

The server runs in its own process, not in a thread of the test process: rasterio makes some GDAL
calls while holding the GIL (e.g. the lazy ``.aux.xml`` probe after an open), and a GDAL request
to a server living in the same interpreter would then wait forever for a response that server
cannot send. Fake credentials are put in the environment (only where none are set) so that boto3
and GDAL sign requests without touching any real account; moto accepts any signature.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import boto3
import botocore.config
import pytest

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-fake-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-fake-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
START_TIMEOUT_S = 60.0  # moto imports slowly on a loaded machine


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"moto server on port {port} exited with {proc.returncode}"
                ) from None
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"moto server on port {port} not listening after {START_TIMEOUT_S} s"
                ) from None
            time.sleep(0.05)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a moto S3 server running for the whole session."""
    added = [name for name in FAKE_CREDENTIALS if name not in os.environ]
    for name in added:
        os.environ[name] = FAKE_CREDENTIALS[name]
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(proc, port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for name in added:
            os.environ.pop(name, None)


def make_bucket(endpoint: str, name: str) -> None:
    """Create bucket ``name`` on the server at ``endpoint`` (path-style: loopback has no DNS)."""
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )
    client.create_bucket(Bucket=name)
