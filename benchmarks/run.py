"""geoseg benchmark: raw model throughput, end-to-end ``geoseg segment``, process-tree memory.

Usage (from the repository root)::

    python -m benchmarks.run [--quick] [--out benchmarks/out] [--precision fp32|bf16]

In one run it measures

1. the raw forward throughput of the model in this process (``model(x)`` under
   ``torch.inference_mode`` on pre-read, pre-normalised 512 x 512 tiles, channels_last, all cores),
   the upper bound of what the pipeline can reach; plus the actor's whole ``predict`` step;
2. ``geoseg segment`` end to end on a generated scene (10k x 10k, 4 bands uint8), as a subprocess,
   honest wall clock, with the split of its time from ``run.json``;
3. the peak memory of the whole process tree (driver, GCS, raylet, workers) for a 10k x 10k scene
   and a 40k x 40k one (a VRT mosaic of the first), with a small model.

Prints a Markdown table ready for the README and writes ``OUT/results.json``. ``--quick`` runs a
reduced version (4k and 8k scenes, the small model end to end) to check the harness in minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from benchmarks.proctree import (
    CpuSnapshot,
    MonitoredRun,
    foreign_cpu_share,
    run_monitored,
    wait_for_quiet,
)
from benchmarks.scenes import make_mosaic_vrt, make_scene
from geoseg.engine.actors import SegmentationWorker
from geoseg.engine.scene import SegmentOptions
from geoseg.io.rasters import open_scene, read_tile
from geoseg.models.card import ModelCard, read_card
from geoseg.models.store import init_model, load_model, normalize

REPO = Path(__file__).resolve().parents[1]
BANDS = ["red", "green", "blue", "nir"]
CLASSES = ["water", "vegetation", "built", "bare"]
BATCH = 4
MB = 1024 * 1024
CLEAN_SHARE = 0.10  # a timed pass counts as clean when other processes used less of the CPU


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: a U-Net written once under ``OUT/models/<name>``."""

    name: str
    arch_args: dict[str, int]
    label: str


DEFAULT_MODEL = ModelSpec("unet-d4-c32", {}, "U-Net depth 4, 32 ch (default, ~4.3M params)")
SMALL_MODEL = ModelSpec(
    "unet-d3-c8", {"depth": 3, "base_channels": 8}, "U-Net depth 3, 8 ch (small)"
)


@dataclass(frozen=True)
class Config:
    """What one benchmark run measures."""

    out: Path
    quick: bool
    precision: str
    e2e_size: int  # edge of the end-to-end scene
    e2e_model: ModelSpec
    mem_repeat: int  # the large memory scene is the end-to-end scene mosaicked n x n times
    raw_tiles: int
    raw_passes: int
    raw_max_passes: int
    polygons: bool
    polygon_timeout_s: float
    run_timeout_s: float
    max_wait_quiet_s: float
    memory_limit_bytes: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        quick = bool(args.quick)
        return cls(
            out=Path(args.out or ("benchmarks/out/quick" if quick else "benchmarks/out")),
            quick=quick,
            precision=args.precision,
            e2e_size=4000 if quick else 10_000,
            e2e_model=SMALL_MODEL if quick else DEFAULT_MODEL,
            mem_repeat=2 if quick else 4,
            raw_tiles=16,
            raw_passes=1 if quick else 3,
            raw_max_passes=2 if quick else 10,
            polygons=not args.no_polygons,
            polygon_timeout_s=300 if quick else args.polygon_timeout,
            run_timeout_s=600 if quick else args.run_timeout,
            max_wait_quiet_s=min(args.max_wait_quiet, 30) if quick else args.max_wait_quiet,
            memory_limit_bytes=int(args.memory_limit_gib * 2**30),
        )


# ----------------------------------------------------------------------------------------------
# Helpers


