"""Shared fixtures: a real local Ray, real shared data, generated rasters, real (small) models."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio

sys.path.insert(0, str(Path(__file__).parent / "data"))

from make_fixtures import make_all
from s3server import s3_endpoint  # noqa: F401  (fixture shared by S3 tests)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
AERIAL = SHARED / "aerial-new-brunswick"
AERIAL_CLASSES = ["Building", "Hydro", "Road", "Train", "Vegetation"]


def shared(relative: str) -> Path:
    """A file of ../shared/data, or skip with the reason when the folder is absent."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"shared data {path} is not available")
    return path


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Compiled model packages of this session (never the user's cache); set before Ray starts,
    so that actors and CLI subprocesses inherit it."""
    from geoseg.engine.aot import CACHE_ENV

    path = tmp_path_factory.mktemp("compiled")
    os.environ[CACHE_ENV] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One embedded local Ray for the whole session (as `geoseg segment` starts it)."""
    import ray

    from geoseg.engine.runtime import start_ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    start_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_all(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture(scope="session")
def rgb_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly initialised small U-Net on red,green,blue uint8 with four classes."""
    from geoseg.models.store import init_model

    out = tmp_path_factory.mktemp("models") / "rgb"
    init_model(
        "unet",
        ["red", "green", "blue"],
        ["water", "vegetation", "built", "bare"],
        out,
        arch_args={"depth": 3, "base_channels": 8},
        tile_size=128,
        overlap=32,
    )
    return out


def rasterize_aerial_labels(image_path: Path) -> np.ndarray:
    """New Brunswick polygons (field Niveau_2) burnt onto the image grid; 255 = unlabelled."""
    import geopandas as gpd
    from rasterio.features import rasterize

    polygons = gpd.read_file(AERIAL / "BakerLake_2017_clipped.gpkg")
    with rasterio.open(image_path) as src:
        return rasterize(
            [
                (g, AERIAL_CLASSES.index(c))
                for g, c in zip(polygons.geometry, polygons.Niveau_2, strict=True)
            ],
            out_shape=src.shape,
            transform=src.transform,
            fill=255,
            dtype="uint8",
        )


@pytest.fixture(scope="session")
def trained_aerial_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small U-Net trained briefly on a real aerial tile and its real polygon labels.

    A random network's argmax is near-ties everywhere, so seam and grid tests need a model whose
    decisions are stable (see field notes).
    """
    import torch

    from geoseg.models.store import init_model, load_model, save_model
    from geoseg.training import fit

    image_path = shared("aerial-new-brunswick/23322E759967N_clipped_1m_2of2.tif")
    with rasterio.open(image_path) as src:
        image = src.read()
    labels = rasterize_aerial_labels(image_path)
    out = tmp_path_factory.mktemp("models") / "aerial"
    init_model(
        "unet",
        ["red", "green", "blue"],
        AERIAL_CLASSES,
        out,
        arch_args={"depth": 3, "base_channels": 8},
        tile_size=128,
        overlap=32,
    )
    card, model, _ = load_model(out)
    torch.set_num_threads(2)
    fit(model, card, image, labels, steps=120, crop=64, batch_size=8)
    save_model(model, card, out, overwrite=True)
    return out
