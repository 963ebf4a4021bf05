"""Where inputs are read from and outputs written to: local folders or S3 (the only S3 client).

Inputs are listed with an *identity* (``size=..;mtime_ns=..`` locally, ``etag=..;size=..`` on S3)
so a run can notice an input that was overwritten while it ran. Pixels are read by GDAL through
``/vsis3/`` (:func:`gdal_path`, :func:`gdal_options`); boto3 only lists, stats and writes.

Glob patterns mean the same thing locally and on S3: ``*``, ``?`` and ``[...]`` never match
``/``; ``**`` matches anything including ``/``, and ``**/`` matches zero or more whole folders,
so ``p/**.tif`` and ``p/**/*.tif`` both match ``p/x.tif`` and ``p/a/b/x.tif``. Matching is
case-sensitive (``*.[tT][iI][fF]`` for both cases), and names starting with ``.`` are not special.

An :class:`OutputStore` is an output root addressed by *keys*: relative POSIX paths that can never
leave the root. Its conditional writes (:meth:`OutputStore.create_exclusive`,
:meth:`OutputStore.replace_if_version`) are atomic against every other writer of the same root,
local or S3, so a run lock can be built on them. Credentials are never settings: they come from
the standard AWS chain (environment, profile, instance role) and never appear in messages.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

import boto3
import botocore.config
import rasterio
from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from geoseg.errors import ConfigError, StorageError, UnsafeOutputNameError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_S3_FAILURES = (ClientError, BotoCoreError, Boto3Error)
# Error codes of a conditional PUT that lost: 412 the condition failed; 409 S3 saw a concurrent
# conditional write to the same key and refused this one; NoSuchKey for If-Match on a deleted key.
_CONDITION_LOST = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys per request
_WILDCARDS = "*?["


class S3Settings(BaseModel):
    """How to reach S3 or an S3-compatible server (MinIO, Ceph, moto). No credentials here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = None  # "http://127.0.0.1:9000"; None: AWS itself
    region: str | None = None
    virtual_hosting: bool = True  # bucket.host/key; False: host/bucket/key (needed for IPs)
    http_retries: int = Field(5, ge=0)  # retries after the first attempt, for boto3 and GDAL
    retry_delay_s: float = Field(1.0, gt=0)  # GDAL's first back-off; it doubles (plus jitter)

    @field_validator("endpoint_url")
    @classmethod
    def _plain_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint_url {value!r} must look like http(s)://host[:port]")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "endpoint_url must not contain credentials; use the AWS environment or a profile"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(
                f"endpoint_url {value!r} must be http(s)://host[:port] without a path or query"
            )
        return value


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return uri.startswith("s3://")


def gdal_path(uri: str) -> str:
    """The path GDAL opens: ``s3://b/k`` -> ``/vsis3/b/k``; anything else unchanged."""
    return "/vsis3/" + uri.removeprefix("s3://") if is_s3(uri) else uri


def _gdal_version() -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", rasterio.__gdal_version__)[:2])


def gdal_options(settings: S3Settings) -> dict[str, str]:
    """GDAL config options for ``rasterio.Env(**options)`` when reading inputs.

    GDAL retries a failed HTTP request ``GDAL_HTTP_MAX_RETRY`` times, waiting
    ``GDAL_HTTP_RETRY_DELAY * (2 + U(0, 0.5))**(n-1)`` seconds before retry ``n``. It retries 429,
    500, 502, 503, 504, S3's ``RequestTimeout`` and curl time-outs by default; from GDAL 3.10 on
    ``GDAL_HTTP_RETRY_CODES`` names the codes explicitly so they do not depend on that default.
    With an ``endpoint_url`` GDAL is pointed at it (``AWS_S3_ENDPOINT`` is ``host:port``,
    ``AWS_HTTPS`` follows the scheme). Credentials are read by GDAL from the AWS environment.
    """
    options = {
        "GDAL_HTTP_MAX_RETRY": str(settings.http_retries),
        "GDAL_HTTP_RETRY_DELAY": repr(settings.retry_delay_s),
        "AWS_VIRTUAL_HOSTING": "TRUE" if settings.virtual_hosting else "FALSE",
    }
    if _gdal_version() >= (3, 10):
        options["GDAL_HTTP_RETRY_CODES"] = "429,500,502,503,504"
    if settings.endpoint_url is not None:
        parts = urlsplit(settings.endpoint_url)
        options["AWS_S3_ENDPOINT"] = parts.netloc
        options["AWS_HTTPS"] = "YES" if parts.scheme == "https" else "NO"
    if settings.region is not None:
        options["AWS_REGION"] = settings.region
    return options