def rel(path: Path) -> str:
    """``path`` relative to the repository root when it is inside it (for printed commands)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def log(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


def machine_info(precision: str) -> dict[str, Any]:
    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "precision": precision,
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


def code_version() -> dict[str, str]:
    """The geoseg code being measured: git HEAD and a digest of the sources on disk now.

    The working tree may change while the benchmark runs (someone else editing it); comparing
    the digest before and after a measurement shows whether it measured one version.
    """
    digest = hashlib.sha256()
    for path in sorted((REPO / "geoseg").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(path.read_bytes())
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {"git_head": head or "?", "sources_sha256": digest.hexdigest()[:16]}


def ensure_model(out: Path, spec: ModelSpec) -> Path:
    """Create the model directory once (seeded weights, so reruns get the same model)."""
    model_dir = out / "models" / spec.name
    if not (model_dir / "model.yaml").exists():
        init_model("unet", BANDS, CLASSES, model_dir, arch_args=dict(spec.arch_args), seed=0)
    return model_dir


def mp(pixels: float) -> float:
    return pixels / 1e6


def settle(cfg: Config, what: str) -> dict[str, float]:
    """Wait (bounded) for other users' load on the machine to go away before measuring."""
    if cfg.max_wait_quiet_s <= 0:
        return {"waited_s": 0.0, "busy_share_before": float("nan")}
    waited, share = wait_for_quiet(cfg.max_wait_quiet_s)
    if share > 0.15:
        log(
            f"{what}: machine still {share:.0%} busy after waiting {waited:.0f} s; measuring anyway"
        )
    elif waited > 10:
        log(f"{what}: waited {waited:.0f} s for the machine to be idle")
    return {"waited_s": waited, "busy_share_before": share}


# ----------------------------------------------------------------------------------------------
# 1. Raw forward throughput, in process


@dataclass
class Pass:
    """One timed pass over all batches, and how busy other processes kept the machine."""

    tiles: int
    seconds: float
    batch_s: list[float]
    foreign_cpu_share: float


@dataclass
class ForwardTiming:
    """Timed passes of a function over fixed batches.

    On a shared machine a pass during which other processes used the CPU is slower for reasons
    unrelated to geoseg: the figure is taken over the *clean* passes (other load below
    ``CLEAN_SHARE``) when there are any, else over all passes (and flagged).
    """

    tile_pixels: int
    passes: list[Pass]

    @property
    def clean(self) -> list[Pass]:
        return [p for p in self.passes if p.foreign_cpu_share < CLEAN_SHARE] or self.passes

    @property
    def mp_per_s(self) -> float:
        used = self.clean
        return mp(sum(p.tiles for p in used) * self.tile_pixels) / sum(p.seconds for p in used)

    @property
    def foreign_cpu_share(self) -> float:
        """Other load during the passes the figure is taken over (time-weighted)."""
        used = self.clean
        return sum(p.foreign_cpu_share * p.seconds for p in used) / sum(p.seconds for p in used)

    def to_json(self) -> dict[str, Any]:
        batch_s = [b for p in self.clean for b in p.batch_s]
        return {
            "tile_pixels": self.tile_pixels,
            "mp_per_s": self.mp_per_s,
            "foreign_cpu_share": self.foreign_cpu_share,
            "clean_passes": sum(p.foreign_cpu_share < CLEAN_SHARE for p in self.passes),
            "batch_s_median": statistics.median(batch_s),
            "batch_s_min": min(batch_s),
            "batch_s_max": max(batch_s),
            "passes": [asdict(p) for p in self.passes],
        }


def time_batches(
    fn: Callable[[Any], object],
    batches: list[Any],
    tiles_per_batch: list[int],
    passes: int,
    max_passes: int,
) -> list[Pass]:
    """Warm up on one batch, then time passes over all batches.

    Stops after ``passes`` clean passes (other processes' load below ``CLEAN_SHARE``, from this
    process's CPU time against the machine's) or ``max_passes`` passes in all.
    """
    fn(batches[0])
    me = psutil.Process()
    done: list[Pass] = []
    while len(done) < max_passes:
        own_start, machine_start = sum(me.cpu_times()[:2]), CpuSnapshot.now()
        start = time.perf_counter()
        times = []
        for batch in batches:
            t0 = time.perf_counter()
            fn(batch)
            times.append(time.perf_counter() - t0)
        wall = time.perf_counter() - start
        own = sum(me.cpu_times()[:2]) - own_start
        share = foreign_cpu_share(CpuSnapshot.now().since(machine_start), own, wall)
        done.append(Pass(sum(tiles_per_batch), sum(times), times, share))
        if sum(p.foreign_cpu_share < CLEAN_SHARE for p in done) >= passes:
            break
    return done


