"""geoseg benchmark: the model's limit, end-to-end ``geoseg segment``, memory, the peer tools.

Usage (from the repository root)::

    python -m benchmarks.run [--quick] [--out benchmarks/out]

In one run, with the same models, tiles and thread count throughout, it measures

1. the raw forward throughput of each benchmark model (U-Nets trained briefly on the generated
   scene's own classes, so that their decisions are as stable as a real model's) in every form
   the pipeline offers (fp32, bf16 autocast, each eager and compiled (``--compile``: on the CPU
   an AOTInductor package, ``geoseg.engine.aot``); on the CPU each also as 2 streams of half the
   threads, ``--streams 2``), with each form's class-map
   agreement with eager fp32. The *limit* is the fastest form within 0.1% of fp32; the actor's
   whole step is timed in that form too;
2. ``geoseg segment`` end to end in the limit form's precision and compilation, in the default
   layout (one actor; on the CPU 2 streams of half the cores), on a generated 10k x 10k 4-band
   scene, as a
   subprocess (honest wall clock): without CRF and polygons, with the CRF, with the CRF and
   simplified polygons; throughput in model pixels (tiles x tile area) and scene pixels, the
   ratio to (1), and the time split from ``run.json``; the same on the real NAIP scenes of
   ../shared/data (both in one run) and on a 10k-scale VRT mosaic of one of them;
3. the peak memory of the whole process tree for the 10k scene and a 40k x 40k one (a VRT mosaic
   of the first), with the small model;
4. one actor running 2 streams of half the threads (the CPU's default), one actor with one
   stream of all threads and 2 actors, and the share of the time the model streams sit idle
   waiting for tiles;
5. side by side on the 10k scene with the small model: geoseg, a plain rasterio + torch
   sliding-window loop (``benchmarks.plain_loop``) and NRCan's geo-inference 3.2.4 (its own
   venv, ``benchmarks/make_geoinference_env.sh``; the same weights exported to TorchScript):
   throughput, peak memory, and how much more often the class changes across each tool's tile
   edges than elsewhere (seams);
6. ``geoseg vectorize --simplify 1px`` on a generated 10k x 10k 6-class mask
   (``benchmarks.vectors``).

Prints a Markdown table ready for the README and writes ``OUT/results.json``. ``--quick`` runs a
reduced version (4k and 8k scenes, the small model end to end) to check the harness in minutes.

``--device cuda`` measures (1), (2) and (4) on the machine's GPU instead, batch 16: the forms are
fp32, bf16 and fp16 autocast, each eager and ``torch.compile``d, agreement against CUDA fp32;
end to end without CRF, with CRF, with CRF and polygons, 2 actors sharing the GPU, and a job of
4 copies of the scene. Memory, the peer tools and polygons alone (3, 5, 6) measure the CPU
machine and are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import rasterio
import torch

from benchmarks import plain_loop, vectors
from benchmarks.proctree import (
    CpuSnapshot,
    MonitoredRun,
    foreign_cpu_share,
    run_monitored,
    wait_for_quiet,
)
from benchmarks.scenes import BAND_NAMES, make_mosaic_vrt, make_scene, scene_classes, scene_window
from benchmarks.scenes import CLASSES as SCENE_CLASSES
from geoseg.engine.aot import CACHE_ENV, sources_digest
from geoseg.engine.predict import Predictor
from geoseg.engine.scene import SegmentOptions, default_streams
from geoseg.io.rasters import open_scene, read_windows
from geoseg.models.card import ModelCard, read_card
from geoseg.models.store import init_model, load_model, normalize, save_model
from geoseg.training import fit

REPO = Path(__file__).resolve().parents[1]
BANDS = list(BAND_NAMES)
CLASSES = list(SCENE_CLASSES)
TRAIN_STEPS = 600  # benchmark models: steps on the scene's top-left window (see ensure_model)
TRAIN_WINDOW = 4096
BATCH = 4  # on the CPU; on a GPU, CUDA_BATCH
CUDA_BATCH = 16
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
    device: str  # "cpu" or "cuda": where the model runs, in every measurement
    batch: int
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
        cuda = args.device == "cuda"
        default_out = "benchmarks/out" + ("/cuda" if cuda else "") + ("/quick" if quick else "")
        return cls(
            out=Path(args.out or default_out),
            quick=quick,
            device=args.device,
            batch=CUDA_BATCH if cuda else BATCH,
            e2e_size=4000 if quick else 10_000,
            e2e_model=SMALL_MODEL if quick else DEFAULT_MODEL,
            mem_repeat=2 if quick else 4,
            raw_tiles=4 * CUDA_BATCH if cuda else 16,
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


def machine_info() -> dict[str, Any]:
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
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


def code_version() -> dict[str, str]:
    """The geoseg code being measured: git HEAD and a digest of the sources on disk now.

    The working tree may change while the benchmark runs (someone else editing it); comparing
    the digest before and after a measurement shows whether it measured one version.
    """
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:  # no git (a bare GPU machine given a copy of the tree)
        head = ""
    return {"git_head": head or "?", "sources_sha256": sources_digest()}


def ensure_model(out: Path, spec: ModelSpec) -> Path:
    """Create the model directory once: a U-Net trained briefly on the scene's own classes.

    A random network's argmax is a near-tie at most pixels, so any change of arithmetic (bf16,
    another kernel) flips classes and says nothing about a real model; a few hundred steps on
    the generated scene (whose classes are known) make the decisions as stable as a real
    model's. Seeded: reruns get the same model.
    """
    model_dir = out / "models" / f"{spec.name}-trained{TRAIN_STEPS}"
    if (model_dir / "model.yaml").exists():
        return model_dir
    tmp = model_dir.with_name(f".{model_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    init_model("unet", BANDS, CLASSES, tmp, arch_args=dict(spec.arch_args), seed=0)
    card, model, _ = load_model(tmp)
    size = TRAIN_WINDOW
    image = scene_window(0, 0, size, size)
    labels = scene_classes(0, 0, size, size).astype(np.uint8)
    t0 = time.perf_counter()
    losses = fit(model, card, image, labels, steps=TRAIN_STEPS, crop=128, batch_size=4)
    log(
        f"trained {spec.name}: {TRAIN_STEPS} steps in {time.perf_counter() - t0:.0f} s, "
        f"loss {losses[0]:.3f} -> {statistics.mean(losses[-10:]):.3f}"
    )
    save_model(model, card, tmp, overwrite=True)
    tmp.replace(model_dir)
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
    streams: int = 1,
) -> list[Pass]:
    """Warm up on one batch, then time passes over all batches, ``streams`` batches at a time
    (one thread each, as an actor runs them).

    Stops after ``passes`` clean passes (other processes' load below ``CLEAN_SHARE``, from this
    process's CPU time against the machine's) or ``max_passes`` passes in all.
    """
    fn(batches[0])
    me = psutil.Process()
    done: list[Pass] = []

    def timed(batch: Any) -> float:
        t0 = time.perf_counter()
        fn(batch)
        return time.perf_counter() - t0

    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(timed, batches[:streams]))  # each thread's first call
        while len(done) < max_passes:
            own_start, machine_start = sum(me.cpu_times()[:2]), CpuSnapshot.now()
            start = time.perf_counter()
            times = list(pool.map(timed, batches))
            wall = time.perf_counter() - start
            own = sum(me.cpu_times()[:2]) - own_start
            share = foreign_cpu_share(CpuSnapshot.now().since(machine_start), own, wall)
            done.append(Pass(sum(tiles_per_batch), wall, times, share))
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
    parts = read_windows(scene, [(t.row_off, t.col_off, t.height, t.width) for t in picks])
    read_s = time.perf_counter() - t0
    return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]), read_s


@dataclass(frozen=True)
class Form:
    """A way the pipeline can run the model: ``geoseg segment --precision P [--compile]
    --streams S`` (S forward passes at a time, each on the cores / S torch threads)."""

    precision: str
    compile: bool
    streams: int = 1

    @property
    def label(self) -> str:
        label = self.precision + (" compiled" if self.compile else "")
        if self.streams > 1:
            label += f", {self.streams} streams of {threads_per_stream(self.streams)} thread(s)"
        return label

    def flags(self) -> list[str]:
        compiled = ["--compile"] if self.compile else []
        return ["--precision", self.precision, *compiled, "--streams", str(self.streams)]


def threads_per_stream(streams: int) -> int:
    return max(1, (os.cpu_count() or 1) // streams)


def finished(fn: Callable[[torch.Tensor], torch.Tensor], device: str) -> Callable[[Any], Any]:
    """``fn`` returning only when its work is done: CUDA kernels run after the call returns."""
    if device != "cuda":
        return fn

    def synchronized(x: torch.Tensor) -> torch.Tensor:
        out = fn(x)
        torch.cuda.synchronize()
        return out

    return synchronized


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "CPU"


FORMS = {
    "cpu": [
        Form("fp32", False),
        Form("fp32", False, 2),
        Form("fp32", True),
        Form("fp32", True, 2),
        Form("bf16", False),
        Form("bf16", False, 2),
        Form("bf16", True),
        Form("bf16", True, 2),
    ],
    # One stream: a GPU actor's passes queue on the device anyway.
    "cuda": [Form(p, c) for p in ("fp32", "bf16", "fp16") for c in (False, True)],
}
AGREEMENT_GOAL = 0.999  # a form counts when its class map is within 0.1% of fp32's
# geoseg's default for one CPU actor on this machine.
CPU_STREAMS = default_streams(os.cpu_count() or 1, use_gpu=False)
# The small model's form in the memory runs (3) and side by side (5): its limit flips between
# eager and compiled bf16 with the noise (within 6% of each other), and eager autocast holds
# ~350 MiB more in the actor, which would move the memory figure between runs.
SMALL_FORM = Form("bf16", True, CPU_STREAMS)


@dataclass(frozen=True)
class SampleTiles:
    """The raw forward's input: tiles of the scene in batches, raw and normalised on the device."""

    raw_batches: list[np.ndarray]
    inputs: list[torch.Tensor]
    sizes: list[int]
    read_s: float

    @property
    def tile_pixels(self) -> int:
        return int(self.raw_batches[0].shape[-2] * self.raw_batches[0].shape[-1])

    @classmethod
    def read(cls, scene_path: Path, card: ModelCard, cfg: Config) -> SampleTiles:
        data, _, read_s = read_sample_tiles(scene_path, card, cfg.raw_tiles)
        raw = [data[i : i + cfg.batch] for i in range(0, len(data), cfg.batch)]
        inputs = [normalize(torch.from_numpy(b), card).to(cfg.device) for b in raw]
        sizes = [len(x) for x in inputs]
        return cls(raw, inputs, sizes, read_s)


