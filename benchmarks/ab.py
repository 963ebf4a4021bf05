"""Old code against new on one ``geoseg`` command, alternating, from one shell (A/B).

Usage (from the repository root)::

    python -m benchmarks.ab REV [--pairs N] -- segment SCENE... --model DIR [options]

The *old* arm is the ``geoseg`` package of git revision ``REV`` (``git archive``; or ``REV`` is a
folder that holds a ``geoseg`` package), the *new* arm the working tree. Runs alternate old, new,
old, new... (the VM's speed drifts over minutes), each as ``python -m geoseg -q ARGS --out
<temp>/<arm><i>`` from an empty folder with the arm's tree first on ``PYTHONPATH``: Python puts the
working directory first on ``sys.path``, so a run started from the repository would import the
working tree whatever ``PYTHONPATH`` says (one session's A/B figures compared the new code with
itself that way). Each arm's import path is checked before its first run. Arguments naming existing
files or folders are made absolute.

Prints each run's wall clock, the time before its first scene, in its scenes and after its last
scene, the pipeline's own timers summed over the scenes (run.json: read, infer, blend, wait, stitch,
crf, cog), each arm's mean, and whether the arms' class maps and confidence rasters are equal, pixel
for pixel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import rasterio

REPO = Path(__file__).resolve().parent.parent


def old_tree(rev: str, into: Path) -> Path:
    """The ``geoseg`` package of ``rev``, unpacked under ``into``; or ``rev`` itself, a folder
    holding a ``geoseg`` package (a machine without the repository's history: a GPU box)."""
    if (Path(rev) / "geoseg" / "__init__.py").exists():
        return Path(rev).resolve()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "geoseg"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def arm_env(tree: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]),
    }


def check_imports(tree: Path, cwd: Path) -> None:
    """Fail unless ``geoseg`` imports from ``tree`` in the arm's environment."""
    found = subprocess.run(
        [sys.executable, "-c", "import geoseg; print(geoseg.__file__)"],
        cwd=cwd, env=arm_env(tree), check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the arm of {tree} imports geoseg from {found}: not an A/B")


def absolute(args: list[str]) -> list[str]:
    return [
        str(Path(a).resolve()) if not a.startswith("-") and Path(a).exists() else a for a in args
    ]


def run_once(tree: Path, args: list[str], out: Path, cwd: Path) -> dict[str, float]:
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "geoseg", "-q", *args, "--out", str(out)],
        check=False, cwd=cwd, env=arm_env(tree), capture_output=True, text=True,
    )  # fmt: skip
    end = time.time()
    if done.returncode != 0:
        raise SystemExit(f"exit code {done.returncode}:\n{done.stderr[-2000:]}")
    scenes = json.loads((out / "run.json").read_text())["scenes"]
    first = min(datetime.fromisoformat(s["started"]).timestamp() for s in scenes)
    last = max(datetime.fromisoformat(s["finished"]).timestamp() for s in scenes)
    return {
        "wall": end - start,
        "before": first - start,
        "scenes": last - first,
        "after": end - last,
        # The pipeline's own timers (run.json), summed over the scenes.
        **{
            key: sum(s["timings_s"].get(f"{key}_s", 0.0) for s in scenes)
            for key in ("read", "infer", "blend", "wait", "stitch", "crf", "cog")
        },
    }


def differences(a: Path, b: Path) -> str:
    """Pixels that differ between the rasters of two runs' outputs, per scene and raster."""
    lines = []
    for mask in sorted(a.glob("*/mask.tif")):
        for name in ("mask.tif", "confidence.tif"):
            other = b / mask.parent.name / name
            if not (mask.parent / name).exists() or not other.exists():
                continue
            with rasterio.open(mask.parent / name) as x, rasterio.open(other) as y:
                differ = int(np.count_nonzero(x.read() != y.read()))
            lines.append(f"{mask.parent.name}/{name}: {differ} pixels differ")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], usage="%(prog)s REV [--pairs N] -- GEOSEG_ARGS..."
    )
    parser.add_argument(
        "rev", help="git revision of the old arm, or a folder holding its geoseg package"
    )
    parser.add_argument("--pairs", type=int, default=2, help="old/new pairs [2]")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    opts = parser.parse_args(argv[:split])
    args = absolute(argv[split + 1 :])
    if not args or "--out" in args:
        parser.error("give geoseg's arguments after --, without --out (each run gets its own)")
    with tempfile.TemporaryDirectory(prefix="geoseg-ab-") as tmp:
        root = Path(tmp)
        (root / "old").mkdir()
        (root / "cwd").mkdir()
        arms = {"old": old_tree(opts.rev, root / "old"), "new": REPO}
        for tree in arms.values():
            check_imports(tree, root / "cwd")
        walls: dict[str, list[float]] = {arm: [] for arm in arms}
        for pair in range(1, opts.pairs + 1):
            for arm, tree in arms.items():
                t = run_once(tree, args, root / f"{arm}{pair}", root / "cwd")
                walls[arm].append(t["wall"])
                print(
                    f"{arm}{pair}: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()), flush=True
                )
        for arm, values in walls.items():
            label = opts.rev if arm == "old" else "working tree"
            print(f"{arm} ({label}): mean wall {statistics.mean(values):.2f} s")
        print(differences(root / "old1", root / "new1"))


if __name__ == "__main__":
    main()
