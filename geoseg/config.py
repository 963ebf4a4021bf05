"""Job configuration: one YAML file describes a whole run (``geoseg run``, ``geoseg submit``).

Loaded with ``yaml.safe_load`` (no Python tags) and validated with pydantic: unknown keys are
refused with their dotted path, wrong types name the key and the value. Relative local paths
(inputs, model, output root, STAC item files) are resolved against the folder of the config
file, so a config means the same thing from any working directory.

``output_digest`` is the sha256 of every setting that shapes a scene's outputs (bands, tiling,
CRF, output options, precision); settings that only change how fast a run goes (workers, batch
size, tiles in flight, device, Ray address, schedule) are left out, so changing them never
makes a nightly run redo finished scenes.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from geoseg.errors import ConfigError
from geoseg.io.storage import S3Settings
from geoseg.measure import Quantity, parse_area, parse_length
from geoseg.models.card import Precision


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GlobInput(_Strict):
    """Files matching a glob: a local pattern or ``s3://bucket/prefix/**.tif`` (``**`` recurses)."""

    path: str


class StacInput(_Strict):
    """STAC items: a local ItemCollection file (``items``) or a STAC API search (``api``).

    ``assets`` are stacked in the given order into one multi-band scene per item (band names =
    asset keys, matched against the model card's bands).
    """

    items: str | None = None
    api: str | None = None
    collections: list[str] = Field(default_factory=list)
    bbox: list[float] | None = None
    datetime: str | None = None
    query: dict[str, Any] | None = None
    max_items: int = Field(1000, gt=0)
    assets: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> StacInput:
        if (self.items is None) == (self.api is None):
            raise ValueError("give exactly one of `items` (an ItemCollection file) or `api` (URL)")
        if self.bbox is not None and len(self.bbox) not in (4, 6):
            raise ValueError(f"bbox needs 4 or 6 numbers, got {len(self.bbox)}")
        return self


class StacSource(_Strict):
    stac: StacInput


InputSpec = GlobInput | StacSource


class Tiling(_Strict):
    tile_size: int | None = Field(None, gt=0)  # None: the model card's
    overlap: int | None = Field(None, ge=0)
    batch_size: int = Field(4, gt=0)

    @model_validator(mode="after")
    def _overlap_fits(self) -> Tiling:
        tile, overlap = self.tile_size, self.overlap
        if tile is not None and overlap is not None and 2 * overlap >= tile:
            raise ValueError(f"overlap {overlap} must be less than half of tile_size {tile}")
        return self


class Crf(_Strict):
    enabled: bool | None = None  # None: the model card's recommendation
    backend: Literal["local", "dense"] = "local"
    band_rows: int = Field(256, gt=0)
    params: dict[str, float] = Field(default_factory=dict)


class Polygons(_Strict):
    enabled: bool = True
    formats: tuple[Literal["gpkg", "parquet", "fgb"], ...] = Field(("gpkg",), min_length=1)
    min_area: str | None = None  # "20px", "500m2", "0.5ha"
    fill_holes_below: str | None = None
    simplify: str | None = None  # "1px", "2m"

    @field_validator("min_area", "fill_holes_below")
    @classmethod
    def _area(cls, value: str | None) -> str | None:
        if value is not None:
            parse_area(value)
        return value

    @field_validator("simplify")
    @classmethod
    def _length(cls, value: str | None) -> str | None:
        if value is not None:
            parse_length(value)
        return value

    def quantities(self) -> tuple[Quantity | None, Quantity | None, Quantity | None]:
        def area(v: str | None) -> Quantity | None:
            return None if v is None else parse_area(v)

        simplify = None if self.simplify is None else parse_length(self.simplify)
        return area(self.min_area), area(self.fill_holes_below), simplify


class Outputs(_Strict):
    root: str  # a local folder or s3://bucket/prefix
    confidence: bool = True
    polygons: Polygons = Polygons()
    quicklooks: bool = True


