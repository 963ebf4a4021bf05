"""Model directories: create (``model init``), load safely, describe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from geoseg.errors import ModelCardError, OutputExistsError
from geoseg.models.card import (
    CARD_FILE,
    DEFAULT_COLORS,
    WEIGHTS_FILE,
    ClassInfo,
    ModelCard,
    Normalization,
    file_sha256,
    read_card,
)
from geoseg.models.dynamicworld import normalize_dynamicworld
from geoseg.models.registry import build_model, total_stride

# Per input dtype: scaling to about [0, 1] when the user gives none (uint16: reflectance x 10000).
DEFAULT_SCALE = {"uint8": 1 / 255, "uint16": 1 / 10000, "int16": 1 / 10000, "float32": 1.0}


def build_from_card(card: ModelCard) -> nn.Module:
    return build_model(card.arch, len(card.bands), card.num_classes, **card.arch_args)


def load_model(model_dir: Path) -> tuple[ModelCard, nn.Module, str]:
    """Card, model in eval mode with its weights, and the weights' sha256.

    Weights are read with safetensors only (no pickle, so no code can run from a weights file).
    """
    card = read_card(model_dir)
    weights_path = model_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelCardError(f"{model_dir}: {WEIGHTS_FILE} is missing")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ModelCardError(
            f"{weights_path}: not a readable safetensors file ({exc}); geoseg never unpickles "
            "weights: convert them with safetensors.torch.save_file"
        ) from exc
    model = build_from_card(card)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelCardError(
            f"{weights_path}: weights do not fit arch {card.arch!r} with {card.arch_args}: {exc}"
        ) from exc
    model.eval()
    return card, model, file_sha256(weights_path)


def save_model(model: nn.Module, card: ModelCard, out: Path, overwrite: bool = False) -> None:
    """Write ``out/model.yaml`` and ``out/weights.safetensors`` (each via a temporary name)."""
    if (out / CARD_FILE).exists() and not overwrite:
        raise OutputExistsError(f"{out}: a model exists already; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    tmp_weights = out / f".{WEIGHTS_FILE}.tmp"
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_weights))
    tmp_card = out / f".{CARD_FILE}.tmp"
    tmp_card.write_text(card.to_yaml())
    tmp_weights.replace(out / WEIGHTS_FILE)
    tmp_card.replace(out / CARD_FILE)


def init_model(
    arch: str,
    bands: list[str],
    classes: list[str],
    out: Path,
    *,
    input_dtype: str = "uint8",
    arch_args: dict[str, Any] | None = None,
    tile_size: int = 512,
    overlap: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> ModelCard:
    """Create a model directory with freshly initialised (seeded) weights."""
    arch_args = dict(arch_args or {})
    stride = total_stride(arch, **arch_args)
    card = ModelCard(
        name=out.name,
        arch=arch,
        arch_args=arch_args,
        total_stride=stride,
        bands=bands,
        input_dtypes=[input_dtype],
        normalization=Normalization(scale=[DEFAULT_SCALE.get(input_dtype, 1.0)]),
        classes=[
            ClassInfo(id=i, name=name, color=DEFAULT_COLORS[i % len(DEFAULT_COLORS)])
            for i, name in enumerate(classes)
        ],
        tile_size=tile_size,
        overlap=overlap,
    )
    torch.manual_seed(seed)
    save_model(build_from_card(card), card, out, overwrite=overwrite)
    return card


def normalize(x: torch.Tensor, card: ModelCard, bands: list[int] | None = None) -> torch.Tensor:
    """Raw pixel values ``(B, bands, H, W)`` to model input, per the card's normalisation; only
    the card's bands at positions ``bands`` (in that order) when given."""
    if card.normalization.named == "dynamicworld":
        named = normalize_dynamicworld(x)
        return named if bands is None else named[:, bands]
    params = card.normalization.per_band(len(card.bands))
    kept = list(range(len(card.bands))) if bands is None else bands

    def vec(key: str) -> torch.Tensor:
        values = [params[key][i] for i in kept]
        return torch.tensor(values, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)

    if bands is not None:
        x = x[:, bands]
    # ((x scale + offset) - mean) / std in place on one new array, in that order (a model's
    # numbers depend on it): four new arrays took a CRF band's features 0.09 s on one core.
    y = x.to(torch.float32, copy=True)
    return y.mul_(vec("scale")).add_(vec("offset")).sub_(vec("mean")).div_(vec("std"))