def form_predictor(model_dir: Path, cfg: Config, form: Form) -> Predictor:
    """The model in ``form``, with the torch threads of one of its streams in force."""
    # Set before compiling: inductor generates its kernels for the thread count in force.
    torch.set_num_threads(threads_per_stream(form.streams))
    return Predictor(
        model_dir, cfg.device, form.precision, form.compile, cfg.batch, concurrency=form.streams
    )


def time_raw_forward(
    predictor: Predictor, tiles: SampleTiles, cfg: Config, form: Form
) -> ForwardTiming:
    """``Predictor.logits`` over the normalised batches, ``form.streams`` at a time."""
    return ForwardTiming(
        tiles.tile_pixels,
        time_batches(
            finished(predictor.logits, cfg.device),
            tiles.inputs,
            tiles.sizes,
            cfg.raw_passes,
            cfg.raw_max_passes,
            form.streams,
        ),
    )


def bench_forward(model_dir: Path, scene_path: Path, cfg: Config) -> dict[str, Any]:
    """Each form of the model on the same pre-read tiles: throughput and agreement with fp32.

    Raw forward: ``Predictor.logits`` on pre-normalised tiles already on the device (autocast and
    compile as the actor runs them; on a GPU, timed to the end of the device's work). The limit of
    the pipeline is the fastest form whose class map agrees with eager fp32 on the same device on
    at least ``AGREEMENT_GOAL`` of the pixels; the actor's whole step
    (``Predictor.probabilities``: raw tiles in, normalise, forward, softmax, float16 out on the
    host) is timed for that form too.
    """
    torch.set_num_threads(os.cpu_count() or 1)
    card = read_card(model_dir)
    tiles = SampleTiles.read(scene_path, card, cfg)
    forms: list[dict[str, Any]] = []
    reference: torch.Tensor | None = None
    predictors: dict[Form, Predictor] = {}
    for form in FORMS[cfg.device]:
        if form.precision not in card.precisions:
            continue
        predictor = form_predictor(model_dir, cfg, form)
        t0 = time.perf_counter()
        finished(predictor.logits, cfg.device)(tiles.inputs[0])  # compiles a compiled form
        first_s = time.perf_counter() - t0
        timing = time_raw_forward(predictor, tiles, cfg, form)
        classes = torch.cat([predictor.logits(x).float().argmax(1) for x in tiles.inputs])
        if reference is None:
            reference = classes
        agreement = float((classes == reference).double().mean())
        predictors[form] = predictor
        forms.append(
            {
                **asdict(form),
                "label": form.label,
                "first_call_s": first_s,
                "agreement": agreement,
                "raw": timing.to_json(),
            }
        )
        log(
            f"  {form.label}: {timing.mp_per_s:.2f} MP/s, agreement {agreement:.5%}, first call "
            f"{first_s:.1f} s"
        )
    usable = [f for f in forms if f["agreement"] >= AGREEMENT_GOAL]
    limit = max(usable, key=lambda f: f["raw"]["mp_per_s"])
    limit_form = Form(limit["precision"], limit["compile"], limit["streams"])
    torch.set_num_threads(threads_per_stream(limit_form.streams))
    actor = ForwardTiming(
        tiles.tile_pixels,
        time_batches(
            predictors[limit_form].probabilities,
            tiles.raw_batches,
            tiles.sizes,
            cfg.raw_passes,
            cfg.raw_max_passes,
            limit_form.streams,
        ),
    )
    torch.set_num_threads(os.cpu_count() or 1)
    return {
        "model": str(model_dir),
        "device": device_name(cfg.device),
        "threads": torch.get_num_threads(),
        "tile": list(tiles.raw_batches[0].shape[-2:]),
        "batch": cfg.batch,
        "forms": forms,
        "limit": {**asdict(limit_form), "label": limit_form.label},
        "raw": limit["raw"],
        "actor_predict": actor.to_json(),
        "read_1thread": {
            "tiles": sum(tiles.sizes),
            "seconds": tiles.read_s,
            "mp_per_s": mp(sum(tiles.sizes) * tiles.tile_pixels) / tiles.read_s,
        },
    }