def display_uri(path: str) -> str:
    """The URI a GDAL path stands for, for messages: ``/vsis3/b/k`` -> ``s3://b/k`` (the inverse
    of :func:`gdal_path`); anything else unchanged."""
    return "s3://" + path.removeprefix("/vsis3/") if path.startswith("/vsis3/") else path


_CREDENTIALS_HINT = "check the AWS credentials (environment or profile) and their permissions"
_MISSING_HINT = "the object does not exist: check the URI and endpoint_url"
_RETRIED_HINT = (
    "the server kept failing or refused the request; 429 and 5xx answers were retried "
    "{retries} time(s) with back-off: check endpoint_url, the network and the server's health, "
    "or raise storage.http_retries and retry_delay_s"
)
# rasterio's classes for GDAL's errors of S3 and HTTP requests (CPLE_AWS*, CPLE_HttpResponse),
# by name: they live in the private rasterio._err. Anything else (a corrupt file) is not here.
_GDAL_REQUEST_HINTS = {
    "CPLE_AWSBucketNotFoundError": "the bucket does not exist: check the bucket name and "
    "endpoint_url",
    "CPLE_AWSObjectNotFoundError": _MISSING_HINT,
    "CPLE_AWSAccessDeniedError": _CREDENTIALS_HINT,
    "CPLE_AWSInvalidCredentialsError": _CREDENTIALS_HINT,
    "CPLE_AWSSignatureDoesNotMatchError": _CREDENTIALS_HINT,
    "CPLE_AWSError": _RETRIED_HINT,
    "CPLE_HttpResponseError": _RETRIED_HINT,
}
# GDAL's warnings on a failed HTTP request, as rasterio logs them (the URL is percent-encoded),
# and libtiff's errors on a short read (what GDAL turns a read whose requests failed into; a
# corrupt file's are "bad magic number", "Corrupted LZW table", "Sanity check ... failed"...).
_HTTP_WARNING = re.compile(
    r"HTTP error code: (?P<a>\d+) - (?P<url_a>\S+?)\.? Retrying"
    r"|HTTP response code on (?P<url_b>\S+): (?P<b>\d+)"
)
_SHORT_READ = re.compile(
    r"got \d+ bytes|read error|failed to read|cannot read|can not read|short read", re.IGNORECASE
)


class _HttpWarnings(logging.Handler):
    def __init__(self, url_path_end: str) -> None:
        super().__init__(logging.WARNING)
        self.url_path_end = url_path_end
        self.statuses: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = _HTTP_WARNING.search(record.getMessage())
        if match is not None:
            url = match["url_a"] or match["url_b"]
            if unquote(urlsplit(url).path).endswith(self.url_path_end):
                self.statuses.append(int(match["a"] or match["b"]))


@contextmanager
def gdal_http_statuses(path: str) -> Iterator[list[int]]:
    """The HTTP error statuses GDAL got for the S3 object ``path`` (``/vsis3/b/k``) while the
    block runs, read from the warnings rasterio logs when GDAL retries. GDAL reports a read whose
    requests all failed as a short read, like a truncated file: this tells the two apart. Empty
    for a local path, and when rasterio's warnings are not logged (a level above WARNING)."""
    if not path.startswith("/vsis3/"):
        yield []
        return
    _, _, key = path.removeprefix("/vsis3/").partition("/")
    handler = _HttpWarnings("/" + key)  # ends the URL path, path-style or virtual-hosted
    logger = logging.getLogger("rasterio")
    logger.addHandler(handler)
    try:
        yield handler.statuses
    finally:
        logger.removeHandler(handler)


