"""The ``geoseg`` command line.

Exit codes: 0 every scene succeeded; 1 at least one scene failed (the others were still done);
2 bad usage or options (nothing was run); 3 another run holds the output root's lock (``run``),
or the same job was submitted already (``submit``); 130 ``run`` was interrupted (SIGINT/SIGTERM).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml

from geoseg import __version__
from geoseg.errors import GeosegError

if TYPE_CHECKING:
    from geoseg.measure import Quantity

EXIT_SCENE_FAILED = 1
EXIT_USAGE = 2
EXIT_BUSY = 3
EXIT_INTERRUPTED = 130  # as shells report a process stopped by SIGINT


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


log = logging.getLogger("geoseg")


def _setup_logging(verbose: int, quiet: int) -> None:
    """``-v`` adds geoseg's debug messages, ``-vv`` every library's too (rasterio's run to
    hundreds of lines a scene: one per GDAL environment, colour-table entry and window)."""
    level = max(logging.DEBUG, min(logging.INFO + 10 * (quiet - verbose), logging.CRITICAL))
    logging.basicConfig(
        level=level if verbose > 1 else max(level, logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log.setLevel(level)


@contextlib.contextmanager
def _engine_imports() -> Iterator[None]:
    """Import the engine (torch, Ray, GDAL, pandas: about a million objects that live as long as
    the process) with the garbage collector off, then put them out of its reach (``gc.freeze``).
    It scanned them again at every full collection: 0.27 s of the 1.4 s of importing, and the
    scenes' full collections too (0.3-0.4 s of a 6k² scene's driver time in all)."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise click.BadParameter("give a comma-separated list")
    return items