def read_sample_tiles(
    scene_path: Path, card: ModelCard, count: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """``count`` tiles spread evenly over the scene's tile grid: data, validity, read seconds."""
    scene = open_scene(str(scene_path), card)
    grid = SegmentOptions().grid_for(card, scene.height, scene.width)
    tiles = grid.tiles()
    picks = [tiles[i] for i in np.linspace(0, len(tiles) - 1, count).round().astype(int)]
    t0 = time.perf_counter()
    parts = [read_tile(scene, t.row_off, t.col_off, t.height, t.width) for t in picks]
    read_s = time.perf_counter() - t0
    return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]), read_s


def bench_forward(model_dir: Path, scene_path: Path, precision: str, cfg: Config) -> dict[str, Any]:
    """Raw ``model(x)`` and the actor's whole ``predict`` on the same fixed batches."""
    torch.set_num_threads(os.cpu_count() or 1)
    card, model, _ = load_model(model_dir)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    data, valid, read_s = read_sample_tiles(scene_path, card, cfg.raw_tiles)
    tile_pixels = data.shape[-2] * data.shape[-1]
    starts = range(0, len(data), BATCH)
    inputs = [
        normalize(torch.from_numpy(data[i : i + BATCH]), card).contiguous(
            memory_format=torch.channels_last
        )
        for i in starts
    ]
    sizes = [len(x) for x in inputs]
    bf16 = precision == "bf16"

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out: torch.Tensor = model(x)
        return out

    raw = ForwardTiming(
        tile_pixels, time_batches(forward, inputs, sizes, cfg.raw_passes, cfg.raw_max_passes)
    )

    worker = SegmentationWorker(str(model_dir), "cpu", precision, os.cpu_count() or 1)
    raw_batches = [(data[i : i + BATCH], valid[i : i + BATCH], 0.0) for i in starts]
    actor = ForwardTiming(
        tile_pixels,
        time_batches(worker.predict, raw_batches, sizes, cfg.raw_passes, cfg.raw_max_passes),
    )
    return {
        "model": str(model_dir),
        "precision": precision,
        "threads": torch.get_num_threads(),
        "tile": list(data.shape[-2:]),
        "batch": BATCH,
        "raw": raw.to_json(),
        "actor_predict": actor.to_json(),
        "read_1thread": {
            "tiles": len(data),
            "seconds": read_s,
            "mp_per_s": mp(len(data) * tile_pixels) / read_s,
        },
    }


# ----------------------------------------------------------------------------------------------
# 2 and 3. geoseg segment as a subprocess


def segment_command(
    scene: Path,
    model_dir: Path,
    out: Path,
    *,
    precision: str,
    polygons: bool,
    confidence: bool = True,
) -> list[str]:
    cmd = [sys.executable, "-m", "geoseg", "-q", "segment", str(scene)]
    cmd += ["--model", str(model_dir), "--out", str(out), "--batch-size", str(BATCH)]
    cmd += ["--precision", precision, "--overwrite"]
    if not polygons:
        cmd.append("--no-polygons")
    if not confidence:
        cmd.append("--no-confidence")
    return cmd


def printable(cmd: list[str]) -> str:
    """The command as a user would type it (``geoseg`` entry point, repository-relative paths)."""
    words = ["geoseg"]
    for word in cmd[3:]:
        words.append(rel(Path(word)) if os.sep in word else word)
    return " ".join(words)