def gdal_request_error(
    path: str,
    exc: BaseException,
    action: str,
    gdal_env: dict[str, str],
    http_statuses: list[int] | None = None,
) -> StorageError | None:
    """A :class:`StorageError` naming the input's URI when the rasterio error ``exc`` comes from a
    failed S3/HTTP request (GDAL gave up after its retries), or is a short read while GDAL got
    the error statuses ``http_statuses`` (:func:`gdal_http_statuses`); None for any other
    failure (a corrupt file)."""
    retries = gdal_env.get("GDAL_HTTP_MAX_RETRY", "0")
    answered = f"HTTP {http_statuses[-1]}" if http_statuses else ""
    seen: set[int] = set()
    short_read = False
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:  # rasterio chains GDAL's error as context
        seen.add(id(cause))
        hint = _GDAL_REQUEST_HINTS.get(type(cause).__name__)
        if hint is not None:
            message = ": ".join(m for m in (answered, str(exc).strip()) if m)
            return StorageError(
                f"{display_uri(path)}: could not {action}: the request failed: {message} "
                f"({hint.format(retries=retries)})"
            )
        short_read = short_read or _SHORT_READ.search(str(cause)) is not None
        cause = cause.__cause__ or cause.__context__
    if not (http_statuses and short_read):
        return None
    status = http_statuses[-1]
    hint = {403: _CREDENTIALS_HINT, 404: _MISSING_HINT}.get(status, _RETRIED_HINT)
    return StorageError(
        f"{display_uri(path)}: could not {action}: the request failed: {answered} "
        f"({hint.format(retries=retries)})"
    )


@functools.lru_cache(maxsize=8)
def _client(settings: S3Settings) -> S3Client:
    """One thread-safe client per settings; its own session, as boto3's default one is not."""
    config = botocore.config.Config(
        retries={"max_attempts": settings.http_retries + 1, "mode": "standard"},
        s3={"addressing_style": "virtual" if settings.virtual_hosting else "path"},
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config
    )


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``("bucket", "key")``."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ConfigError(f"{uri!r}: an S3 URI needs a bucket, like s3://bucket/prefix")
    return bucket, key


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _describe(exc: BaseException) -> str:
    """What went wrong and what to do, from S3's error code and message only (never the request,
    which carries the signature)."""
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        message = exc.response.get("Error", {}).get("Message", "") or "no message"
        if code == "NoSuchBucket":
            hint = "the bucket does not exist: check the bucket name and endpoint_url"
        elif code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            hint = "check the AWS credentials (environment or profile) and their permissions"
        elif code in _MISSING:
            hint = "the bucket or object does not exist: check the URI and endpoint_url"
        else:
            hint = "check the URI, endpoint_url and the server's health"
        return f"{code}: {message} ({hint})"
    return f"{exc} (check endpoint_url, the network and that AWS credentials are configured)"


@contextmanager
def _s3_errors(uri: str, action: str) -> Iterator[None]:
    """Turn boto3/botocore failures into :class:`StorageError` naming ``uri``."""
    try:
        yield
    except _S3_FAILURES as exc:
        raise StorageError(f"{uri}: could not {action}: {_describe(exc)}") from exc


