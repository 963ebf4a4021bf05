"""The model card: what a model directory promises (``model.yaml`` + ``weights.safetensors``).

The card states the architecture and its arguments, the input bands by name and order, how raw
pixel values are scaled (``x' = (x * scale + offset - mean) / std`` per band), the accepted input
dtypes, the classes (id, name, RGB colour) and the recommended tile size and overlap. Weights are
only ever read with safetensors: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from geoseg.errors import ConfigError, ModelCardError

# Autocast precisions a run may ask for (geoseg.engine.predict); a card lists its model's.
Precision = Literal["fp32", "bf16", "fp16"]

CARD_FILE = "model.yaml"
WEIGHTS_FILE = "weights.safetensors"

# Distinct colours for classes whose card gives none (QGIS-style categorical palette).
DEFAULT_COLORS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (44, 160, 44),
    (214, 39, 40),
    (188, 189, 34),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (23, 190, 207),
    (255, 127, 14),
)


# Red, green, blue under the band names cards use: plain, Sentinel-2, Landsat 8/9.
_DISPLAY_BANDS = (("red", "green", "blue"), ("b4", "b3", "b2"))


def canonical_band_name(name: str) -> str:
    """Normalise a band name for matching: case, spaces, and Sentinel-2 style zero padding.

    ``"B02"`` and ``"b2"`` match; ``"Red"`` and ``"red"`` match; ``"NIR"`` and ``"nir"`` match.
    """
    name = name.strip().lower().replace(" ", "")
    match = re.fullmatch(r"b0*(\d+a?)", name)
    return f"b{match.group(1)}" if match else name


class ClassInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(ge=0, le=65534)
    name: str = Field(min_length=1)
    color: tuple[int, int, int]

    @field_validator("color")
    @classmethod
    def _check_color(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError(f"colour components must be 0..255, got {value}")
        return value


# Published normalisations a card can name instead of giving affine parameters, with the number of
# bands each is defined for; geoseg.models.store.normalize applies them.
NAMED_NORMALIZATIONS: dict[str, int] = {"dynamicworld": 9}


class Normalization(BaseModel):
    """Per-band affine scaling, each list of length 1 (all bands) or one value per band; or
    ``named``: a published normalisation (``dynamicworld``: Brown et al. 2022), then exclusively."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    named: Literal["dynamicworld"] | None = None
    scale: list[float] = [1.0]
    offset: list[float] = [0.0]
    mean: list[float] = [0.0]
    std: list[float] = [1.0]

    @model_validator(mode="after")
    def _check_named(self) -> Normalization:
        if self.named is not None and self.model_fields_set - {"named"}:
            raise ValueError(
                f"normalization.named={self.named!r} excludes scale, offset, mean and std"
            )
        return self

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Cards state one kind: {named: ...} alone, or the affine keys alone (as before ``named``).
        data: dict[str, Any] = handler(self)
        if self.named is not None:
            return {"named": self.named}
        data.pop("named", None)
        return data

    @field_validator("std")
    @classmethod
    def _check_std(cls, value: list[float]) -> list[float]:
        if any(s == 0 for s in value):
            raise ValueError("std must not contain 0")
        return value

    def per_band(self, bands: int) -> dict[str, list[float]]:
        """Each parameter broadcast to ``bands`` values (identity ones for a named normalisation,
        which is checked to be defined for ``bands`` bands)."""
        if self.named is not None and bands != NAMED_NORMALIZATIONS[self.named]:
            raise ModelCardError(
                f"normalization.named={self.named!r} is defined for "
                f"{NAMED_NORMALIZATIONS[self.named]} bands; the card has {bands}"
            )
        out = {}
        for key in ("scale", "offset", "mean", "std"):
            values: list[float] = getattr(self, key)
            if len(values) not in (1, bands):
                raise ModelCardError(
                    f"normalization.{key} has {len(values)} values; the card has {bands} bands: "
                    "give one value or one per band"
                )
            out[key] = values * bands if len(values) == 1 else list(values)
        return out