def retime_limit(model_dir: Path, scene_path: Path, cfg: Config, form: Form) -> dict[str, Any]:
    """The limit form's raw forward timed again, as :func:`bench_forward` times it.

    The VM's speed drifts by ±5-8% over minutes, and the limit's few seconds of passes at the
    start can fall in a slow minute (one run's limit measured 1.99 MP/s while the actor's whole
    step, which does more, measured 2.13 in the same minutes). Timed again after the end-to-end
    runs, the faster of the two windows is the limit the ratios divide by: a ratio is never
    flattered by a slow window.
    """
    tiles = SampleTiles.read(scene_path, read_card(model_dir), cfg)
    timing = time_raw_forward(form_predictor(model_dir, cfg, form), tiles, cfg, form)
    torch.set_num_threads(os.cpu_count() or 1)
    return timing.to_json()


def limit_mp_per_s(fwd: dict[str, Any]) -> float:
    """The limit the ratios divide by: the faster of the limit form's timing windows."""
    return float(max(fwd["raw"]["mp_per_s"], fwd.get("raw_again", {}).get("mp_per_s", 0.0)))


# ----------------------------------------------------------------------------------------------
# 2 and 3. geoseg segment as a subprocess


def segment_command(
    scenes: Sequence[Path],
    model_dir: Path,
    out: Path,
    *,
    form: Form,
    polygons: bool,
    confidence: bool = True,
    extra: tuple[str, ...] = (),
    device: str = "cpu",
    batch: int = BATCH,
) -> list[str]:
    cmd = [sys.executable, "-m", "geoseg", "-q", "segment", *map(str, scenes)]
    cmd += ["--model", str(model_dir), "--out", str(out), "--batch-size", str(batch)]
    cmd += ["--device", device, *form.flags(), "--overwrite", *extra]
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
    scenes = record["scenes"]
    failed = [s for s in scenes if s["status"] != "ok"]
    result["ok"] = not failed
    if failed:
        result["error"] = failed[0]["error"]
        return result
    card = read_card(model_dir)
    # A run of several scenes is counted as one: pixels and each timer summed over its scenes.
    height, width = scenes[0]["height"], scenes[0]["width"]
    grids = [SegmentOptions().grid_for(card, s["height"], s["width"]) for s in scenes]
    grid = grids[0]
    scene_px = sum(s["height"] * s["width"] for s in scenes)
    model_px = sum(len(g) * g.tile_height * g.tile_width for g in grids)
    timings: dict[str, float] = {}
    for s in scenes:
        for key, value in s["timings_s"].items():
            timings[key] = timings.get(key, 0.0) + value
    # The scenes' own time: from the first one's first tile to the last one's commit. A scene's
    # COGs and polygons overlap the next scene's tiles, so the scenes' times add up to more.
    span_s = (
        max(datetime.fromisoformat(s["finished"]) for s in scenes)
        - min(datetime.fromisoformat(s["started"]) for s in scenes)
    ).total_seconds()
    job_s = (
        datetime.fromisoformat(record["finished"]) - datetime.fromisoformat(record["started"])
    ).total_seconds()
    wall = run.wall_s
    cores = os.cpu_count() or 1
    # Model streams: actors x forward passes each runs at once (infer_s sums over streams).
    streams = sum(w.get("streams", 1) for w in record["workers"])
    actor_s = timings["infer_s"] + timings.get("crf_s", 0.0)
    streaming_s = timings["total_s"] - timings.get("cog_s", 0.0) - timings.get("polygons_s", 0.0)
    result.update(
        {
            "scenes": len(scenes),
            "height": height,
            "width": width,
            "tiles": sum(s["tiles"] for s in scenes),
            "tile_size": [grid.tile_height, grid.tile_width],
            "overlap": grid.overlap,
            "scene_pixels": scene_px,
            "model_pixels": model_px,
            "overhead_factor": model_px / scene_px,
            "timings_s": timings,
            "polygons": scenes[0].get("polygons") if len(scenes) == 1 else None,
            "job_s": job_s,
            "scenes_span_s": span_s,
            # Time a scene's finishing (COGs, polygons) ran beside the next scene's tiles.
            "scenes_overlap_s": max(0.0, timings["total_s"] - span_s),
            # Ray start, actor start and model load, pool shutdown (inside segment(), outside
            # the scenes); and interpreter start, imports, process exit (outside segment()).
            "ray_overhead_s": job_s - span_s,
            "process_overhead_s": wall - job_s,
            "startup_share": (wall - span_s) / wall,
            "scene_mp_per_s": mp(scene_px) / wall,
            "model_mp_per_s": mp(model_px) / wall,
            "scene_mp_per_s_in_scene": mp(scene_px) / span_s,
            "model_mp_per_s_in_scene": mp(model_px) / span_s,
            "model_streams": streams,
            # Model streams' busy time (tiles and CRF bands) over the scene, and the share of
            # the streaming phase (before the COG is finalised and polygons are made, which the
            # driver does alone) in which they sat idle waiting for work.
            "actor_busy_share": actor_s / (streams * span_s),
            "actor_idle_share_streaming": 1 - actor_s / (streams * streaming_s),
            "cpu_utilisation": run.tree.cpu_s / (wall * cores),
        }
    )
    return result