@contextmanager
def _os_errors(path: object, action: str) -> Iterator[None]:
    """Turn OS failures into :class:`StorageError` naming ``path``."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(
            f"{path}: could not {action}: {exc.strerror or exc} "
            "(check that the path exists, is writable and the disk is not full)"
        ) from exc


# --------------------------------------------------------------------------------------- globs


def _first_wildcard(pattern: str) -> int | None:
    hits = [i for i in (pattern.find(c) for c in _WILDCARDS) if i >= 0]
    return min(hits) if hits else None


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """The regex of a glob pattern, with the semantics in the module docstring."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            # As in fnmatch: "[!" negates, and a "]" right after "[" or "[!" is a literal member.
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            end = pattern.find("]", j + 1)
            if end < 0:
                out.append(re.escape("["))
                i += 1
                continue
            body = pattern[i + 1 : end]
            negate = body.startswith("!")
            members = "".join(
                c if c == "-" else re.escape(c) for c in (body[1:] if negate else body)
            )
            out.append(f"[^/{members}]" if negate else f"(?!/)[{members}]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


# -------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputObject:
    """One input: its URI (absolute local path or ``s3://``), identity and size in bytes."""

    uri: str
    identity: str
    size: int


def _local_identity(st: os.stat_result) -> str:
    return f"size={st.st_size};mtime_ns={st.st_mtime_ns}"


def _s3_identity(etag: str, size: int) -> str:
    bare = etag.strip('"')  # S3 quotes ETags
    return f"etag={bare};size={size}"


def list_inputs(pattern: str, settings: S3Settings) -> list[InputObject]:
    """The files matching a glob ``pattern`` (local or ``s3://``), sorted by URI.

    Nothing matching gives ``[]`` (also for a missing local folder); a missing bucket, denied
    access or an unreachable endpoint raises :class:`StorageError` naming the pattern.
    """
    found = _list_s3(pattern, settings) if is_s3(pattern) else _list_local(pattern)
    return sorted(found, key=lambda obj: obj.uri)


def _list_local(pattern: str) -> list[InputObject]:
    absolute = os.path.abspath(os.path.expanduser(pattern))
    cut = _first_wildcard(absolute)
    if cut is None:
        with _os_errors(absolute, "stat the input"):
            if not os.path.isfile(absolute):
                return []
            st = os.stat(absolute)
        return [InputObject(absolute, _local_identity(st), st.st_size)]
    base = absolute[:cut].rsplit("/", 1)[0] or "/"
    if not os.path.isdir(base):
        return []
    regex = _glob_regex(absolute)
    rest = absolute[len(base) :].lstrip("/")
    # Without "**" a match lies exactly rest.count("/") folders below base: walk no deeper.
    max_depth = None if "**" in rest else rest.count("/")

    def fail(exc: OSError) -> None:
        raise StorageError(
            f"{pattern}: could not list {exc.filename}: {exc.strerror} (check its permissions)"
        ) from exc

    found = []
    with _os_errors(pattern, "list inputs"):
        for dirpath, dirnames, filenames in os.walk(base, onerror=fail):
            depth = len(Path(dirpath).relative_to(base).parts)
            if max_depth is not None and depth >= max_depth:
                dirnames.clear()
            for name in filenames:
                path = os.path.join(dirpath, name)
                if regex.match(path) and os.path.isfile(path):
                    st = os.stat(path)
                    found.append(InputObject(path, _local_identity(st), st.st_size))
    return found


def _list_s3(pattern: str, settings: S3Settings) -> list[InputObject]:
    bucket, key_pattern = _split_s3(pattern)
    cut = _first_wildcard(key_pattern)
    prefix = key_pattern if cut is None else key_pattern[:cut]
    regex = _glob_regex(key_pattern)
    found = []
    with _s3_errors(pattern, "list inputs"):
        pages = _client(settings).get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if not key.endswith("/") and regex.match(key):
                    size = obj["Size"]
                    uri = f"s3://{bucket}/{key}"
                    found.append(InputObject(uri, _s3_identity(obj["ETag"], size), size))
    return found


def input_identity(uri: str, settings: S3Settings) -> str:
    """The identity :func:`list_inputs` gives ``uri``, read now (HEAD or stat).

    Raises :class:`StorageError` if the input is gone or cannot be reached.
    """
    if not is_s3(uri):
        with _os_errors(uri, "stat the input (was it moved or deleted during the run?)"):
            return _local_identity(os.stat(uri))
    bucket, key = _split_s3(uri)
    with _s3_errors(uri, "stat the input (was it moved or deleted during the run?)"):
        head = _client(settings).head_object(Bucket=bucket, Key=key)
    return _s3_identity(head["ETag"], head["ContentLength"])


# ------------------------------------------------------------------------------------- outputs


def check_key(key: str) -> str:
    """``key`` if it is a safe relative POSIX path, else :class:`UnsafeOutputNameError`.

    Safe: not empty, not absolute, no backslash or NUL, no empty, ``.`` or ``..`` component; so
    ``<root>/<key>`` always lies inside the root.
    """
    parts = key.split("/")
    if key.startswith("/") or "\\" in key or "\0" in key or {"", ".", ".."} & set(parts):
        raise UnsafeOutputNameError(
            f"storage key {key!r} could leave the output root: use a relative POSIX path without "
            "empty, '.' or '..' components or backslashes"
        )
    return key


def _encode(data: Any) -> bytes:
    return (json.dumps(data, indent=2, default=str) + "\n").encode()


def _decode(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise StorageError(
            f"{where}: is not valid JSON ({exc}); it is damaged or not geoseg's: move it away "
            "and rerun"
        ) from exc


class OutputStore(Protocol):
    """An output root (local folder or ``s3://bucket/prefix``) addressed by safe keys.

    Every ``key`` goes through :func:`check_key` (:class:`UnsafeOutputNameError` otherwise);
    failures raise :class:`StorageError` naming the object. ``write_json`` and ``delete`` are
    unconditional (last writer wins): a key several runs contend for, like a lock, should change
    only through ``create_exclusive`` and ``replace_if_version``.
    """

    uri: str

    def read_json(self, key: str) -> Any | None:
        """The JSON at ``key``, or None if absent."""
        ...

    def write_json(self, key: str, data: Any) -> None:
        """Write ``data`` as JSON at ``key``, atomically (readers see the old or the new)."""
        ...

    def publish_dir(self, local_dir: Path, key: str) -> None:
        """Make ``<root>/<key>/`` hold exactly the files under ``local_dir``."""
        ...

    def put_file(self, local_file: Path, key: str) -> None:
        """Copy ``local_file`` to ``key``, atomically (readers see the old or the new)."""
        ...

    def download_file(self, key: str, local_file: Path) -> bool:
        """Copy ``key`` to ``local_file``; False (nothing written) if ``key`` is absent."""
        ...

    def download_dir(
        self, key: str, local_dir: Path, suffixes: tuple[str, ...] | None = None
    ) -> list[Path]:
        """Copy the files under ``<root>/<key>/`` (only names ending in ``suffixes`` if given)
        into ``local_dir``, keeping relative paths; the local paths, sorted ([] if none)."""
        ...

    def exists(self, key: str) -> bool:
        """True if ``key`` is a file or a folder holding at least one file."""
        ...

    def create_exclusive(self, key: str, data: Any) -> bool:
        """Write JSON at ``key`` only if absent; True if this call created it.

        Of concurrent callers exactly one gets True. False is also possible when this call's
        write landed but its response was lost and the retry found the key present, so a lock
        should store an owner token and read it back when False.
        """
        ...

    def read_json_versioned(self, key: str) -> tuple[Any, str] | None:
        """The JSON at ``key`` and an opaque version token of those bytes, or None if absent."""
        ...

    def replace_if_version(self, key: str, data: Any, version: str) -> bool:
        """Compare-and-swap: write JSON at ``key`` only if it still has ``version``; True if so.

        Of concurrent callers with the same version at most one gets True; False if the key
        changed or is gone (or, as for :meth:`create_exclusive`, if a retry hid our success).
        """
        ...

    def delete(self, key: str) -> None:
        """Remove the file ``key``; nothing happens if it is absent."""
        ...


def open_store(root: str, settings: S3Settings) -> OutputStore:
    """``s3://bucket/prefix`` -> :class:`S3Store` (bucket checked now); else a
    :class:`LocalStore` on the folder ``root``, created if missing."""
    if is_s3(root):
        return S3Store(root, settings)
    return LocalStore(Path(root))


def _fsync_dir(folder: Path) -> None:
    """Make a rename or link in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    """An output root on a local (or NFS) folder."""

    def __init__(self, root: Path) -> None:
        with _os_errors(root, "create the output folder"):
            root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write_temp(self, path: Path, payload: bytes) -> Path:
        """A fsynced hidden sibling of ``path`` holding ``payload``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with tmp.open("wb") as out:
                out.write(payload)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:  # a full disk: no half-written hidden file left behind
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _replace(self, path: Path, payload: bytes) -> None:
        tmp = self._write_temp(path, payload)
        try:
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def read_json(self, key: str) -> Any | None:
        found = self.read_json_versioned(key)
        return None if found is None else found[0]

    def write_json(self, key: str, data: Any) -> None:
        path = self._path(key)
        with _os_errors(path, "write"):
            self._replace(path, _encode(data))

    def publish_dir(self, local_dir: Path, key: str) -> None:
        """Copy ``local_dir`` to a hidden sibling, then swap it in by two renames.

        Readers see the old folder or the new one, except for the instant between the renames
        when the folder is absent; the old one is removed afterwards.
        """
        final = self._path(key)
        tag = uuid.uuid4().hex[:12]
        tmp = final.with_name(f".{final.name}.publish-{tag}")
        with _os_errors(final, f"publish {local_dir} here"):
            if not local_dir.is_dir():
                raise StorageError(f"{local_dir}: is not a folder; nothing to publish to {final}")
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copytree(local_dir, tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            old = None
            if final.exists() or final.is_symlink():
                old = final.with_name(f".{final.name}.old-{tag}")
                final.rename(old)
            tmp.rename(final)
            _fsync_dir(final.parent)
            if old is not None:
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old)
                else:
                    old.unlink()

    def put_file(self, local_file: Path, key: str) -> None:
        path = self._path(key)
        if path == local_file.resolve():
            return  # built in place: already there
        with _os_errors(path, f"copy {local_file} here"):
            self._replace(path, local_file.read_bytes())

    def download_file(self, key: str, local_file: Path) -> bool:
        path = self._path(key)
        with _os_errors(path, f"copy to {local_file}"):
            if not path.is_file():
                return False
            local_file.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, local_file)
        return True

    def download_dir(
        self, key: str, local_dir: Path, suffixes: tuple[str, ...] | None = None
    ) -> list[Path]:
        folder = self._path(key)
        copied = []
        with _os_errors(folder, f"download into {local_dir}"):
            if not folder.is_dir():
                return []
            for source in sorted(folder.rglob("*")):
                if source.is_file() and (suffixes is None or source.name.endswith(suffixes)):
                    target = local_dir / source.relative_to(folder)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, target)
                    copied.append(target)
        return copied

    def exists(self, key: str) -> bool:
        path = self._path(key)
        with _os_errors(path, "stat"):
            return path.is_file() or (path.is_dir() and any(p.is_file() for p in path.rglob("*")))

    def create_exclusive(self, key: str, data: Any) -> bool:
        """Write a complete temp file, then hard-link it to ``key``.

        ``link`` fails with EEXIST if ``key`` exists and is atomic (also on NFS), and unlike
        ``O_CREAT|O_EXCL`` followed by a write, readers never see an empty or partial file.
        """
        path = self._path(key)
        with _os_errors(path, "create"):
            tmp = self._write_temp(path, _encode(data))
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(path.parent)
        return True

    def read_json_versioned(self, key: str) -> tuple[Any, str] | None:
        """The version is the sha256 of the file's bytes, so it changes with every content."""
        path = self._path(key)
        with _os_errors(path, "read"):
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                return None
        return _decode(raw, str(path)), hashlib.sha256(raw).hexdigest()

    def replace_if_version(self, key: str, data: Any, version: str) -> bool:
        """Under an exclusive ``flock`` on the sibling ``.<name>.cas`` (never deleted, so every
        process locks the same inode), re-read the version and replace atomically if unchanged.
        """
        path = self._path(key)
        with _os_errors(path, "replace"):
            if not path.parent.is_dir():
                return False
            fd = os.open(path.with_name(f".{path.name}.cas"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    current = path.read_bytes()
                except FileNotFoundError:
                    return False
                if hashlib.sha256(current).hexdigest() != version:
                    return False
                self._replace(path, _encode(data))
                return True
            finally:
                os.close(fd)  # also releases the flock

    def delete(self, key: str) -> None:
        path = self._path(key)
        with _os_errors(path, "delete"):
            path.unlink(missing_ok=True)


class S3Store:
    """An output root ``s3://bucket/prefix``; the bucket must exist.

    Writes are single PUTs (atomic per object); conditional writes use S3's ``If-None-Match: *``
    and ``If-Match: <etag>``, which S3 evaluates atomically.
    """

    def __init__(self, root: str, settings: S3Settings) -> None:
        self.bucket, prefix = _split_s3(root.rstrip("/"))
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._client = _client(settings)
        with _s3_errors(self.uri, "open the output root"):
            self._client.head_bucket(Bucket=self.bucket)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _uri(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def _keys_under(self, prefix: str) -> Iterator[str]:
        pages = self._client.get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):  # folder markers made by consoles
                    yield obj["Key"]

    def _get(self, key: str) -> tuple[bytes, str] | None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _error_code(exc) in _MISSING:
                return None
            raise
        return response["Body"].read(), response["ETag"]

    def read_json(self, key: str) -> Any | None:
        found = self.read_json_versioned(key)
        return None if found is None else found[0]

    def _put_json(
        self, key: str, data: Any, action: str, lost: frozenset[str] = frozenset(), **condition: str
    ) -> bool:
        """PUT JSON at ``key`` (with a conditional header); False if S3 answered a code in
        ``lost`` (the condition failed), other failures raise :class:`StorageError`."""
        with _s3_errors(self._uri(key), action):
            try:
                self._client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    Body=_encode(data),
                    ContentType="application/json",
                    **condition,  # type: ignore[arg-type]
                )
            except ClientError as exc:
                if _error_code(exc) in lost:
                    return False
                raise
        return True

    def write_json(self, key: str, data: Any) -> None:
        self._put_json(key, data, "write")

    def publish_dir(self, local_dir: Path, key: str) -> None:
        """Upload every file (multipart when large), then delete keys under the prefix that
        ``local_dir`` lacks. S3 has no multi-object swap: during the upload a reader may see a
        mix of old and new files, so completion must be recorded elsewhere (a manifest)."""
        base = self._key(key) + "/"
        with _os_errors(local_dir, "list the folder to publish"):
            if not local_dir.is_dir():
                raise StorageError(f"{local_dir}: is not a folder; nothing to publish")
            files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        wanted = set()
        with _s3_errors(self._uri(key), f"publish {local_dir} here"), _os_errors(local_dir, "read"):
            for path in files:
                target = base + path.relative_to(local_dir).as_posix()
                self._client.upload_file(str(path), self.bucket, target)
                wanted.add(target)
            stale = [k for k in self._keys_under(base) if k not in wanted]
            for start in range(0, len(stale), _DELETE_BATCH):
                batch = stale[start : start + _DELETE_BATCH]
                response = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
                if errors := response.get("Errors", []):
                    first = errors[0]
                    raise StorageError(
                        f"{self._uri(key)}: could not delete {len(errors)} stale object(s), "
                        f"first s3://{self.bucket}/{first.get('Key')}: {first.get('Code')} "
                        f"{first.get('Message')} (check delete permissions)"
                    )

    def put_file(self, local_file: Path, key: str) -> None:
        """One upload (multipart when large); S3 makes the object visible only when complete."""
        with _s3_errors(self._uri(key), f"upload {local_file}"), _os_errors(local_file, "read"):
            self._client.upload_file(str(local_file), self.bucket, self._key(key))

    def download_file(self, key: str, local_file: Path) -> bool:
        with _s3_errors(self._uri(key), f"download to {local_file}"):
            try:
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if _error_code(exc) in _MISSING:
                    return False
                raise
            with _os_errors(local_file, "write"):
                local_file.parent.mkdir(parents=True, exist_ok=True)
                self._client.download_file(self.bucket, self._key(key), str(local_file))
        return True

    def download_dir(
        self, key: str, local_dir: Path, suffixes: tuple[str, ...] | None = None
    ) -> list[Path]:
        base = self._key(key) + "/"
        copied = []
        with _s3_errors(self._uri(key), f"download into {local_dir}"):
            for name in sorted(self._keys_under(base)):
                if suffixes is not None and not name.endswith(suffixes):
                    continue
                # Objects written by others may hold ".." or "//": never write outside local_dir.
                target = local_dir / check_key(name[len(base) :])
                with _os_errors(target, "write"):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self._client.download_file(self.bucket, name, str(target))
                copied.append(target)
        return copied

    def exists(self, key: str) -> bool:
        full = self._key(key)
        with _s3_errors(self._uri(key), "stat"):
            try:
                self._client.head_object(Bucket=self.bucket, Key=full)
                return True
            except ClientError as exc:
                if _error_code(exc) not in _MISSING:
                    raise
            listed = self._client.list_objects_v2(Bucket=self.bucket, Prefix=full + "/", MaxKeys=1)
            return listed.get("KeyCount", 0) > 0

    def create_exclusive(self, key: str, data: Any) -> bool:
        return self._put_json(key, data, "create", _CONDITION_LOST, IfNoneMatch="*")

    def read_json_versioned(self, key: str) -> tuple[Any, str] | None:
        """The version is the object's ETag (as S3 returns it, quotes included)."""
        with _s3_errors(self._uri(key), "read"):
            found = self._get(key)
        if found is None:
            return None
        raw, etag = found
        return _decode(raw, self._uri(key)), etag

    def replace_if_version(self, key: str, data: Any, version: str) -> bool:
        return self._put_json(key, data, "replace", _CONDITION_LOST | _MISSING, IfMatch=version)

    def delete(self, key: str) -> None:
        with _s3_errors(self._uri(key), "delete"):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
