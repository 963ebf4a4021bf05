"""Ray job entry point: segment a list of scenes on the cluster this job was submitted to.

Submit with the Ray Jobs API, e.g.::

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/segment_scenes.py --model models/demo --out results scene1.tif scene2.tif

Inside a Ray job ``RAY_ADDRESS`` is set, so geoseg joins that cluster instead of starting one.
"""

from __future__ import annotations

import os
import sys

from geoseg.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    address = os.environ.get("RAY_ADDRESS")
    if address and "--address" not in args:
        args = [*args, "--address", address]
    main(["segment", *args])
