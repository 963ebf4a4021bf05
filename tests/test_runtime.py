"""Stopping the embedded Ray: every process it started is gone, and a second stop does nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# In its own interpreter: the session's Ray (conftest's ray_local) must not be the one stopped.
CHILD = textwrap.dedent(
    """
    import json, os

    import ray

    from geoseg.engine import runtime

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    runtime.start_ray(None, num_cpus=1)
    node = ray._private.worker._global_node
    pids = {k: [info.process.pid for info in infos] for k, infos in node.all_processes.items()}
    embedded = runtime.embedded()
    runtime.stop_ray()
    runtime.stop_ray()  # nothing left to stop
    print(json.dumps({
        "pids": pids,
        "alive": sorted(kind for kind, ps in pids.items() if any(alive(p) for p in ps)),
        "embedded_before": embedded,
        "embedded_after": runtime.embedded(),
        "initialized_after": ray.is_initialized(),
    }))
    """
)


def test_stop_ray_stops_every_process_of_the_embedded_ray_the_monitor_included() -> None:
    child = subprocess.run(
        [sys.executable, "-c", CHILD], check=False, capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr
    assert "Traceback" not in child.stderr
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert {"gcs_server", "raylet", "monitor"} <= set(report["pids"])
    assert report["alive"] == []
    assert report["embedded_before"] is True
    assert report["embedded_after"] is False
    assert report["initialized_after"] is False