class CRFSettings(BaseModel):
    """The card's CRF recommendation: whether to refine, with which bands and parameters.

    ``feature_bands`` feed the CRF's appearance kernel after the card's normalisation (default:
    the first three of the card's bands); ``params`` override :class:`geoseg.crf.CRFParams`
    defaults (``iterations``, ``window``, ``spatial_sigma``, ``spatial_weight``,
    ``bilateral_sigma_xy``, ``bilateral_sigma_feat``, ``bilateral_weight``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    recommended: bool = False
    feature_bands: list[str] | None = None
    params: dict[str, float] = {}


class ModelCard(BaseModel):
    """Contents of ``model.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    arch: str
    arch_args: dict[str, Any] = {}
    total_stride: int = Field(ge=1)
    bands: list[str] = Field(min_length=1)
    input_dtypes: list[str] = Field(min_length=1)
    normalization: Normalization = Normalization()
    classes: list[ClassInfo] = Field(min_length=1)
    tile_size: int = Field(default=512, ge=1)
    overlap: int = Field(default=64, ge=0)
    crf: CRFSettings = CRFSettings()
    # Precisions that keep the class map within 0.1% of fp32 (as measured for this model); others
    # are refused rather than silently changing the map.
    precisions: list[Precision] = ["fp32", "bf16", "fp16"]
    description: str = ""

    def check_precision(self, precision: str) -> None:
        """ConfigError unless ``precision`` is one of :attr:`precisions`."""
        if precision not in self.precisions:
            raise ConfigError(
                f"model {self.name!r}: precision {precision!r} changes its class map by more "
                f"than 0.1% of pixels; its card allows {', '.join(self.precisions)}: use one "
                "of those (e.g. --precision fp32 / runtime.precision: fp32)"
            )

    @model_validator(mode="after")
    def _check(self) -> ModelCard:
        ids = [c.id for c in self.classes]
        if sorted(ids) != list(range(len(ids))):
            raise ValueError(f"class ids must be 0..{len(ids) - 1} without gaps, got {ids}")
        canonical = [canonical_band_name(b) for b in self.bands]
        if len(set(canonical)) != len(canonical):
            raise ValueError(f"band names repeat: {self.bands}")
        self.normalization.per_band(len(self.bands))
        unknown = [
            b for b in self.crf.feature_bands or [] if canonical_band_name(b) not in canonical
        ]
        if unknown:
            raise ValueError(f"crf.feature_bands {unknown} are not among the bands {self.bands}")
        return self

    def crf_feature_indexes(self) -> list[int]:
        """Positions, among the card's bands, of the bands feeding the CRF's appearance kernel."""
        canonical = [canonical_band_name(b) for b in self.bands]
        if self.crf.feature_bands is None:
            return list(range(min(3, len(self.bands))))
        return [canonical.index(canonical_band_name(b)) for b in self.crf.feature_bands]

    def display_band_indexes(self) -> list[int]:
        """Positions, among the card's bands, of red, green and blue (Sentinel-2/Landsat names
        too) for quicklooks; the first band alone (grey) when the card has no colour bands."""
        canonical = [canonical_band_name(b) for b in self.bands]
        for names in _DISPLAY_BANDS:
            if all(n in canonical for n in names):
                return [canonical.index(n) for n in names]
        return [0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def read_card(model_dir: Path) -> ModelCard:
    """Read and validate ``model_dir/model.yaml``."""
    path = model_dir / CARD_FILE
    if not path.is_file():
        raise ModelCardError(f"{model_dir}: not a model directory ({CARD_FILE} is missing)")
    try:
        data = yaml.safe_load(path.read_text())
        return ModelCard.model_validate(data)
    except yaml.YAMLError as exc:
        raise ModelCardError(f"{path}: not valid YAML: {exc}") from exc
    except ValidationError as exc:
        raise ModelCardError(f"{path}: invalid model card:\n{exc}") from exc


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
