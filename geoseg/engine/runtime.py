"""Starting or joining Ray, and choosing the device the model actors run on."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address``, or start an embedded local Ray (idempotent)."""
    if ray.is_initialized():
        return
    quiet = log.getEffectiveLevel() > logging.INFO
    if address:
        ray.init(address=address, log_to_driver=not quiet)
    else:
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            log_to_driver=not quiet,
            configure_logging=True,
            logging_level=logging.WARNING if quiet else logging.INFO,
        )
    log.info("Ray resources: %s", ray.cluster_resources())


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))
