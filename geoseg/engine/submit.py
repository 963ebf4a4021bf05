"""Submitting geoseg runs to a Ray cluster through the Ray Jobs API, and following them.

A thin, typed layer over :class:`ray.job_submission.JobSubmissionClient` for ``geoseg submit``,
``status``, ``logs`` and ``stop``. ``address`` is always the dashboard's URL
(``http://HEAD:8265``): the Jobs API is served by the dashboard, not by the GCS port (6379).

Where the Jobs API listens: ``ray start --head`` binds the dashboard, and with it the Jobs API,
to 127.0.0.1 unless ``--dashboard-host`` says otherwise (``--dashboard-port``, default 8265).
Reach a remote head through an SSH tunnel, ``kubectl port-forward`` or a ClusterIP service
rather than binding it to 0.0.0.0 on a reachable network: whoever can submit a job can run code
on every node.

Token authentication (Ray >= 2.52, checked on Ray 2.60):

* Server: ``RAY_AUTH_MODE=token`` in the environment of ``ray start`` on every node (there is no
  command-line flag). The token is the first of ``RAY_AUTH_TOKEN`` (the value),
  ``RAY_AUTH_TOKEN_PATH`` (a file) and ``~/.ray/auth_token``; ``ray get-auth-token --generate``
  writes the latter. Ray 2.60's ``ray start`` also turns token mode on by itself when
  ``RAY_AUTH_MODE`` is unset and a token exists, and a local ``ray.init()`` cluster generates one;
  ``RAY_AUTH_MODE=disabled`` turns it off. The GCS and the dashboard then refuse requests without
  the token: the Jobs API answers 401 without an ``Authorization: Bearer <token>`` header (or
  ``X-Ray-Authorization``, or the dashboard's cookie) and 403 with a wrong one. A job's driver
  inherits ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN`` from the cluster's environment, so it joins the
  cluster without being given the token.
* Client (this module): the token is read from the same environment variables and files, in the
  same order, on every call, and sent as the ``Authorization`` header. It is sent when
  ``RAY_AUTH_MODE=token``, or when ``RAY_AUTH_MODE`` is unset and a token source exists (as
  ``ray start`` decides), never when it is ``disabled``. Ray's own client only sends it when
  ``RAY_AUTH_MODE=token`` was set before the process first read Ray's configuration, and then
  caches it; passing the header ourselves keeps long-lived processes and tests right.
* The token is never logged, never put in an error message, and never put in a job's
  ``runtime_env`` (anyone with dashboard access can read a job's ``runtime_env``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from geoseg.errors import ConfigError, DuplicateSubmissionError

TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})

# Ray's token sources, highest precedence first (ray._private.authentication).
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
DEFAULT_TOKEN_FILE = Path(".ray") / "auth_token"

# JobSubmissionClient reports HTTP errors only as RuntimeError("Request failed with status code
# N: <body>."); these are the parts of Ray 2.60's messages that tell the cases apart.
_NOT_FOUND = "status code 404"
_ALREADY_EXISTS = "already exists"


def submission_id(config_digest: str, input_identities: Sequence[str]) -> str:
    """The deterministic submission id ``geoseg-<16 hex>`` of a config and its inputs.

    The same config digest and the same inputs, in any order, give the same id, so submitting a
    run twice is refused by Ray instead of running it twice.
    """
    # JSON frames the parts unambiguously: ("ab", ["c"]) and ("a", ["bc"]) hash differently.
    payload = json.dumps([config_digest, sorted(input_identities)], separators=(",", ":"))
    return "geoseg-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


def submit(
    address: str,
    entrypoint: str,
    submission_id: str,
    working_dir: Path,
    env_vars: Mapping[str, str] | None = None,
) -> str:
    """Submit ``entrypoint`` as Ray job ``submission_id``, shipping ``working_dir`` with it.

    Returns the submission id. Raises :class:`DuplicateSubmissionError` (naming the existing
    job's status) when the cluster has a job with that id already, and :class:`ConfigError` for
    a bad address, working directory, environment or token.
    """
    if not working_dir.is_dir():
        raise ConfigError(f"working_dir {working_dir} is not a directory")
    leaked = sorted({TOKEN_ENV, TOKEN_PATH_ENV} & set(env_vars or {}))
    if leaked:
        raise ConfigError(
            f"env_vars must not carry {', '.join(leaked)}: a job's runtime_env is readable by "
            "anyone with dashboard access, and the job inherits the cluster's token anyway"
        )
    runtime_env = {"working_dir": str(working_dir), "env_vars": dict(env_vars or {})}
    with _ray_errors(address):
        client = _client(address)
        try:
            return str(
                client.submit_job(
                    entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env
                )
            )
        except RuntimeError as exc:
            if _ALREADY_EXISTS not in str(exc):
                raise
            status = _existing_status(client, submission_id)
            raise DuplicateSubmissionError(
                f"job {submission_id} exists already on the Ray cluster at {address} "
                f"(status {status}): the same config and inputs were submitted before; "
                f"see `geoseg status {submission_id}` and `geoseg logs {submission_id}`"
            ) from exc


def job_status(address: str, job_id: str) -> str:
    """The job's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    with _ray_errors(address, job_id):
        return _status(_client(address), job_id)


def job_logs(address: str, job_id: str) -> str:
    """Everything the job's driver has written so far (stdout and stderr)."""
    with _ray_errors(address, job_id):
        return str(_client(address).get_job_logs(job_id))


def follow_logs(address: str, job_id: str) -> Iterator[str]:
    """The job's log, chunk by chunk as it is written, until the job ends.

    Ray offers this only as an async iterator; it is driven here on a private event loop so that
    synchronous callers (the CLI) can simply iterate. Being a generator, it raises (an unknown job,
    a refused token) on the first iteration, not on the call.
    """
    with _ray_errors(address, job_id):
        client = _client(address)
        # The log websocket does not say "no such job" clearly; asking first does.
        _status(client, job_id)
        # Annotated as an AsyncIterator, it is an async generator: closing it closes its session.
        chunks = cast("AsyncGenerator[str, None]", client.tail_job_logs(job_id))
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    chunk = loop.run_until_complete(anext(chunks))
                except StopAsyncIteration:
                    return
                yield str(chunk)
        finally:
            loop.run_until_complete(chunks.aclose())
            loop.close()


def stop_job(address: str, job_id: str) -> bool:
    """Ask the job to stop; True if it was still running. Follow up with :func:`wait`."""
    with _ray_errors(address, job_id):
        return bool(_client(address).stop_job(job_id))


def wait(address: str, job_id: str, timeout_s: float, poll_s: float = 1.0) -> str:
    """Poll until the job reaches a terminal status or ``timeout_s`` passes; its last status.

    A status outside :data:`TERMINAL_STATUSES` means the timeout expired first.
    """
    deadline = time.monotonic() + timeout_s
    with _ray_errors(address, job_id):
        client = _client(address)
        while True:
            status = _status(client, job_id)
            left = deadline - time.monotonic()
            if status in TERMINAL_STATUSES or left <= 0:
                return status
            time.sleep(min(poll_s, left))


def auth_headers() -> dict[str, str]:
    """The ``Authorization`` header for the cluster's token, or nothing (see the module doc)."""
    found = _token()
    return {} if found is None else {"Authorization": f"Bearer {found[0]}"}


def _token() -> tuple[str, str] | None:
    """The token and where it came from (a name or path, never the value), or None."""
    mode = os.environ.get(AUTH_MODE_ENV, "").strip().lower()
    if mode == "disabled":
        return None
    value = os.environ.get(TOKEN_ENV, "").strip()
    if value:
        return value, TOKEN_ENV
    path_value = os.environ.get(TOKEN_PATH_ENV, "").strip()
    if path_value:
        # Ray treats an unreadable or empty RAY_AUTH_TOKEN_PATH as fatal rather than falling
        # back to the default file; so do we, so both sides agree on the token.
        path = Path(path_value).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"{TOKEN_PATH_ENV}={path}: cannot read the Ray token file ({exc.strerror})"
            ) from exc
        if not value:
            raise ConfigError(f"{TOKEN_PATH_ENV}={path}: the Ray token file is empty")
        return value, f"{TOKEN_PATH_ENV}={path}"
    default = Path.home() / DEFAULT_TOKEN_FILE
    if default.is_file():
        value = default.read_text().strip()
        if value:
            return value, str(default)
    if mode == "token":
        raise ConfigError(
            f"{AUTH_MODE_ENV}=token but no Ray token was found: set {TOKEN_ENV} or "
            f"{TOKEN_PATH_ENV} to the cluster's token"
        )
    return None


