"""Starting or joining Ray, and choosing the device the model actors run on."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading

import ray

from geoseg.errors import ConfigError

log = logging.getLogger(__name__)

# Object store of the embedded Ray. Its default (30% of RAM) is not a bound on what geoseg holds
# but on how far Ray's shared memory grows: freed objects' pages stay resident, so with the
# default the driver's RSS climbed with the scene size (9 GiB on a 40k x 40k scene). Tiles in
# flight need tens of MiB; beyond the cap Ray spills to disk instead of failing.
OBJECT_STORE_BYTES = 1 << 30
OBJECT_STORE_ENV = "GEOSEG_OBJECT_STORE_BYTES"  # overrides it (a small machine, a pressure test)


def _object_store_bytes() -> int:
    value = os.environ.get(OBJECT_STORE_ENV, str(OBJECT_STORE_BYTES))
    if not value.isdigit() or int(value) < 80 * 2**20:
        raise ConfigError(
            f"{OBJECT_STORE_ENV}={value!r}: give a number of bytes of at least 83886080 (80 MiB, "
            "Ray's minimum)"
        )
    return int(value)


_embedded = threading.Event()  # set: this process started its own local Ray (never grows)
_stop_at_exit = threading.Event()  # set: stop_ray is registered to run at the interpreter's exit


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address``, or start an embedded local Ray (idempotent)."""
    if ray.is_initialized():
        return
    _embedded.clear()
    quiet = log.getEffectiveLevel() > logging.INFO
    # Ray's core worker installs a C-level SIGTERM handler that aborts the process; put back a
    # Python handler the caller set (geoseg run turns SIGTERM into a clean stop).
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        ray.init(address=address, log_to_driver=not quiet)
    else:
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            object_store_memory=_object_store_bytes(),
            include_dashboard=False,
            log_to_driver=not quiet,
            configure_logging=True,
            logging_level=logging.WARNING if quiet else logging.INFO,
        )
        _embedded.set()
    if not _stop_at_exit.is_set():
        # Exit hooks run last registered first: this one before Ray's own (see stop_ray).
        atexit.register(stop_ray)
        _stop_at_exit.set()
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
    log.info("Ray resources: %s", ray.cluster_resources())


def stop_ray() -> None:
    """Stop the local Ray :func:`start_ray` started, or leave the joined cluster (idempotent).

    Runs at the interpreter's exit, before Ray's own exit hook, which would first sleep 0.5 s and
    then stop the autoscaler monitor only after the GCS: the monitor's exit handler reports to
    the GCS, so it then waits out Ray's 1 s grace. Stopping the monitor first, the exit after a
    run's last output took 0.5-0.6 s instead of 2.0-2.2 s (``benchmarks/README.md``).
    """
    if not ray.is_initialized():
        return
    if _embedded.is_set():
        # Ray's node object is private: without it (another Ray version) only the 1 s comes back.
        node = getattr(ray._private.worker, "_global_node", None)
        if node is not None:
            node.kill_monitor(check_alive=False)
    ray.shutdown()
    _embedded.clear()


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))


def embedded() -> bool:
    """Whether Ray is the local one :func:`start_ray` started: its resources never grow."""
    return _embedded.is_set()