SHARED_DATA = REPO.parent / "shared" / "data"
NAIP = ("naip/m_4709963_se_14_1_20190904.tif", "naip/m_4709963_se_14_1_20200831.tif")
NAIP_MOSAIC_REPEAT = 11  # 934 x 723 -> 10,274 x 7,953
NAIP_BUCKET_REPEAT, NAIP_BUCKET_SCENES = 6, 4  # 4 scenes of 5,604 x 4,338
BUCKET_SCENES = 4  # --device cuda: copies (VRTs) of the generated scene in one job


def real_scenes(out: Path) -> dict[str, Any]:
    """The two real NAIP scenes (R, G, B, NIR uint8, nodata 0) of ../shared/data, a VRT
    mosaicking the first 11 x 11 times (real pixels at the size of the generated scene), and a
    bucket of VRTs mosaicking each 6 x 6 times (a nightly job's many scenes).

    Empty when the shared data are absent (the runs are then skipped and the table says so).
    """
    paths = [SHARED_DATA / p for p in NAIP]
    if not all(p.exists() for p in paths):
        log(f"real scenes: {SHARED_DATA} has no NAIP scenes; skipped")
        return {"scenes": [], "mosaic": [], "bucket": []}
    mosaic = make_mosaic_vrt(paths[0], NAIP_MOSAIC_REPEAT, out / "naip-mosaic.vrt")
    bucket = [
        make_mosaic_vrt(paths[i % 2], NAIP_BUCKET_REPEAT, out / f"naip-bucket-{i}.vrt")
        for i in range(NAIP_BUCKET_SCENES)
    ]
    return {"scenes": paths, "mosaic": [mosaic], "bucket": bucket}


def run_segment(
    label: str,
    scene: Path | Sequence[Path],
    model_dir: Path,
    cfg: Config,
    *,
    form: Form,
    polygons: bool,
    confidence: bool = True,
    extra: tuple[str, ...] = (),
    timeout_s: float | None = None,
) -> dict[str, Any]:
    out = cfg.out / "runs" / label
    scenes = [scene] if isinstance(scene, Path) else list(scene)
    cmd = segment_command(
        scenes,
        model_dir,
        out,
        form=form,
        polygons=polygons,
        confidence=confidence,
        extra=extra,
        device=cfg.device,
        batch=cfg.batch,
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
# 5. Side by side: the tools users would pick, same image, same model


GEOINFERENCE_ENV = Path("benchmarks/out/envs/geoinference")


class _Scripted(torch.nn.Module):
    """The model with geoseg's normalisation inside, for a tool that feeds it raw pixels."""

    def __init__(self, model: torch.nn.Module, card: ModelCard) -> None:
        super().__init__()
        self.model, self.card = model, card

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(normalize(x, self.card))
        return out


def export_torchscript(model_dir: Path, out: Path) -> Path:
    """The same weights as TorchScript (what geo-inference loads), traced on a raw uint8 tile."""
    card, model, _ = load_model(model_dir)
    example = torch.zeros((1, len(card.bands), card.tile_size, card.tile_size), dtype=torch.uint8)
    with torch.inference_mode():
        traced = torch.jit.trace(_Scripted(model, card).eval(), example)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(out))
    return out


def seam_lines(offsets: Sequence[int], tile: int, size: int) -> list[int]:
    """Positions ``p`` (a seam lies between pixels ``p - 1`` and ``p``) of a window grid's edges."""
    edges = {o for o in offsets} | {o + tile for o in offsets}
    return sorted(e for e in edges if 0 < e < size)


def seam_excess(mask: np.ndarray, rows: list[int], cols: list[int], nodata: int) -> dict[str, Any]:
    """How much more often the class changes across the tile grid's edges than elsewhere.

    For every pair of neighbouring valid pixels, horizontally and vertically: the share whose
    classes differ across a grid edge (``seam``) and elsewhere (``other``). A seamless map has
    ``seam / other`` near 1; a map whose tiles disagree where they meet has far more changes on
    the grid lines than between any other neighbours.
    """
    counts = {"seam_pairs": 0, "seam_changes": 0, "other_pairs": 0, "other_changes": 0}
    for axis, lines in ((1, cols), (0, rows)):
        a = mask[:, :-1] if axis == 1 else mask[:-1]
        b = mask[:, 1:] if axis == 1 else mask[1:]
        valid = (a != nodata) & (b != nodata)
        changed = (a != b) & valid
        on_seam = np.zeros(mask.shape[axis] - 1, dtype=bool)
        on_seam[np.asarray(lines, dtype=int) - 1] = True
        per_line_valid = valid.sum(axis=0 if axis == 1 else 1)
        per_line_changed = changed.sum(axis=0 if axis == 1 else 1)
        counts["seam_pairs"] += int(per_line_valid[on_seam].sum())
        counts["seam_changes"] += int(per_line_changed[on_seam].sum())
        counts["other_pairs"] += int(per_line_valid[~on_seam].sum())
        counts["other_changes"] += int(per_line_changed[~on_seam].sum())
    seam_rate = counts["seam_changes"] / max(counts["seam_pairs"], 1)
    other_rate = counts["other_changes"] / max(counts["other_pairs"], 1)
    return {
        **counts,
        "seam_change_rate": seam_rate,
        "other_change_rate": other_rate,
        "excess": seam_rate / other_rate if other_rate else float("nan"),
    }


