"""Ray job entry point: run a job config (``geoseg run CONFIG``) on the cluster it was submitted to.

``geoseg submit CONFIG --address http://HEAD:8265`` starts it through the Ray Jobs API; KubeRay's
RayJob runs it as its entrypoint (infra/kuberay/rayjob.yaml). Inside a Ray job ``RAY_ADDRESS`` is
set, so geoseg joins that cluster instead of starting one. Exit codes are ``geoseg run``'s.
"""

from __future__ import annotations

import sys

from geoseg.cli import run

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python jobs/segment_bucket.py CONFIG [geoseg run options]")
    sys.argv = ["geoseg", "run", *sys.argv[1:]]
    run()