def _arch_args(values: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(raw)
    return out


def _area(ctx: click.Context, param: click.Parameter, value: str | None) -> Quantity | None:
    from geoseg.measure import parse_area

    try:
        return parse_area(value) if value is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _length(ctx: click.Context, param: click.Parameter, value: str | None) -> Quantity | None:
    from geoseg.measure import parse_length

    try:
        return parse_length(value) if value is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _formats(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    from geoseg.io.vectors import parse_formats

    try:
        return parse_formats(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _polygon_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The polygon options shared by ``segment`` and ``vectorize``."""
    options = [
        click.option(
            "--vector-format",
            "vector_formats",
            multiple=True,
            callback=_formats,
            metavar="gpkg|parquet|fgb",
            help="Polygon formats, repeatable or comma-separated [gpkg].",
        ),
        click.option(
            "--min-area",
            callback=_area,
            metavar="SIZE",
            help="Minimum mapping unit, e.g. 20px or 500m2: smaller regions are merged into the "
            "neighbour they share the longest boundary with [off].",
        ),
        click.option(
            "--fill-holes-below",
            callback=_area,
            metavar="SIZE",
            help="Fill holes smaller than this (20px, 500m2) with the surrounding polygon [off].",
        ),
        click.option(
            "--simplify",
            callback=_length,
            metavar="TOL",
            help="Topology-preserving simplification of the whole coverage, e.g. 1px or 2m "
            "(no gaps or overlaps between neighbours) [off].",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geoseg")
@click.option(
    "-v", "--verbose", count=True, help="More log output (-vv: other libraries' debug output too)."
)
@click.option("-q", "--quiet", count=True, help="Less log output (repeatable).")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: int) -> None:
    """Seam-free semantic segmentation of large GeoTIFFs on Ray."""
    _setup_logging(verbose, quiet)
    # run(), the console entry point, passes {"process_exits": True}: see run().
    ctx.ensure_object(dict)["quiet"] = quiet > 0


_CRF_PARAMS = {
    "crf_iterations": ("iterations", int, "mean-field iterations"),
    "crf_window": ("window", int, "odd window edge messages travel in (local backend)"),
    "crf_spatial_sigma": ("spatial_sigma", float, "smoothness kernel width, pixels"),
    "crf_spatial_weight": ("spatial_weight", float, "smoothness kernel weight"),
    "crf_bilateral_sigma_xy": ("bilateral_sigma_xy", float, "appearance kernel width, pixels"),
    "crf_bilateral_sigma_feat": (
        "bilateral_sigma_feat", float, "appearance kernel width, normalised band units",
    ),
    "crf_bilateral_weight": ("bilateral_weight", float, "appearance kernel weight"),
}  # fmt: skip


def _crf_options(command: Callable[..., None]) -> Callable[..., None]:
    """CRF options of ``segment``: on/off, backend, band height and each kernel parameter."""
    for name, (_, kind, text) in reversed(_CRF_PARAMS.items()):
        flag = "--" + name.replace("_", "-")
        command = click.option(flag, name, type=kind, help=f"CRF: {text} [card's].")(command)
    command = click.option(
        "--crf-band-rows", default=256, show_default=True, type=int,
        help="CRF: rows refined at a time (plus a halo of iterations x window radius).",
    )(command)  # fmt: skip
    command = click.option(
        "--crf-backend", default="local", show_default=True, type=click.Choice(["local", "dense"]),
        help="CRF: local-window mean field (any size), or the fully connected reference "
        "(pydensecrf2, whole scene in memory).",
    )(command)  # fmt: skip
    return click.option(
        "--crf/--no-crf", default=None,
        help="CRF-smooth the blended probabilities [on when the model card recommends it].",
    )(command)  # fmt: skip


@main.group()
def model() -> None:
    """Create and inspect model directories (model.yaml + weights.safetensors)."""


@model.command("init")
@click.argument("arch", type=click.Choice(["fcn", "unet", "deeplabv3"]))
@click.option("--bands", required=True, help="Input band names in order, e.g. red,green,blue.")
@click.option("--classes", required=True, help="Class names in id order, e.g. water,trees.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Model directory.")
@click.option(
    "--input-dtype",
    default="uint8",
    show_default=True,
    type=click.Choice(["uint8", "uint16", "int16", "float32"]),
)
@click.option("--tile-size", default=512, show_default=True, type=int)
@click.option("--overlap", default=64, show_default=True, type=int)
@click.option(
    "--arch-arg",
    "arch_arg",
    multiple=True,
    metavar="KEY=VALUE",
    help="Architecture argument, e.g. base_channels=16 (repeatable).",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Replace an existing model directory.")
def model_init(
    arch: str,
    bands: str,
    classes: str,
    out: Path,
    input_dtype: str,
    tile_size: int,
    overlap: int,
    arch_arg: tuple[str, ...],
    seed: int,
    overwrite: bool,
) -> None:
    """Write a model card and freshly initialised (seeded) weights to --out."""
    from geoseg.models.store import init_model

    card = init_model(
        arch,
        _csv(bands) or [],
        _csv(classes) or [],
        out,
        input_dtype=input_dtype,
        arch_args=_arch_args(arch_arg),
        tile_size=tile_size,
        overlap=overlap,
        seed=seed,
        overwrite=overwrite,
    )
    log.info(
        "wrote %s (%s, %d classes, total stride %d)", out, arch, card.num_classes, card.total_stride
    )


@model.command("import-dynamicworld")
@click.argument("savedmodel_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Model directory.")
@click.option("--overwrite", is_flag=True, help="Replace an existing model directory.")
def model_import_dynamicworld(savedmodel_dir: Path, out: Path, overwrite: bool) -> None:
    """Convert Google's Dynamic World TensorFlow SavedModel (its forward/ folder) into a model
    directory at --out. TensorFlow is not needed."""
    from geoseg.models.dynamicworld import import_dynamicworld

    card = import_dynamicworld(savedmodel_dir, out, overwrite=overwrite)
    log.info(
        "wrote %s (%s, %d bands, %d classes, tile %d, overlap %d)",
        out,
        card.arch,
        len(card.bands),
        card.num_classes,
        card.tile_size,
        card.overlap,
    )


@model.command("info")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
def model_info(model_dir: Path, as_json: bool) -> None:
    """Print a model's card and weights digest."""
    from geoseg.models.card import WEIGHTS_FILE, file_sha256, read_card

    card = read_card(model_dir)
    data = card.model_dump(mode="json")
    data["weights_sha256"] = file_sha256(model_dir / WEIGHTS_FILE)
    click.echo(json.dumps(data, indent=2) if as_json else yaml.safe_dump(data, sort_keys=False))


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output root: one folder per input plus run.json.",
)
@click.option(
    "--bands",
    help="Names of the input files' bands in order (when the files lack "
    "band descriptions), e.g. red,green,blue,nir.",
)
@click.option("--tile-size", type=int, help="Tile edge in pixels [card's].")
@click.option("--overlap", type=int, help="Tile overlap in pixels [card's].")
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--workers", type=int, help="Model actors [one per GPU, else one].")
@click.option(
    "--streams",
    type=click.IntRange(min=1),
    help="Forward passes each actor runs at once, each on its share of the actor's cores [2 on "
    "an actor of 2 or more CPU cores, else 1]; on 2 CPU cores 2 streams ran 7-17% faster than 1.",
)
@click.option(
    "--tiles-in-flight", type=int, help="Batches between reading and stitching [2 per stream + 1]."
)
@click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
)
@click.option(
    "--precision",
    default="fp32",
    show_default=True,
    type=click.Choice(["fp32", "bf16", "fp16"]),
    help="Autocast: bf16 is faster on CPUs with AMX-BF16 and on GPUs, fp16 on GPUs only; the "
    "model card lists those that keep its class map within 0.1% of fp32.",
)
@click.option(
    "--compile/--no-compile",
    "compile_model",
    default=False,
    show_default=True,
    help="torch.compile the model: several times faster with bf16 on CPU; the first run "
    "compiles for tens of seconds (cached on disk for later runs).",
)
@click.option("--confidence/--no-confidence", default=True, show_default=True)
@click.option("--polygons/--no-polygons", default=True, show_default=True)
@_polygon_options
@_crf_options
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--address", help="Ray cluster address [start Ray locally].")
@click.pass_context
def segment(
    ctx: click.Context,
    /,
    inputs: tuple[str, ...],
    model_dir: Path,
    out: Path,
    bands: str | None,
    tile_size: int | None,
    overlap: int | None,
    batch_size: int,
    workers: int | None,
    streams: int | None,
    tiles_in_flight: int | None,
    device: str,
    precision: str,
    compile_model: bool,
    confidence: bool,
    polygons: bool,
    vector_formats: tuple[str, ...],
    min_area: Quantity | None,
    fill_holes_below: Quantity | None,
    simplify: Quantity | None,
    overwrite: bool,
    address: str | None,
    crf: bool | None,
    crf_backend: str,
    crf_band_rows: int,
    **crf_params: float | None,
) -> None:
    """Segment INPUTS (GeoTIFFs) into OUT/<name>/: mask.tif, confidence.tif, polygons.gpkg."""
    with _engine_imports():
        from geoseg.engine.job import segment as run_segment
        from geoseg.engine.scene import SegmentOptions

    band_names = _csv(bands)
    options = SegmentOptions(
        tile_size=tile_size,
        overlap=overlap,
        batch_size=batch_size,
        workers=workers,
        streams=streams,
        device=device,
        precision=precision,
        compile=compile_model,
        tiles_in_flight=tiles_in_flight,
        confidence=confidence,
        polygons=polygons,
        overwrite=overwrite,
        band_names=tuple(band_names) if band_names else None,
        progress=not ctx.obj["quiet"],
        min_area=min_area,
        fill_holes_below=fill_holes_below,
        simplify=simplify,
        vector_formats=vector_formats,
        crf=crf,
        crf_params={_CRF_PARAMS[k][0]: v for k, v in crf_params.items() if v is not None},
        crf_backend=crf_backend,
        crf_band_rows=crf_band_rows,
    )
    results = run_segment(
        list(inputs),
        model_dir,
        out,
        options,
        address=address,
        process_exits=ctx.obj.get("process_exits", False),
    )
    failed = [r for r in results if r.status != "ok"]
    click.echo(
        f"{len(results) - len(failed)} ok, {len(failed)} failed; see {out / 'run.json'}", err=True
    )
    for r in failed:
        click.echo(f"FAILED {r.uri}: {r.error}", err=True)
    if failed:
        ctx.exit(EXIT_SCENE_FAILED)


@main.command("run")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--address", help="Ray cluster address [config's runtime.address, else local].")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Segment every input again, and replace outputs no run of this output root recorded.",
)
@click.pass_context
def run_command(
    ctx: click.Context, /, config_path: Path, address: str | None, overwrite: bool
) -> None:
    """Run the job CONFIG (YAML): only new or changed inputs are segmented."""
    import os

    from geoseg.config import load_config
    from geoseg.errors import LockedError

    with _engine_imports():
        from geoseg.engine.runner import run_job

    config = load_config(config_path)
    # Inside a Ray job (geoseg submit, RayJob, RayCronJob) RAY_ADDRESS names the cluster.
    address = address or config.runtime.address or os.environ.get("RAY_ADDRESS")
    # SIGTERM (kill, Kubernetes, systemd) stops like Ctrl-C: the scene in progress is discarded,
    # committed scenes stay, the lock is released, and a rerun resumes.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = run_job(
            config,
            overwrite=overwrite,
            progress=not ctx.obj["quiet"],
            address=address,
            process_exits=ctx.obj.get("process_exits", False),
        )
    except LockedError as exc:
        click.echo(f"Error: {exc}", err=True)
        ctx.exit(EXIT_BUSY)
    except KeyboardInterrupt:
        click.echo(
            f"Interrupted: committed scenes are kept in {config.outputs.root}; "
            "the scene in progress was discarded. Rerun to resume.",
            err=True,
        )
        ctx.exit(EXIT_INTERRUPTED)
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo(f"{summary.line}; see {summary.run_file}", err=True)
    for r in summary.failed:
        click.echo(f"FAILED {r.uri}: {r.error}", err=True)
    if summary.failed:
        ctx.exit(EXIT_SCENE_FAILED)


