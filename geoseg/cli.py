"""The ``geoseg`` command line.

Exit codes: 0 every scene succeeded; 1 at least one scene failed (the others were still done);
2 bad usage or options (nothing was run).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from geoseg import __version__
from geoseg.errors import GeosegError

EXIT_SCENE_FAILED = 1
EXIT_USAGE = 2

log = logging.getLogger("geoseg")


def _setup_logging(verbose: int, quiet: int) -> None:
    level = logging.INFO + 10 * (quiet - verbose)
    logging.basicConfig(
        level=max(logging.DEBUG, min(level, logging.CRITICAL)),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geoseg")
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less log output (repeatable).")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: int) -> None:
    """Seam-free semantic segmentation of large GeoTIFFs on Ray."""
    _setup_logging(verbose, quiet)
    ctx.obj = {"quiet": quiet > 0}


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
    "--tiles-in-flight", type=int, help="Batches between reading and stitching [2 per worker + 1]."
)
@click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
)
@click.option(
    "--precision",
    default="fp32",
    show_default=True,
    type=click.Choice(["fp32", "bf16"]),
    help="bf16 autocast is faster on CPUs with AMX and on GPUs.",
)
@click.option("--confidence/--no-confidence", default=True, show_default=True)
@click.option("--polygons/--no-polygons", default=True, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--address", help="Ray cluster address [start Ray locally].")
@click.pass_context
def segment(
    ctx: click.Context,
    inputs: tuple[str, ...],
    model_dir: Path,
    out: Path,
    bands: str | None,
    tile_size: int | None,
    overlap: int | None,
    batch_size: int,
    workers: int | None,
    tiles_in_flight: int | None,
    device: str,
    precision: str,
    confidence: bool,
    polygons: bool,
    overwrite: bool,
    address: str | None,
) -> None:
    """Segment INPUTS (GeoTIFFs) into OUT/<name>/: mask.tif, confidence.tif, polygons.gpkg."""
    from geoseg.engine.job import segment as run_segment
    from geoseg.engine.scene import SegmentOptions

    band_names = _csv(bands)
    options = SegmentOptions(
        tile_size=tile_size,
        overlap=overlap,
        batch_size=batch_size,
        workers=workers,
        device=device,
        precision=precision,
        tiles_in_flight=tiles_in_flight,
        confidence=confidence,
        polygons=polygons,
        overwrite=overwrite,
        band_names=tuple(band_names) if band_names else None,
        progress=not ctx.obj["quiet"],
    )
    results = run_segment(list(inputs), model_dir, out, options, address=address)
    failed = [r for r in results if r.status != "ok"]
    click.echo(
        f"{len(results) - len(failed)} ok, {len(failed)} failed; see {out / 'run.json'}", err=True
    )
    for r in failed:
        click.echo(f"FAILED {r.uri}: {r.error}", err=True)
    if failed:
        ctx.exit(EXIT_SCENE_FAILED)


def run() -> None:
    """Entry point: geoseg errors become one clear line and exit code 2."""
    try:
        main(standalone_mode=True)
    except GeosegError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