def mask_figures(
    path: Path, row_offsets: Sequence[int], col_offsets: Sequence[int], tile_h: int, tile_w: int
) -> dict[str, Any]:
    """Seams (at the edges of windows at these offsets) and class counts of a class mask."""
    with rasterio.open(path) as src:
        nodata = 255 if src.nodata is None else int(src.nodata)
        mask = src.read(1)
    height, width = mask.shape
    return {
        "mask": rel(path),
        "pixels": height * width,
        "seams": seam_excess(
            mask,
            seam_lines(row_offsets, tile_h, height),
            seam_lines(col_offsets, tile_w, width),
            nodata,
        ),
        "classes": np.bincount(mask.ravel(), minlength=256)[:8].tolist(),
    }


def tool_entry(
    label: str,
    run: MonitoredRun,
    mask_path: Path | None,
    offsets: Callable[[int], Sequence[int]],
    tile: int,
) -> dict[str, Any]:
    """Throughput, memory and seams of one tool's run; ``offsets(size)``: its windows' offsets."""
    entry: dict[str, Any] = {
        "tool": label,
        **run.to_json(),
        "command": printable(run.command)
        if run.command[:3] == [sys.executable, "-m", "geoseg"]
        else " ".join(rel(Path(w)) if os.sep in w else w for w in run.command),
    }
    entry["ok"] = run.returncode == 0 and mask_path is not None and mask_path.exists()
    if not entry["ok"]:
        return entry
    assert mask_path is not None
    with rasterio.open(mask_path) as src:
        height, width = src.shape
    entry.update(mask_figures(mask_path, offsets(height), offsets(width), tile, tile))
    entry["scene_mp_per_s"] = mp(entry["pixels"]) / run.wall_s
    return entry


def last_json_line(log_path: Path) -> dict[str, Any]:
    for line in reversed(log_path.read_text().splitlines()):
        if line.startswith("{"):
            parsed: dict[str, Any] = json.loads(line)
            return parsed
    return {}


