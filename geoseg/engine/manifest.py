"""The output root's memory across runs: the manifest of committed scenes, and the run lock.

Manifest (``manifest.json`` at the output root), one record per input URI::

    {"version": 1, "scenes": {URI: {"name", "identity", "weights_sha256", "config_digest",
                                    "status": "running" | "ok" | "failed", "updated", ...}}}

A scene is *unchanged* (skipped by the next run) when its record is ``ok`` and its input
identity (``etag=..;size=..`` or ``size=..;mtime_ns=..``), model weights digest and output config
digest all equal the current ones. A record is written ``running`` before a scene starts and
``ok`` only after its outputs are committed (local: renamed into place; S3: uploaded), so a
driver killed at any point leaves either a committed scene the rerun skips, or a ``running``
record whose folder the rerun may replace.

Lock (``.geoseg.lock``): created exclusively, holding the run id, host, pid and an expiry that a
heartbeat thread pushes forward every ``ttl / 3`` with a compare-and-swap. A second run finds it
and stops with :class:`~geoseg.errors.LockedError`; a lock past its expiry, or held by a dead
process on this host, is stale and taken over (compare-and-swap, so two runs cannot both take it).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from geoseg.errors import LockedError, StorageError
from geoseg.io.storage import OutputStore

log = logging.getLogger(__name__)

MANIFEST_KEY = "manifest.json"
LOCK_KEY = ".geoseg.lock"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Manifest:
    """Records of every input the output root has seen (see the module docstring)."""

    store: OutputStore
    scenes: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def load(cls, store: OutputStore) -> Manifest:
        data = store.read_json(MANIFEST_KEY) or {}
        return cls(store, dict(data.get("scenes", {})))

    def unchanged(self, uri: str, identity: str, weights_sha256: str, config_digest: str) -> bool:
        record = self.scenes.get(uri)
        return (
            record is not None
            and record.get("status") == "ok"
            and record.get("identity") == identity
            and record.get("weights_sha256") == weights_sha256
            and record.get("config_digest") == config_digest
        )

    def owns(self, name: str) -> bool:
        """Whether the output folder ``name`` was written by a run of this manifest."""
        with self._lock:
            return any(r.get("name") == name for r in self.scenes.values())

    def record(self, uri: str, **values: Any) -> None:
        """Set ``uri``'s record and write the manifest (atomically) at once; thread-safe (a scene
        is finished on another thread while the next one starts). If the write fails
        (:class:`StorageError`, e.g. a full disk), the file and the record stay as they were."""
        with self._lock:
            before = self.scenes.get(uri)
            self.scenes[uri] = {**values, "updated": now_iso()}
            try:
                self.store.write_json(MANIFEST_KEY, {"version": 1, "scenes": self.scenes})
            except StorageError:
                # Memory stays what the file says: a later write must not record what this one
                # could not (the next run trusts the file).
                if before is None:
                    del self.scenes[uri]
                else:
                    self.scenes[uri] = before
                raise

    def committed(self) -> dict[str, dict[str, Any]]:
        """Records of scenes whose outputs are committed, by URI."""
        return {u: r for u, r in self.scenes.items() if r.get("status") == "ok"}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The output root's lock, held for a whole run and refreshed by a heartbeat thread."""

    def __init__(self, store: OutputStore, ttl_s: float, run_id: str | None = None) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.run_id = run_id or uuid.uuid4().hex
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "acquired": now_iso(),
            "expires_at": time.time() + self.ttl_s,
        }

    def _stale(self, holder: Mapping[str, Any]) -> str | None:
        """Why the lock held by ``holder`` may be taken over, or None while it is live."""
        if float(holder.get("expires_at", 0)) < time.time():
            return "it expired"
        if holder.get("host") == socket.gethostname() and not _process_alive(
            int(holder.get("pid", -1))
        ):
            return f"its process {holder.get('pid')} on this host is gone"
        return None

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockedError`; starts the heartbeat."""
        for _ in range(3):
            if self.store.create_exclusive(LOCK_KEY, self._body()):
                break
            current = self.store.read_json_versioned(LOCK_KEY)
            if current is None:  # released meanwhile: try again
                continue
            holder, version = current
            if holder.get("run_id") == self.run_id:  # our write landed; a retry hid it
                break
            reason = self._stale(holder)
            if reason is None:
                expires = datetime.fromtimestamp(float(holder["expires_at"]), UTC)
                raise LockedError(
                    f"{self.store.uri}: another geoseg run holds this output root (run "
                    f"{holder.get('run_id')} on {holder.get('host')}, pid {holder.get('pid')}, "
                    f"since {holder.get('acquired')}; lock expires {expires.isoformat()} unless "
                    f"refreshed). Wait for it to finish; if it is dead, its lock goes stale at "
                    f"expiry or delete {LOCK_KEY} at the output root"
                )
            if self.store.replace_if_version(LOCK_KEY, self._body(), version):
                log.warning(
                    "%s: took over a stale lock of run %s (%s)",
                    self.store.uri,
                    holder.get("run_id"),
                    reason,
                )
                break
        else:
            raise LockedError(f"{self.store.uri}: could not take the output root's lock")
        self._thread = threading.Thread(target=self._heartbeat, name="geoseg-lock", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        """Push the expiry forward every ttl / 3. A failed refresh (S3 hiccup) is retried at the
        next beat; the lock counts as lost when another run took it, or when no refresh
        succeeded before our own expiry (another run may take it over from then on)."""
        expires_at = time.time() + self.ttl_s
        while not self._stop.wait(self.ttl_s / 3):
            try:
                current = self.store.read_json_versioned(LOCK_KEY)
                ours = current is not None and current[0].get("run_id") == self.run_id
                if ours and current is not None:
                    body = {**current[0], "expires_at": time.time() + self.ttl_s}
                    if self.store.replace_if_version(LOCK_KEY, body, current[1]):
                        expires_at = body["expires_at"]
                    else:  # lost the swap, or a retry hid that it landed: who holds it now?
                        again = self.store.read_json_versioned(LOCK_KEY)
                        ours = again is not None and again[0].get("run_id") == self.run_id
                if not ours:
                    log.error("%s: another run took the output root's lock", self.store.uri)
                    self.lost.set()
                    return
            except StorageError as exc:
                log.warning("%s: could not refresh the lock: %s", self.store.uri, exc)
                if time.time() >= expires_at:
                    log.error("%s: the lock expired before it could be refreshed", self.store.uri)
                    self.lost.set()
                    return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self.store.read_json_versioned(LOCK_KEY)
        if current is not None and current[0].get("run_id") == self.run_id:
            self.store.delete(LOCK_KEY)