_ADDRESS = click.option(
    "--address",
    required=True,
    envvar="RAY_API_SERVER_ADDRESS",
    help="Ray Jobs API of the cluster, e.g. http://HEAD:8265 [env RAY_API_SERVER_ADDRESS].",
)


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False, path_type=Path))
@_ADDRESS
@click.option(
    "--wait", is_flag=True, help="Print the job's log until it ends; exit 0 if it succeeded."
)
@click.pass_context
def submit(ctx: click.Context, /, config_path: Path, address: str, wait: bool) -> None:
    """Submit the job CONFIG to a Ray cluster (jobs/segment_bucket.py through the Jobs API).

    The submission id is derived from the config and its inputs' identities: submitting the same
    job twice is refused (exit 3) instead of running it twice.
    """
    import shutil
    import tempfile

    import yaml

    from geoseg.config import load_config
    from geoseg.engine import submit as jobs_api
    from geoseg.engine.runner import plan_inputs
    from geoseg.errors import ConfigError, DuplicateSubmissionError

    config = load_config(config_path)
    jobs_dir = Path(__file__).resolve().parents[1] / "jobs"
    if not (jobs_dir / "segment_bucket.py").is_file():
        raise ConfigError(
            f"{jobs_dir}/segment_bucket.py is missing: geoseg submit ships the job entry points of "
            "a source checkout (or the image's /app); run it from one"
        )
    with tempfile.TemporaryDirectory(prefix="geoseg-submit-") as tmp:
        work = Path(tmp)
        identities = [f"{p.uri}={p.identity}" for p in plan_inputs(config, work / ".stac")]
        shutil.rmtree(work / ".stac", ignore_errors=True)
        job_id = jobs_api.submission_id(config.submission_digest(), identities)
        shutil.copytree(jobs_dir, work / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
        # Paths in the resolved config are absolute: the job reads the same files and models.
        (work / "job.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
        try:
            jobs_api.submit(address, "python jobs/segment_bucket.py job.yaml", job_id, work)
        except DuplicateSubmissionError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(EXIT_BUSY)
    click.echo(job_id)
    log.info("submitted %s (%d inputs); follow it with `geoseg logs %s --follow`",
             job_id, len(identities), job_id)  # fmt: skip
    if wait:
        _follow_and_exit(ctx, address, job_id)


def _follow_and_exit(ctx: click.Context, address: str, job_id: str) -> None:
    from geoseg.engine import submit as jobs_api

    for chunk in jobs_api.follow_logs(address, job_id):
        click.echo(chunk, nl=False)
    status = jobs_api.job_status(address, job_id)
    click.echo(f"{job_id}: {status}", err=True)
    if status != "SUCCEEDED":
        ctx.exit(EXIT_SCENE_FAILED)


@main.command()
@click.argument("job_id", metavar="ID")
@_ADDRESS
def status(job_id: str, address: str) -> None:
    """Print the status of submitted job ID: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    from geoseg.engine import submit as jobs_api

    click.echo(jobs_api.job_status(address, job_id))


@main.command()
@click.argument("job_id", metavar="ID")
@_ADDRESS
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
@click.pass_context
def logs(ctx: click.Context, /, job_id: str, address: str, follow: bool) -> None:
    """Print the log of submitted job ID (with --follow: exit 0 only if it succeeded)."""
    from geoseg.engine import submit as jobs_api

    if follow:
        _follow_and_exit(ctx, address, job_id)
    else:
        click.echo(jobs_api.job_logs(address, job_id), nl=False)


@main.command()
@click.argument("job_id", metavar="ID")
@_ADDRESS
def stop(job_id: str, address: str) -> None:
    """Ask submitted job ID to stop (its finished scenes stay committed; a rerun resumes)."""
    from geoseg.engine import submit as jobs_api

    was_running = jobs_api.stop_job(address, job_id)
    click.echo(f"{job_id}: {'stopping' if was_running else 'not running'}")


@main.command()
@click.argument("mask", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder for polygons.<ext> (created).",
)
@_polygon_options
@click.option(
    "--model",
    "model_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Model directory: class names and colours when the raster carries none, and the "
    "model_name / weights_sha256 attributes.",
)
@click.option(
    "--confidence",
    "confidence_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Confidence raster on the mask's grid for confidence_mean [confidence.tif beside a "
    "mask.tif].",
)
@click.option("--scene-id", help="scene_id attribute [the mask's folder for mask.tif, else stem].")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
def vectorize(
    mask: Path,
    out: Path,
    vector_formats: tuple[str, ...],
    min_area: Quantity | None,
    fill_holes_below: Quantity | None,
    simplify: Quantity | None,
    model_dir: Path | None,
    confidence_path: Path | None,
    scene_id: str | None,
    overwrite: bool,
) -> None:
    """Polygons of any class raster MASK into --out, as `segment` writes them.

    Class names and colours come from the raster's CLASS_NAMES / CLASS_COLORS tags (geoseg's
    masks), else from --model's card and the raster's colour table, else class_<id>.
    """
    from geoseg.io.vectors import vectorize_file
    from geoseg.models.card import WEIGHTS_FILE, file_sha256, read_card
    from geoseg.vectorize import CoverageOptions

    card = read_card(model_dir) if model_dir is not None else None
    weights = model_dir / WEIGHTS_FILE if model_dir is not None else None
    files, count = vectorize_file(
        mask,
        out,
        formats=vector_formats,
        coverage=CoverageOptions(min_area, fill_holes_below, simplify),
        card_classes=card.classes if card is not None else (),
        model_name=card.name if card is not None else None,
        weights_sha256=file_sha256(weights) if weights is not None and weights.exists() else None,
        confidence_path=confidence_path,
        scene_id=scene_id,
        overwrite=overwrite,
    )
    log.info("%s: %d polygons -> %s", mask, count, ", ".join(str(f) for f in files))


def _label_map(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> dict[int, int] | None:
    from geoseg.training import parse_label_map

    try:
        return parse_label_map(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@main.command(context_settings={"allow_interspersed_args": True})
@click.argument("more_images", nargs=-1, metavar="[IMAGE...]")
@click.option(
    "--images",
    "images",
    multiple=True,
    required=True,
    help="Training image(s); more may follow it: --images A.tif B.tif.",
)
@click.option(
    "--labels",
    "labels",
    multiple=True,
    required=True,
    help="Class raster on the images' grid, or vector file with --label-field: one for all "
    "images, or one per image (repeat --labels).",
)
@click.option(
    "--arch", required=True, type=click.Choice(["fcn", "unet", "deeplabv3"]), help="Architecture."
)
@click.option(
    "--classes",
    required=True,
    help="Class names in id order. Vector labels: the --label-field values, others unlabelled. "
    "Raster labels: the names of ids 0..n-1 (after --label-map).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Model directory.")
@click.option("--label-field", help="Class attribute of vector labels, e.g. Niveau_2.")
@click.option(
    "--label-map",
    callback=_label_map,
    metavar="V:ID,...",
    help="Raster labels: value -> class id, e.g. 1:0,2:1,8:4; unlisted values are unlabelled.",
)
@click.option("--bands", help="Names of the images' bands in order, when they carry none.")
@click.option("--steps", default=300, show_default=True, type=int)
@click.option("--crop", default=128, show_default=True, type=int, help="Training crop edge, px.")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--lr", default=3e-3, show_default=True, type=float)
@click.option(
    "--val-fraction",
    default=0.2,
    show_default=True,
    type=float,
    help="Share of the labelled blocks held out for validation.",
)
@click.option("--block", default=64, show_default=True, type=int, help="Split block edge, px.")
@click.option("--margin", type=int, help="Training labels dropped around val blocks, px [crop/2].")
@click.option(
    "--arch-arg",
    "arch_arg",
    multiple=True,
    metavar="KEY=VALUE",
    help="Architecture argument, e.g. base_channels=16 (repeatable).",
)
@click.option(
    "--class-weights",
    default="balanced",
    show_default=True,
    type=click.Choice(["balanced", "none"]),
    help="Loss weight per class: balanced = 1/sqrt(share of training pixels).",
)
@click.option("--tile-size", default=512, show_default=True, type=int, help="Card's tile size.")
@click.option("--overlap", default=64, show_default=True, type=int, help="Card's tile overlap.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
)
@click.option("--overwrite", is_flag=True, help="Replace an existing model directory.")
def train(
    more_images: tuple[str, ...],
    images: tuple[str, ...],
    labels: tuple[str, ...],
    arch: str,
    classes: str,
    out: Path,
    label_field: str | None,
    label_map: dict[int, int] | None,
    bands: str | None,
    steps: int,
    crop: int,
    batch_size: int,
    lr: float,
    val_fraction: float,
    block: int,
    margin: int | None,
    arch_arg: tuple[str, ...],
    class_weights: str,
    tile_size: int,
    overlap: int,
    seed: int,
    device: str,
    overwrite: bool,
) -> None:
    """Train a model on images and labels with a spatial-block validation split; write a model
    directory for `geoseg segment` with train_log.json, metrics.json and split.json."""
    from geoseg.training import TrainConfig
    from geoseg.training import train as run_train

    config = TrainConfig(
        images=[*images, *more_images],
        labels=list(labels),
        arch=arch,
        classes=_csv(classes) or [],
        out=out,
        label_field=label_field,
        label_map=label_map,
        bands=_csv(bands),
        steps=steps,
        crop=crop,
        batch_size=batch_size,
        lr=lr,
        val_fraction=val_fraction,
        block=block,
        margin=margin,
        arch_args=_arch_args(arch_arg),
        class_weights=class_weights,
        tile_size=tile_size,
        overlap=overlap,
        seed=seed,
        device=device,
        overwrite=overwrite,
    )
    result = run_train(config)
    val = result.metrics["validation"]
    base = result.metrics["majority_baseline"]
    if val is not None and base is not None:
        click.echo(
            f"{out}: validation mIoU {val['miou']:.3f}, OA {val['overall_accuracy']:.3f}, "
            f"boundary F1 {val['boundary_f1']:.3f} (majority class {base['class']}: "
            f"mIoU {base['miou']:.3f}); {result.train_seconds:.1f} s training"
        )
    else:
        click.echo(f"{out}: trained in {result.train_seconds:.1f} s (no validation pixels)")


@main.command()
@click.option(
    "--pred",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Predicted class raster (e.g. geoseg's mask.tif).",
)
@click.option("--labels", required=True, help="Class raster or vector file (with --label-field).")
@click.option("--label-field", help="Class attribute of vector labels.")
@click.option(
    "--classes",
    help="Class names in id order, for masks without a CLASS_NAMES tag (geoseg's have one); "
    "vector label values map to the ids of the same names.",
)
@click.option(
    "--label-map",
    callback=_label_map,
    metavar="V:ID,...",
    help="Raster labels: value -> class id; unlisted values are unlabelled.",
)
@click.option("--boundary-tolerance", default=2, show_default=True, type=int, help="Pixels.")
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write scores."
)
def evaluate(
    pred: Path,
    labels: str,
    label_field: str | None,
    classes: str | None,
    label_map: dict[int, int] | None,
    boundary_tolerance: int,
    json_path: Path | None,
) -> None:
    """Score a predicted class raster against labels: confusion matrix, per-class IoU, mIoU,
    overall accuracy, boundary F1. Prediction nodata and unlabelled pixels are left out."""
    from geoseg.evaluate import evaluate_mask, format_table
    from geoseg.io.outputs import write_json_atomic

    result = evaluate_mask(
        pred,
        labels,
        classes=_csv(classes),
        label_field=label_field,
        label_map=label_map,
        boundary_tolerance=boundary_tolerance,
    )
    click.echo(format_table(result))
    if json_path is not None:
        write_json_atomic(json_path, result)


def run() -> None:
    """Entry point: geoseg errors become one clear line and exit code 2.

    The process exits after its one command, which lets it skip two costs of every run after its
    last output: a job stops Ray as soon as its last tile is in, while the last scene's COGs and
    polygons are written (``process_exits``); and the interpreter's last garbage collection, which
    walked every object of torch, Ray and pandas (0.3-0.6 s), is skipped by freezing them at exit.
    Outputs never depend on that collection: they are closed and renamed into place explicitly.
    """
    atexit.register(gc.freeze)  # runs after every exit hook registered later (Ray's, geoseg's)
    try:
        main(standalone_mode=True, obj={"process_exits": True})
    except GeosegError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
