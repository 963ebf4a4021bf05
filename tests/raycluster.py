"""A real Ray head with token authentication, on loopback, for tests of the Jobs API.

Use it from a test module with ``pytest_plugins = ["raycluster"]`` (and ``from raycluster import
RayHead`` for the type); the fixture is module-scoped: one head per module (about 5 s to start).

The head is a ``ray start --head --block`` process in its own session and its own temp dir under
/tmp, with every port it listens on chosen free, so it never meets another Ray on this machine
(``ray stop`` would stop every Ray of the machine, so it is never used: the process group is).
Token authentication is on with a fresh random token; while the module runs, ``RAY_AUTH_MODE``
and ``RAY_AUTH_TOKEN`` are set in this process's environment (the way a user of ``geoseg
submit`` sets them), and ``RayHead.env`` holds them for subprocesses.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT_S = 60.0
STOP_GRACE_S = 30.0


@dataclass(frozen=True)
class RayHead:
    """A running head: where to reach it, and the environment that authenticates to it."""

    gcs_address: str  # host:port, for ray.init(address=...) on this machine
    client_address: str  # ray://127.0.0.1:port, Ray Client: how a pod that is no Ray node joins
    dashboard_url: str  # http://127.0.0.1:port, for the Jobs API (geoseg submit --address)
    temp_dir: Path  # its sessions and logs (session_latest/logs)
    # RAY_AUTH_MODE and RAY_AUTH_TOKEN; kept out of repr so a failing test never prints the token.
    env: Mapping[str, str] = field(repr=False)


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: all held open until all are chosen (one at a time, the
    kernel handed the same port out twice in one CI run, and Ray refused to start)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def _answers(url: str) -> bool:
    """Whether the dashboard answers at all (401 counts: it is up and asking for the token)."""
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def _wait_until_up(proc: subprocess.Popen[bytes], temp_dir: Path, dashboard_url: str) -> str:
    """The GCS address once the head is up; fails the test with the head's log otherwise."""
    address_file = temp_dir / "ray_current_cluster"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if address_file.is_file() and _answers(f"{dashboard_url}/api/version"):
            return address_file.read_text().strip()
        time.sleep(0.2)
    log = (temp_dir / "ray-start.log").read_text(errors="replace")[-4000:]
    pytest.fail(f"ray start --head did not come up (exit {proc.poll()}):\n{log}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the head: SIGTERM lets ``ray start --block`` drain and stop its processes; whatever
    is left of its process group after the grace period is killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """A Ray head on loopback with token authentication on (see the module docstring)."""
    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # Short path: Ray's unix sockets live under it and are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="gsray-", dir="/tmp"))
    gcs_port, dashboard_port, client_port, agent_port = _free_ports(4)
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, **auth_env}
    # Job entrypoints say `python`: it must be this environment's, as the head's own is.
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    for inherited in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(inherited, None)
    command = [
        str(Path(venv_bin) / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true",
        # Defaults that are fixed ports (10001, 52365) would collide with another head.
        f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        "--num-cpus=2",
        "--object-store-memory=200000000",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    with (temp_dir / "ray-start.log").open("wb") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        gcs_address = _wait_until_up(proc, temp_dir, dashboard_url)
        with pytest.MonkeyPatch.context() as mp:
            for name, value in auth_env.items():
                mp.setenv(name, value)
            mp.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
            yield RayHead(
                gcs_address, f"ray://127.0.0.1:{client_port}", dashboard_url, temp_dir, auth_env
            )
    finally:
        _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
