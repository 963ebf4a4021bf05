"""Nightly land-cover entry point: ``geoseg run configs/landcover-nightly.yaml`` (or CONFIG).

Run by the schedulers in infra/ (RayCronJob, Kubernetes CronJob, crontab, systemd timer). Only new
or changed scenes are segmented (the manifest at the output root), and the output root's lock makes
a run that starts while the previous one is still going exit with code 3 instead of overlapping.
"""

from __future__ import annotations

import sys
from pathlib import Path

from geoseg.cli import run

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "landcover-nightly.yaml"

if __name__ == "__main__":
    args = sys.argv[1:] or [str(DEFAULT_CONFIG)]
    sys.argv = ["geoseg", "run", *args]
    run()