def side_by_side(
    scene: Path,
    model_dir: Path,
    geoseg_runs: dict[str, tuple[str, dict[str, Any]]],
    cfg: Config,
) -> dict[str, Any]:
    """geoseg, a plain rasterio + torch loop and geo-inference on one scene with one model.

    Every tool runs as its own process with 2 torch threads, its wall clock and its process
    tree's peak memory measured the same way. geoseg's entries are ``geoseg_runs`` (tool label
    -> (run label, run), measured before on the same scene and model).
    """
    card = read_card(model_dir)
    tile, overlap = card.tile_size, card.overlap
    out = cfg.out / "side-by-side"
    logs = cfg.out / "logs"
    tools: list[dict[str, Any]] = []
    grid = SegmentOptions().grid_for(card, cfg.e2e_size, cfg.e2e_size)
    for label, (run_label, run_result) in geoseg_runs.items():
        entry = {k: v for k, v in run_result.items() if k in ("wall_s", "tree", "command")}
        entry.update(tool=label, ok=run_result.get("ok", False))
        if entry["ok"]:
            mask_path = cfg.out / "runs" / run_label / scene.stem / "mask.tif"
            entry.update(
                mask_figures(
                    mask_path, grid.row_offsets, grid.col_offsets, grid.tile_height, grid.tile_width
                )
            )
            entry["scene_mp_per_s"] = run_result["scene_mp_per_s"]
        tools.append(entry)

    plain_mask = out / "plain-loop.tif"
    plain_mask.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.plain_loop", str(scene), str(model_dir)]
    cmd += [str(plain_mask), "--tile", str(tile), "--overlap", str(overlap), "--batch", str(BATCH)]
    log("side by side: rasterio + torch loop")
    settle(cfg, "plain loop")
    run = run_monitored(
        cmd, logs / "plain-loop.log", cfg.run_timeout_s, limit_bytes=cfg.memory_limit_bytes
    )
    tools.append(
        tool_entry(
            "rasterio + torch loop",
            run,
            plain_mask,
            lambda size: plain_loop.starts(size, tile, tile - overlap),
            tile,
        )
    )

    python = GEOINFERENCE_ENV / "bin" / "python"
    if not python.exists():
        log(
            f"side by side: no geo-inference env at {rel(GEOINFERENCE_ENV)}: "
            "bash benchmarks/make_geoinference_env.sh builds it; skipped"
        )
        tools.append({"tool": "geo-inference", "ok": False, "error": "env missing"})
    else:
        scripted = export_torchscript(model_dir, out / "model.torchscript.pt")
        gi_out = out / "geo-inference"
        shutil.rmtree(gi_out, ignore_errors=True)
        gi_out.mkdir(parents=True)
        cmd = [str(python), "benchmarks/geoinference_runner.py", "--image", str(scene)]
        cmd += ["--model", str(scripted), "--out-dir", str(gi_out)]
        cmd += ["--classes", str(card.num_classes), "--tile", str(tile)]
        cmd += ["--overlap", str(overlap), "--batch", str(BATCH), "--threads", "2"]
        log("side by side: geo-inference")
        settle(cfg, "geo-inference")
        run = run_monitored(
            cmd, logs / "geo-inference.log", cfg.run_timeout_s, limit_bytes=cfg.memory_limit_bytes
        )
        reported = last_json_line(logs / "geo-inference.log") if run.returncode == 0 else {}
        mask_path = Path(reported["mask"]) if reported.get("mask") else None
        # Patches of `tile` every tile / 2 from 0 (the image is zero-padded at the end).
        entry = tool_entry(
            "geo-inference 3.2.4", run, mask_path, lambda size: range(0, size, tile // 2), tile
        )
        entry["reported"] = reported
        tools.append(entry)
    for entry in tools:
        if entry.get("ok"):
            log(
                f"  {entry['tool']}: {entry['scene_mp_per_s']:.2f} MP/s, peak tree RSS "
                f"{fmt_mib(entry['tree']['peak_tree_rss'])}, seam excess "
                f"{entry['seams']['excess']:.2f}"
            )
    return {
        "scene": rel(scene),
        "model": rel(model_dir),
        "tile": tile,
        "overlap": overlap,
        "tools": tools,
    }


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
    cuda = cfg.get("device") == "cuda"
    bench = "python -m benchmarks.run" + (" --device cuda" if cuda else "")
    bench += " --quick" if cfg["quick"] else ""
    forward = results["forward"]
    for fwd in forward.values():
        where = fwd["device"] if cuda else f"{fwd['threads']} threads"
        for form in fwd["forms"]:
            chosen = " **(limit)**" if form["label"] == fwd["limit"]["label"] else ""
            rows.append(
                (
                    f"Raw forward, {fwd['model_label']}, {form['label']}{chosen}, "
                    f"{fwd['tile'][0]}² tiles, batch {fwd['batch']}, {where}",
                    f"{form['raw']['mp_per_s']:.2f} MP/s, class agreement with fp32 "
                    f"{form['agreement']:.4%}" + busy(form["raw"]["foreign_cpu_share"]),
                    bench,
                )
            )
        rows.append(
            (
                f"Actor step (raw tiles in: normalise, forward, softmax, float16 out), "
                f"{fwd['model_name']}, {fwd['limit']['label']}",
                f"{fwd['actor_predict']['mp_per_s']:.2f} MP/s"
                + busy(fwd["actor_predict"]["foreign_cpu_share"]),
                SAME,
            )
        )
    e2e_runs = results.get("e2e", {})
    raw = limit_mp_per_s(forward[cfg["e2e_model"]]) if cfg["e2e_model"] in forward else None
    if cfg["e2e_model"] in forward and "raw_again" in forward[cfg["e2e_model"]]:
        fwd = forward[cfg["e2e_model"]]
        rows.append(
            (
                f"The limit ({fwd['model_name']}, {fwd['limit']['label']}) timed again after the "
                "end-to-end runs; the ratios divide by the faster window",
                f"{fwd['raw_again']['mp_per_s']:.2f} MP/s (first window "
                f"{fwd['raw']['mp_per_s']:.2f})" + busy(fwd["raw_again"]["foreign_cpu_share"]),
                SAME,
            )
        )
    titles = {
        "e2e": "no CRF, no polygons",
        "e2e-crf": "with CRF",
        "e2e-all": "with CRF and polygons (simplified 1 px, GeoPackage)",
        "e2e-1stream": "one actor running one stream of all threads, no CRF, no polygons",
        "e2e-2actors": (
            "2 model actors sharing the GPU" if cuda else "2 model actors (1 thread each)"
        )
        + ", no CRF, no polygons",
        "e2e-naip": "real NAIP scenes (R, G, B, NIR, nodata 0), one run, no CRF, no polygons",
        "e2e-naip-mosaic": "real NAIP scene mosaicked 11 × 11 (VRT), no CRF, no polygons",
        "e2e-naip-bucket": "a bucket of real NAIP mosaics (VRTs, both scenes), polygons "
        "(simplified 1 px)",
        "e2e-bucket": "a bucket of copies of the generated scene (VRTs), no CRF, no polygons",
    }
    for label, run in e2e_runs.items():
        if not run.get("ok"):
            rows.append(
                (
                    f"End to end, {titles[label]}",
                    f"{run_state(run)} after {run['wall_s']:.0f} s",
                    run["command"],
                )
            )
            continue
        assert raw is not None
        t = run["timings_s"]
        if run.get("scenes", 1) > 1:
            size = f"{run['scenes']} scenes of {run['width']:,} × {run['height']:,}"
        elif run["height"] == run["width"]:
            size = f"{run['height']:,}²"
        else:
            size = f"{run['width']:,} × {run['height']:,}"
        split = ", ".join(
            # blend: the part of the actors' infer spent blending and classifying their batches
            f"{k.removesuffix('_s')} {t[k]:.1f}"
            for k in (
                "infer_s", "blend_s", "crf_s", "read_s", "wait_s", "stitch_s", "cog_s", "polygons_s"
            )
            if t.get(k)
        )  # fmt: skip
        extra = f", {run['polygons']:,} polygons" if run.get("polygons") is not None else ""
        rows += [
            (
                f"End to end {size}, {titles[label]}: wall; model pixels / s (ratio to the limit)",
                f"{run['wall_s']:.1f} s; {run['model_mp_per_s']:.2f} MP/s "
                f"(**{run['model_mp_per_s'] / raw:.2f}**); scene "
                f"{run['scene_mp_per_s']:.2f} MP/s" + busy(run["foreign_cpu_share"], run),
                run["command"],
            ),
            (
                "– scene time only (without Ray/actor start, compile, exit): model pixels / s "
                "(ratio)",
                f"{run['model_mp_per_s_in_scene']:.2f} MP/s "
                f"({run['model_mp_per_s_in_scene'] / raw:.2f}); outside the scenes "
                f"{run['wall_s'] - run['scenes_span_s']:.1f} s"
                + (
                    f"; {run['scenes_overlap_s']:.1f} s of COGs and polygons beside the next "
                    "scene's tiles"
                    if run.get("scenes", 1) > 1
                    else ""
                ),
                SAME,
            ),
            (
                "– time split (run.json, s), actors idle while streaming tiles",
                f"{split}; idle {run['actor_idle_share_streaming']:.0%}{extra}; peak RSS tree "
                f"{fmt_mib(run['tree']['peak_tree_rss'])}",
                SAME,
            ),
        ]
    if "e2e" in e2e_runs and e2e_runs["e2e"].get("ok"):
        rows.append(
            (
                "Overlap overhead: model pixels / scene pixels",
                f"{e2e_runs['e2e']['overhead_factor']:.3f} ({e2e_runs['e2e']['tiles']} tiles)",
                SAME,
            )
        )
    layouts = {k: e2e_runs[k] for k in ("e2e", "e2e-1stream", "e2e-2actors") if k in e2e_runs}
    if len(layouts) > 1 and "e2e" in layouts and all(run.get("ok") for run in layouts.values()):
        one = layouts["e2e"]
        # A GPU actor runs one stream (geoseg.engine.scene.default_streams).
        default = "1 actor × 1 stream" if cuda else "1 actor × 2 streams"
        described = {
            "e2e": f"{default} (the default)",
            "e2e-1stream": "1 actor × 1 stream",
            "e2e-2actors": "2 actors × 1 stream" + (", sharing the GPU" if cuda else ""),
        }
        rows.append(
            (
                f"Scaling on this machine: end-to-end throughput of each layout / the default, "
                f"{default}" + ("" if cuda else " of half the threads"),
                "; ".join(
                    f"{described[k]} {run['model_mp_per_s'] / one['model_mp_per_s']:.2f}"
                    for k, run in layouts.items()
                ),
                SAME,
            )
        )
    mem = results.get("memory", {})
    for run in (mem.get("small"), mem.get("large")):
        if not run:
            continue
        if not run.get("ok"):
            state = f"after {run['wall_s']:.0f} s, RSS {fmt_mib(run['tree']['peak_tree_rss'])}"
            rows.append((f"Memory run {run_state(run)}", state, run["command"]))
            continue
        rows.append(
            (
                f"{run['height']:,}², small model, no polygons/confidence: wall; peak memory",
                f"{run['wall_s']:.1f} s; "
                + memory_value(run["tree"])
                + busy(run["foreign_cpu_share"], run),
                run["command"],
            )
        )
    ratios = mem.get("ratios")
    if ratios:
        rows.append(
            (
                "Peak memory ratio large / small scene (goal ≤ 1.3)",
                f"tree RSS {ratios['tree_rss']:.2f}, driver RSS {ratios['driver_rss']:.2f}; "
                f"tree PSS {ratios['tree_pss']:.2f}, driver USS {ratios['driver_uss']:.2f}",
                SAME,
            )
        )
    side = results.get("side_by_side")
    if side:
        for tool in side["tools"]:
            if not tool.get("ok"):
                error = tool.get("error", "see its log")
                rows.append((f"Side by side: {tool['tool']}", f"failed: {error}", ""))
                continue
            seams = tool["seams"]
            rows.append(
                (
                    f"Side by side, {cfg['e2e_size']:,}², small model: {tool['tool']}",
                    f"{tool['scene_mp_per_s']:.2f} MP/s, peak RSS tree "
                    f"{fmt_mib(tool['tree']['peak_tree_rss'])}, class changes across tile "
                    f"edges {seams['seam_change_rate']:.2%} vs {seams['other_change_rate']:.2%} "
                    f"elsewhere (×{seams['excess']:.1f})",
                    tool["command"],
                )
            )
    vec = results.get("vectors")
    if vec:
        for fmt in ("gpkg", "parquet"):
            r = vec[fmt]
            rows.append(
                (
                    f"Polygonise + simplify 1 px, {vec['size']:,}² 6-class mask, {fmt}",
                    f"{r['wall_s']:.1f} s ({mp(vec['size'] ** 2) / r['wall_s']:.1f} MP/s), "
                    f"{r['polygons']:,} polygons, peak RSS {fmt_mib(r['peak_tree_rss_bytes'])}"
                    + busy(r["foreign_cpu_share"]),
                    f"geoseg vectorize --simplify 1px --vector-format {fmt}",
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
        f"{info['torch_threads']} threads"
        + (f", GPU {info['gpu']}" if info.get("gpu") else "")
        + "; load average "
        f"{info['loadavg_start'][0]:.2f} at start, {info['loadavg_end'][0]:.2f} at end. {code}."
    )


def save(results: dict[str, Any], out: Path) -> None:
    path = out / "results.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(path)


def warm_compile_cache(
    runs: list[tuple[Path, Form, int]], scene_path: Path
) -> list[dict[str, Any]]:
    """Compile the actor step of every timed run beforehand, so that no timed run compiles.

    ``runs``: (model, form, actors) of each ``geoseg segment`` run to come. Each actor's torch
    threads (cores / actors / streams, as :class:`geoseg.engine.scene.WorkerPool` gives them) are
    part of the compiled code's key, so each layout needs its own AOTInductor package
    (:mod:`geoseg.engine.aot`). A user pays this once per model, precision, thread count and tile
    shape; the seconds are reported.
    """
    out: list[dict[str, Any]] = []
    seen: set[tuple[Path, Form, int]] = set()
    for model_dir, form, actors in runs:
        threads = max(1, (os.cpu_count() or 1) // actors // form.streams)
        if not form.compile or (model_dir, form, threads) in seen:
            continue
        seen.add((model_dir, form, threads))
        torch.set_num_threads(threads)
        predictor = Predictor(
            model_dir, "cpu", form.precision, True, BATCH, concurrency=form.streams
        )
        data, _, _ = read_sample_tiles(scene_path, predictor.card, BATCH)
        t0 = time.perf_counter()
        predictor.probabilities(data)
        seconds = time.perf_counter() - t0
        out.append(
            {"model": model_dir.name, "form": form.label, "threads": threads, "seconds": seconds}
        )
        log(f"  {model_dir.name} {form.label}, {threads} thread(s): first call {seconds:.1f} s")
    torch.set_num_threads(os.cpu_count() or 1)
    return out


# ----------------------------------------------------------------------------------------------
# Main


def run_all(cfg: Config) -> dict[str, Any]:
    started = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    # The benchmark's compiled models stay with its other outputs (inherited by every run).
    os.environ.setdefault(CACHE_ENV, str((cfg.out / "compiled").resolve()))
    torch.set_num_threads(os.cpu_count() or 1)
    results: dict[str, Any] = {
        "started": datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "code_start": code_version(),
        "config": {
            "quick": cfg.quick,
            "e2e_size": cfg.e2e_size,
            "e2e_model": cfg.e2e_model.name,
            "mem_repeat": cfg.mem_repeat,
            "device": cfg.device,
            "batch": cfg.batch,
            "raw_tiles": cfg.raw_tiles,
            "raw_passes": cfg.raw_passes,
            "agreement_goal": AGREEMENT_GOAL,
            "compile_cache": os.environ[CACHE_ENV],
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
    # On a GPU only the end-to-end model: the small one serves the CPU's memory and peer runs.
    specs = (DEFAULT_MODEL, SMALL_MODEL) if cfg.device == "cpu" else (cfg.e2e_model,)
    models = {spec.name: (spec, ensure_model(cfg.out, spec)) for spec in specs}

    # 1. Raw forward of every form; the limit of each model is its fastest form within 0.1%.
    results["forward"] = {}
    limits: dict[str, Form] = {}
    for spec, model_dir in models.values():
        log(f"raw forward: {spec.name}")
        quiet = settle(cfg, "raw forward")
        fwd = bench_forward(model_dir, scene, cfg)
        fwd["settle"], fwd["code"] = quiet, code_version()
        fwd["model_name"], fwd["model_label"] = spec.name, spec.label
        chosen = fwd["limit"]
        limits[spec.name] = Form(chosen["precision"], chosen["compile"], chosen["streams"])
        log(
            f"raw forward limit: {fwd['limit']['label']} {fwd['raw']['mp_per_s']:.2f} MP/s; "
            f"actor predict {fwd['actor_predict']['mp_per_s']:.2f} MP/s"
        )
        results["forward"][spec.name] = fwd
        save(results, cfg.out)

    # 2 and 4. End to end with the limit form's precision and compilation in the default layout
    # (one actor; on the CPU two streams, whichever stream layout is faster raw): plain, with
    # CRF, with everything; one stream of all threads; two actors of one thread each; real
    # scenes (NAIP as they are, mosaicked to the generated scene's size, and a bucket of
    # mosaics with polygons).
    e2e_dir = models[cfg.e2e_model.name][1]
    default_streams = CPU_STREAMS if cfg.device == "cpu" else 1
    e2e_form = replace(limits[cfg.e2e_model.name], streams=default_streams)
    one_stream = replace(e2e_form, streams=1)
    naip = real_scenes(cfg.out)
    naip_bands = ("--bands", ",".join(BANDS))
    e2e_runs = [
        ("e2e", scene, e2e_form, (), False),
        ("e2e-crf", scene, e2e_form, ("--crf",), False),
        ("e2e-all", scene, e2e_form, ("--crf", "--simplify", "1px"), True),
        ("e2e-1stream", scene, one_stream, (), False),
        ("e2e-2actors", scene, one_stream, ("--workers", "2"), False),
        ("e2e-naip", naip["scenes"], e2e_form, naip_bands, False),
        ("e2e-naip-mosaic", naip["mosaic"], e2e_form, naip_bands, False),
        ("e2e-naip-bucket", naip["bucket"], e2e_form, (*naip_bands, "--simplify", "1px"), True),
    ]
    if cfg.device == "cuda":  # streams are a CPU layout; the real scenes stay on the CPU machine
        e2e_runs = [r for r in e2e_runs if r[0] in ("e2e", "e2e-crf", "e2e-all", "e2e-2actors")]
        # A job of several scenes, where Ray's and the actor's start (most of a single scene's
        # wall on a GPU) is paid once and each scene's COGs overlap the next one's tiles.
        bucket = [
            make_mosaic_vrt(scene, 1, cfg.out / f"bucket-{i}.vrt") for i in range(BUCKET_SCENES)
        ]
        e2e_runs.append(("e2e-bucket", bucket, e2e_form, (), False))
    else:  # ahead-of-time packages are the CPU's; a GPU actor runs torch.compile (warm-up below)
        log("compiled model packages for every timed run (a user's first run compiles them once)")
        results["compile_cache"] = warm_compile_cache(
            [(e2e_dir, form, 2 if "--workers" in extra else 1) for _, _, form, extra, _ in e2e_runs]
            + [(models[SMALL_MODEL.name][1], SMALL_FORM, 1)],
            scene,
        )
        save(results, cfg.out)
    if e2e_form.compile:
        # On CUDA it fills inductor's on-disk caches, so that each timed actor's torch.compile
        # finds its kernels there (it still compiles during its first batch, inside the scene's
        # time); on the CPU it builds the CRF's packages (geoseg.crf_compiled: the pieces have
        # one shape whatever the scene), which the first timed run with --crf would build.
        log("warm-up: one untimed run with the CRF on a small scene compiles what it runs once")
        results["e2e_warm_up"] = run_segment(
            "warm-up",
            make_scene(cfg.out, 1024),
            e2e_dir,
            cfg,
            form=e2e_form,
            polygons=False,
            extra=("--crf",),
        )
    results["e2e"] = {}
    for label, scenes, form, extra, polygons in e2e_runs:
        if (polygons and not cfg.polygons) or not scenes:
            continue
        results["e2e"][label] = run_segment(
            label,
            scenes,
            e2e_dir,
            cfg,
            form=form,
            polygons=polygons,
            extra=extra,
            timeout_s=cfg.polygon_timeout_s if polygons else None,
        )
        save(results, cfg.out)
    if results["e2e"]:
        log("raw forward: the limit timed again")
        settle(cfg, "raw forward again")
        fwd = results["forward"][cfg.e2e_model.name]
        fwd["raw_again"] = retime_limit(e2e_dir, scene, cfg, limits[cfg.e2e_model.name])
        log(
            f"raw forward limit again: {fwd['raw_again']['mp_per_s']:.2f} MP/s "
            f"(first {fwd['raw']['mp_per_s']:.2f})"
        )
        save(results, cfg.out)
    if cfg.device == "cuda":
        return finish(results, cfg, started)
    small_dir, small_form = models[SMALL_MODEL.name][1], SMALL_FORM

    # 3. Memory, flat in scene size (small model, SMALL_FORM).
    mem: dict[str, Any] = {}
    for key, path in (("small", scene), ("large", vrt)):
        mem[key] = run_segment(
            f"memory-{key}",
            path,
            small_dir,
            cfg,
            form=small_form,
            polygons=False,
            confidence=False,
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

    # 5. Side by side with the tools users would pick (small model, as memory-small, and fp32).
    fp32_run = run_segment(
        "side-geoseg-fp32",
        scene,
        small_dir,
        cfg,
        form=Form("fp32", False, CPU_STREAMS),
        polygons=False,
        confidence=False,
    )
    geoseg_runs = {
        f"geoseg, {small_form.label}": ("memory-small", mem["small"]),
        "geoseg, fp32": ("side-geoseg-fp32", fp32_run),
    }
    results["side_by_side"] = side_by_side(scene, small_dir, geoseg_runs, cfg)
    save(results, cfg.out)

    # 6. Polygonise + simplify a 10k² mask (benchmarks.vectors).
    if cfg.polygons:
        log("vectors: geoseg vectorize --simplify 1px on a generated mask")
        settle(cfg, "vectors")
        results["vectors"] = vectors.main(
            ["--size", str(cfg.e2e_size), "--out", str(cfg.out / "vectors")]
        )
    return finish(results, cfg, started)


def finish(results: dict[str, Any], cfg: Config, started: float) -> dict[str, Any]:
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
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="Where the model runs: cuda measures the GPU's raw forward and end-to-end runs "
        "only [%(default)s].",
    )
    parser.add_argument(
        "--out",
        help="Output folder [benchmarks/out, --device cuda: benchmarks/out/cuda; --quick: a "
        "quick/ folder in it, so that a quick run never overwrites a full run's results].",
    )
    parser.add_argument(
        "--no-polygons", action="store_true", help="Skip the runs that make polygons."
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