def analyse_run(run: MonitoredRun, out: Path, model_dir: Path) -> dict[str, Any]:
    """Throughput and time split of a finished ``geoseg segment`` run, from its ``run.json``."""
    result: dict[str, Any] = {**run.to_json(), "command": printable(run.command)}
    result["loadavg_end"] = os.getloadavg()
    run_json = out / "run.json"
    if run.returncode != 0 or not run_json.exists():
        result["ok"] = False
        return result
    record = json.loads(run_json.read_text())
    scene = record["scenes"][0]
    result["ok"] = scene["status"] == "ok"
    if not result["ok"]:
        result["error"] = scene["error"]
        return result
    card = read_card(model_dir)
    height, width = scene["height"], scene["width"]
    grid = SegmentOptions().grid_for(card, height, width)
    scene_px = height * width
    model_px = len(grid) * grid.tile_height * grid.tile_width
    timings = scene["timings_s"]
    job_s = (
        datetime.fromisoformat(record["finished"]) - datetime.fromisoformat(record["started"])
    ).total_seconds()
    wall = run.wall_s
    cores = os.cpu_count() or 1
    result.update(
        {
            "height": height,
            "width": width,
            "tiles": scene["tiles"],
            "tile_size": [grid.tile_height, grid.tile_width],
            "overlap": grid.overlap,
            "scene_pixels": scene_px,
            "model_pixels": model_px,
            "overhead_factor": model_px / scene_px,
            "timings_s": timings,
            "polygons": scene.get("polygons"),
            "job_s": job_s,
            # Ray start, actor start and model load, pool shutdown (inside segment(), outside
            # the scene); and interpreter start, imports, process exit (outside segment()).
            "ray_overhead_s": job_s - timings["total_s"],
            "process_overhead_s": wall - job_s,
            "startup_share": (wall - timings["total_s"]) / wall,
            "scene_mp_per_s": mp(scene_px) / wall,
            "model_mp_per_s": mp(model_px) / wall,
            "scene_mp_per_s_in_scene": mp(scene_px) / timings["total_s"],
            "model_mp_per_s_in_scene": mp(model_px) / timings["total_s"],
            "actor_busy_share": timings["infer_s"] / timings["total_s"],
            "cpu_utilisation": run.tree.cpu_s / (wall * cores),
        }
    )
    return result