class Runtime(_Strict):
    address: str | None = None  # Ray address; None: embedded local Ray (or RAY_ADDRESS in a job)
    workers: int | None = Field(None, gt=0)  # model actors; None: one per GPU, else one
    streams: int | None = Field(None, gt=0)  # passes per actor at once; None: 2 on >= 2 CPU cores
    gpus_per_worker: float = Field(1.0, gt=0, le=8)
    tiles_in_flight: int | None = Field(None, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Precision = "fp32"  # autocast; the model card lists the allowed ones
    compile: bool = False  # torch.compile the model (static shapes; first scene pays the compile)
    fail_fast: bool = False  # stop at the first failed scene (the exit code says so either way)
    lock_ttl_s: float = Field(600.0, ge=10)  # a lock not refreshed this long is stale


_CRON_FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day", 1, 31),
    ("month", 1, 12),
    ("weekday", 0, 7),
)
_CRON_ITEM = re.compile(r"(\*|\d+(-\d+)?)(/\d+)?")


def check_cron(expression: str) -> str:
    """Validate a 5-field cron expression (numbers, ranges, lists, steps; no names)."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"cron {expression!r} needs 5 fields (minute hour day month weekday)")
    for text, (what, low, high) in zip(fields, _CRON_FIELDS, strict=True):
        for item in text.split(","):
            if not _CRON_ITEM.fullmatch(item):
                raise ValueError(f"cron {expression!r}: bad {what} field {text!r}")
            numbers = [int(n) for n in re.findall(r"\d+", item.split("/")[0])]
            if any(not low <= n <= high for n in numbers):
                raise ValueError(f"cron {expression!r}: {what} must be within {low}-{high}")
    return expression


class Schedule(_Strict):
    cron: str
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        return check_cron(value)


class JobConfig(_Strict):
    """A whole job: see README "Job configuration" for every key."""

    inputs: Annotated[list[InputSpec], Field(min_length=1)]
    bands: list[str] | None = None  # names of the files' bands in order, when they carry none
    model: str
    tiling: Tiling = Tiling()
    crf: Crf = Crf()
    outputs: Outputs
    runtime: Runtime = Runtime()
    storage: S3Settings = S3Settings()  # endpoint and retries; credentials: AWS environment
    schedule: Schedule | None = None

    def submission_digest(self) -> str:
        """sha256 of the whole config: with the inputs' identities, a submission's identity."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def output_digest(self) -> str:
        """sha256 of the settings that shape a scene's outputs (see the module docstring)."""
        shaping = {
            "bands": self.bands,
            "tiling": self.tiling.model_dump(exclude={"batch_size"}),
            "crf": self.crf.model_dump(),
            "outputs": self.outputs.model_dump(exclude={"root", "quicklooks"}),
            "precision": self.runtime.precision,
        }
        text = json.dumps(shaping, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def is_remote(location: str) -> bool:
    return "://" in location


def _resolve(location: str, base: Path) -> str:
    if is_remote(location):
        return location
    path = Path(location).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _resolve_paths(config: JobConfig, base: Path) -> JobConfig:
    inputs: list[InputSpec] = []
    for spec in config.inputs:
        if isinstance(spec, GlobInput):
            inputs.append(GlobInput(path=_resolve(spec.path, base)))
        elif spec.stac.items is not None:
            stac = spec.stac.model_copy(update={"items": _resolve(spec.stac.items, base)})
            inputs.append(StacSource(stac=stac))
        else:
            inputs.append(spec)
    outputs = config.outputs.model_copy(update={"root": _resolve(config.outputs.root, base)})
    return config.model_copy(
        update={"inputs": inputs, "model": _resolve(config.model, base), "outputs": outputs}
    )


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(
            str(p) for p in item["loc"] if not str(p).startswith(("GlobInput", "StacSource"))
        )
        if item["type"] == "extra_forbidden":
            lines.append(
                f"  {where}: unknown key (check the spelling; see README 'Job configuration')"
            )
        else:
            value = item.get("input")
            shown = "" if isinstance(value, dict | list) else f" (got {value!r})"
            lines.append(f"  {where or '(top level)'}: {item['msg']}{shown}")
    return f"{source}: invalid job configuration:\n" + "\n".join(dict.fromkeys(lines))


def parse_config(text: str, source: str, base: Path) -> JobConfig:
    """Parse YAML ``text`` (named ``source`` in errors); relative paths resolve against ``base``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{source}: not valid YAML (or uses a Python tag, refused): {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: a job configuration is a YAML mapping, got {type(data).__name__}"
        )
    try:
        config = JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from exc
    return _resolve_paths(config, base)


def load_config(path: Path) -> JobConfig:
    """Read and validate the job configuration at ``path``."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the job configuration: {exc.strerror}") from exc
    return parse_config(text, str(path), path.resolve().parent)