def _client(address: str) -> JobSubmissionClient:
    if not address.startswith(("http://", "https://")):
        raise ConfigError(
            f"Ray address {address!r}: jobs are submitted to the dashboard's URL, "
            "e.g. http://HEAD:8265 (not the GCS address HEAD:6379 nor ray://)"
        )
    return JobSubmissionClient(address, headers=auth_headers())


def _status(client: JobSubmissionClient, job_id: str) -> str:
    return str(client.get_job_status(job_id).value)


def _existing_status(client: JobSubmissionClient, job_id: str) -> str:
    # The job may be deleted between Ray's refusal and this question; the refusal stands.
    try:
        return _status(client, job_id)
    except RuntimeError:
        return "unknown"


@contextmanager
def _ray_errors(address: str, job_id: str | None = None) -> Iterator[None]:
    """Turn Ray's authentication and not-found errors into geoseg errors that say what to do."""
    try:
        yield
    except AuthenticationError as exc:
        found = _token()
        if found is None:
            why = (
                f"requires a token and none was found: set {TOKEN_ENV} (or {TOKEN_PATH_ENV}) "
                "to the cluster's token"
            )
        else:
            why = f"refused the token from {found[1]}: it is not this cluster's token"
        raise ConfigError(f"the Ray cluster at {address} {why}") from exc
    except RuntimeError as exc:
        if job_id is not None and _NOT_FOUND in str(exc):
            raise ConfigError(f"no job {job_id!r} on the Ray cluster at {address}") from exc
        raise