def run_segment(
    label: str,
    scene: Path,
    model_dir: Path,
    cfg: Config,
    *,
    polygons: bool,
    confidence: bool = True,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    out = cfg.out / "runs" / label
    cmd = segment_command(
        scene, model_dir, out, precision=cfg.precision, polygons=polygons, confidence=confidence
    )
    log(f"{label}: {printable(cmd)}")
    quiet = settle(cfg, label)
    loadavg = os.getloadavg()
    code = code_version()
    logs = cfg.out / "logs"
    run = run_monitored(
        cmd,
        logs / f"{label}.log",
        timeout_s or cfg.run_timeout_s,
        limit_bytes=cfg.memory_limit_bytes,
    )
    run.tree.write_timeline(logs / f"{label}.memory.csv")
    result = analyse_run(run, out, model_dir)
    result["loadavg_start"] = loadavg
    result["settle"] = quiet
    result["code"] = code
    result["code_changed"] = code_version() != code
    if result["code_changed"]:
        log(f"{label}: WARNING: the geoseg sources changed on disk during this run")
    state = "ok" if result["ok"] else "FAILED"
    if run.timed_out:
        state = "TIMED OUT"
    elif run.stopped_for_memory:
        state = "STOPPED (memory limit)"
    log(
        f"{label}: {state} in {run.wall_s:.1f} s, peak tree RSS "
        f"{run.tree.peak_tree_rss / MB:.0f} MiB, driver {run.tree.peak_driver_rss / MB:.0f} MiB"
    )
    return result


# ----------------------------------------------------------------------------------------------
# Report


def fmt_mib(n: float) -> str:
    return f"{n / MB:,.0f} MiB"


SAME = "(same run)"
BUSY_THRESHOLD = 0.05


def busy(share: float, run: dict[str, Any] | None = None) -> str:
    """Warnings for a value measured on a loaded machine or while the sources changed."""
    note = ""
    if share >= BUSY_THRESHOLD:
        note += f" ⚠ other processes used {share:.0%} of the CPU meanwhile"
    if run is not None and run.get("code_changed"):
        note += " ⚠ geoseg sources changed on disk during the run"
    return note


def run_state(run: dict[str, Any]) -> str:
    if run.get("timed_out"):
        return "timed out"
    if run.get("stopped_for_memory"):
        return "stopped at the memory limit"
    return "failed"


def memory_value(tree: dict[str, Any]) -> str:
    """Peak memory of a run: RSS sums (the figure asked for), then PSS/USS (no double counts)."""
    return (
        f"RSS tree {fmt_mib(tree['peak_tree_rss'])}, driver {fmt_mib(tree['peak_driver_rss'])}; "
        f"PSS tree {fmt_mib(tree['peak_tree_pss'])}, USS driver {fmt_mib(tree['peak_driver_uss'])}"
    )


def table_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, value, command) rows of the README table."""
    rows: list[tuple[str, str, str]] = []
    cfg = results["config"]
    bench = "python -m benchmarks.run" + (" --quick" if cfg["quick"] else "")
    if cfg["precision"] != "fp32":
        bench += f" --precision {cfg['precision']}"
    fwd_by_key = {(f["model_name"], f["precision"]): f for f in results["forward"]}
    for fwd in results["forward"]:
        rows.append(
            (
                f"Raw forward `model(x)`, {fwd['model_label']}, {fwd['precision']}, "
                f"{fwd['tile'][0]}² tiles, batch {fwd['batch']}, {fwd['threads']} threads",
                f"{fwd['raw']['mp_per_s']:.2f} MP/s" + busy(fwd["raw"]["foreign_cpu_share"]),
                bench,
            )
        )
        rows.append(
            (
                f"Actor `predict` (normalise + forward + softmax + fp16), {fwd['model_name']}, "
                f"{fwd['precision']}",
                f"{fwd['actor_predict']['mp_per_s']:.2f} MP/s"
                + busy(fwd["actor_predict"]["foreign_cpu_share"]),
                bench,
            )
        )
    e2e = results.get("e2e")
    if e2e and e2e.get("ok"):
        raw = fwd_by_key[(cfg["e2e_model"], cfg["precision"])]["raw"]["mp_per_s"]
        size = f"{e2e['height']:,}×{e2e['width']:,}"
        rows += [
            (
                f"End to end, {size}, {cfg['e2e_model']}, no polygons: wall clock",
                f"{e2e['wall_s']:.1f} s" + busy(e2e["foreign_cpu_share"], e2e),
                e2e["command"],
            ),
            (
                "End to end: scene pixels / wall s (ratio to raw forward)",
                f"{e2e['scene_mp_per_s']:.2f} MP/s ({e2e['scene_mp_per_s'] / raw:.0%})",
                SAME,
            ),
            (
                "End to end: model pixels (tiles × tile area) / wall s (ratio to raw forward)",
                f"{e2e['model_mp_per_s']:.2f} MP/s ({e2e['model_mp_per_s'] / raw:.0%})",
                SAME,
            ),
            (
                f"Overlap overhead: tiles × tile area / scene pixels ({e2e['tiles']} tiles)",
                f"{e2e['overhead_factor']:.3f}",
                SAME,
            ),
            (
                "Startup + shutdown outside the scene (Ray, actor, imports), share of wall",
                f"{e2e['wall_s'] - e2e['timings_s']['total_s']:.1f} s "
                f"({e2e['startup_share']:.0%}; Ray part {e2e['ray_overhead_s']:.1f} s)",
                SAME,
            ),
            (
                "Scene time only: scene pixels / `total_s` (ratio to raw forward)",
                f"{e2e['scene_mp_per_s_in_scene']:.2f} MP/s "
                f"({e2e['scene_mp_per_s_in_scene'] / raw:.0%})",
                SAME,
            ),
            (
                "Scene time split (run.json): actor `infer_s` / `read_s` (sum over read tasks) / "
                "driver `wait_s` / `stitch_s` / `cog_s`",
                " / ".join(
                    f"{e2e['timings_s'][k]:.1f} s"
                    for k in ("infer_s", "read_s", "wait_s", "stitch_s", "cog_s")
                )
                + f" (actor busy {e2e['actor_busy_share']:.0%} of `total_s`)",
                SAME,
            ),
            ("Peak memory, whole tree", memory_value(e2e["tree"]), SAME),
        ]
    poly = results.get("e2e_polygons")
    if poly:
        if poly.get("ok"):
            t = poly["timings_s"]
            value = (
                f"{poly['wall_s']:.1f} s wall, polygons {t.get('polygons_s', 0):.1f} s, "
                f"{poly['polygons']:,} polygons, peak tree RSS "
                f"{fmt_mib(poly['tree']['peak_tree_rss'])}"
            )
        else:
            value = f"{run_state(poly)} after {poly['wall_s']:.0f} s"
        value += busy(poly["foreign_cpu_share"], poly)
        rows.append(
            (f"End to end with polygons ({poly.get('height', '?')}²)", value, poly["command"])
        )
    mem = results.get("memory", {})
    small, large = mem.get("small"), mem.get("large")
    for run in (small, large):
        if not run:
            continue
        if not run.get("ok"):
            rows.append(
                (
                    f"Memory run {run_state(run)}",
                    f"after {run['wall_s']:.0f} s, peak RSS tree "
                    f"{fmt_mib(run['tree']['peak_tree_rss'])}, driver "
                    f"{fmt_mib(run['tree']['peak_driver_rss'])}",
                    run["command"],
                )
            )
            continue
        size = f"{run['height']:,}×{run['width']:,}"
        rows.append(
            (
                f"{size}, small model, no polygons/confidence: wall; MP/s",
                f"{run['wall_s']:.1f} s; {run['scene_mp_per_s']:.2f} MP/s"
                + busy(run["foreign_cpu_share"], run),
                run["command"],
            )
        )
        rows.append((f"{size}: peak memory", memory_value(run["tree"]), SAME))
    ratios = mem.get("ratios")
    if ratios:
        rows.append(
            (
                f"Peak memory ratio {large['height'] // 1000}k / {small['height'] // 1000}k "
                "(goal ≤ 1.3)",
                f"tree RSS {ratios['tree_rss']:.2f}, driver RSS {ratios['driver_rss']:.2f}; "
                f"tree PSS {ratios['tree_pss']:.2f}, driver USS {ratios['driver_uss']:.2f}",
                bench,
            )
        )
    return rows


def markdown_table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| Figure | Value | Command |", "|---|---|---|"]
    for figure, value, command in rows:
        lines.append(f"| {figure} | {value} | `{command}` |")
    return "\n".join(lines)


def machine_line(results: dict[str, Any]) -> str:
    info, start, end = results["machine"], results["code_start"], results["code_end"]
    code = f"geoseg at {start['git_head']} (sources {start['sources_sha256']})"
    if end != start:
        code += f", changed to {end['git_head']} (sources {end['sources_sha256']}) by the end"
    return (
        f"Machine: {info['cores']} cores ({info['cpu']}, torch CPU capability "
        f"{info['cpu_capability']}), {info['memory_gib']} GiB RAM; torch {info['torch']} with "
        f"{info['torch_threads']} threads; precision {info['precision']}; load average "
        f"{info['loadavg_start'][0]:.2f} at start, {info['loadavg_end'][0]:.2f} at end. {code}."
    )


def save(results: dict[str, Any], out: Path) -> None:
    path = out / "results.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# Main


def run_all(cfg: Config) -> dict[str, Any]:
    started = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    results: dict[str, Any] = {
        "started": datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(cfg.precision),
        "code_start": code_version(),
        "config": {
            "quick": cfg.quick,
            "precision": cfg.precision,
            "e2e_size": cfg.e2e_size,
            "e2e_model": cfg.e2e_model.name,
            "mem_repeat": cfg.mem_repeat,
            "batch": BATCH,
            "raw_tiles": cfg.raw_tiles,
            "raw_passes": cfg.raw_passes,
        },
    }

    log(f"scene {cfg.e2e_size}² (cached under {rel(cfg.out)})")
    t0 = time.perf_counter()
    scene = make_scene(cfg.out, cfg.e2e_size)
    big = cfg.e2e_size * cfg.mem_repeat
    vrt = make_mosaic_vrt(scene, cfg.mem_repeat, cfg.out / f"scene{big // 1000}k.vrt")
    results["scenes"] = {
        "scene": rel(scene),
        "scene_bytes": scene.stat().st_size,
        "vrt": rel(vrt),
        "prepare_s": time.perf_counter() - t0,
    }
    models = {
        spec.name: (spec, ensure_model(cfg.out, spec)) for spec in (DEFAULT_MODEL, SMALL_MODEL)
    }

    precisions = ["fp32"] if cfg.precision == "fp32" else ["fp32", cfg.precision]
    results["forward"] = []
    for spec, model_dir in models.values():
        for precision in precisions:
            log(f"raw forward: {spec.name} {precision}")
            quiet = settle(cfg, "raw forward")
            fwd = bench_forward(model_dir, scene, precision, cfg)
            fwd["settle"], fwd["code"] = quiet, code_version()
            fwd["model_name"], fwd["model_label"] = spec.name, spec.label
            log(
                f"raw forward: {fwd['raw']['mp_per_s']:.2f} MP/s; actor predict "
                f"{fwd['actor_predict']['mp_per_s']:.2f} MP/s"
            )
            results["forward"].append(fwd)
    save(results, cfg.out)

    e2e_dir = models[cfg.e2e_model.name][1]
    results["e2e"] = run_segment("e2e", scene, e2e_dir, cfg, polygons=False)
    save(results, cfg.out)

    small_dir = models[SMALL_MODEL.name][1]
    mem: dict[str, Any] = {}
    for key, path in (("small", scene), ("large", vrt)):
        mem[key] = run_segment(
            f"memory-{key}", path, small_dir, cfg, polygons=False, confidence=False
        )
        results["memory"] = mem
        save(results, cfg.out)
    if mem["small"].get("ok") and mem["large"].get("ok"):
        small_tree, large_tree = mem["small"]["tree"], mem["large"]["tree"]
        mem["ratios"] = {
            "tree_rss": large_tree["peak_tree_rss"] / small_tree["peak_tree_rss"],
            "driver_rss": large_tree["peak_driver_rss"] / small_tree["peak_driver_rss"],
            "tree_pss": large_tree["peak_tree_pss"] / small_tree["peak_tree_pss"],
            "driver_uss": large_tree["peak_driver_uss"] / small_tree["peak_driver_uss"],
        }
    save(results, cfg.out)

    if cfg.polygons:
        results["e2e_polygons"] = run_segment(
            "e2e-polygons", scene, e2e_dir, cfg, polygons=True, timeout_s=cfg.polygon_timeout_s
        )
    results["total_s"] = time.perf_counter() - started
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["code_end"] = code_version()
    save(results, cfg.out)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="Reduced run to check the harness.")
    parser.add_argument(
        "--out",
        help="Output folder [benchmarks/out; --quick: benchmarks/out/quick, so that a quick run "
        "never overwrites a full run's results].",
    )
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument(
        "--no-polygons", action="store_true", help="Skip the end-to-end run with polygons."
    )
    parser.add_argument(
        "--polygon-timeout",
        type=float,
        default=1800,
        help="Seconds before the run with polygons is stopped [%(default)s].",
    )
    parser.add_argument(
        "--max-wait-quiet",
        type=float,
        default=300,
        help="Before each measurement, wait up to this many seconds for the machine's CPU to be "
        "idle (other users' load) [%(default)s; --quick: at most 30].",
    )
    parser.add_argument(
        "--memory-limit-gib",
        type=float,
        default=round(psutil.virtual_memory().total / 2**30 * 0.6, 1),
        help="Stop a geoseg run whose process tree's RSS passes this [60%% of RAM: %(default)s].",
    )
    parser.add_argument(
        "--run-timeout",
        type=float,
        default=3600,
        help="Seconds before any other geoseg run is stopped [%(default)s].",
    )
    cfg = Config.from_args(parser.parse_args(argv))
    results = run_all(cfg)
    rows = table_rows(results)
    print()
    print(markdown_table(rows))
    print()
    print(machine_line(results))
    total_min = results["total_s"] / 60
    print(f"Benchmark total: {total_min:.1f} min; results in {rel(cfg.out)}/results.json")


if __name__ == "__main__":
    main()
