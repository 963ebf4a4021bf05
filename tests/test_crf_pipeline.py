"""The CRF stage in the pipeline: band by band equals one piece, follows the card, is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from geoseg.engine.job import segment
from geoseg.engine.scene import SegmentOptions, resolve_crf
from geoseg.errors import ConfigError
from geoseg.models.card import read_card


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def _run(inputs: list[str], model: Path, out: Path, **options: object) -> None:
    results = segment(inputs, model, out, SegmentOptions(progress=False, polygons=False, **options))  # type: ignore[arg-type]
    assert [r.status for r in results] == ["ok"] * len(inputs), [r.error for r in results]


def test_crf_in_bands_equals_crf_in_one_piece(
    ray_local: None, trained_aerial_model: Path, tmp_path: Path
) -> None:
    from conftest import AERIAL

    scene = str(AERIAL / "23322E759967N_clipped_1m_1of2.tif")  # 341 x 280
    _run([scene], trained_aerial_model, tmp_path / "plain", crf=False)
    _run([scene], trained_aerial_model, tmp_path / "bands", crf=True, crf_band_rows=24)
    _run([scene], trained_aerial_model, tmp_path / "whole", crf=True, crf_band_rows=4096)
    name = "23322E759967N_clipped_1m_1of2"
    banded, whole = tmp_path / "bands" / name, tmp_path / "whole" / name
    np.testing.assert_array_equal(_read(banded / "mask.tif"), _read(whole / "mask.tif"))
    np.testing.assert_array_equal(_read(banded / "confidence.tif"), _read(whole / "confidence.tif"))
    # The CRF did something (otherwise the equality above proves nothing).
    changed = (_read(whole / "mask.tif") != _read(tmp_path / "plain" / name / "mask.tif")).mean()
    assert changed > 0.001, changed
    run = json.loads((tmp_path / "bands" / "run.json").read_text())
    assert run["crf"]["iterations"] == 5 and run["crf"]["window"] == 7 and run["crf"]["halo"] == 15
    assert run["scenes"][0]["timings_s"]["crf_s"] > 0


def test_crf_follows_the_card_and_the_options(rgb_model: Path, tmp_path: Path) -> None:
    card = read_card(rgb_model)
    assert resolve_crf(card, SegmentOptions()) is None  # the card does not recommend it
    data = yaml.safe_load((rgb_model / "model.yaml").read_text())
    data["crf"] = {"recommended": True, "params": {"iterations": 3, "bilateral_weight": 2}}
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.yaml").write_text(yaml.safe_dump(data))
    card = read_card(model)
    params = resolve_crf(card, SegmentOptions())
    assert params is not None and params.iterations == 3 and params.bilateral_weight == 2.0
    assert params.halo == 9
    override = resolve_crf(card, SegmentOptions(crf_params={"window": 5}))
    assert override is not None and (override.iterations, override.window) == (3, 5)
    assert resolve_crf(card, SegmentOptions(crf=False)) is None
    with pytest.raises(ConfigError, match="unknown CRF parameters"):
        resolve_crf(card, SegmentOptions(crf_params={"sigma": 1}))
    with pytest.raises(ConfigError, match="window must be a positive odd"):
        resolve_crf(card, SegmentOptions(crf_params={"window": 4}))


def test_dense_reference_backend(
    ray_local: None, fixtures: dict[str, Path], rgb_model: Path, tmp_path: Path
) -> None:
    pytest.importorskip(
        "pydensecrf", reason="the dense backend needs pip install geoseg[crf-dense]"
    )
    _run([str(fixtures["good"])], rgb_model, tmp_path, crf=True, crf_backend="dense")
    mask = _read(tmp_path / "good" / "mask.tif")
    assert mask.shape == (200, 300) and (mask < 4).all()


def test_with_compile_the_actors_run_the_crf_compiled(
    ray_local: None, trained_aerial_model: Path, tmp_path: Path, compile_cache: Path
) -> None:
    """``--compile`` compiles the CRF's graphs too (two packages) and keeps the eager classes."""
    from conftest import AERIAL

    scene = str(AERIAL / "23322E759967N_clipped_1m_1of2.tif")  # 341 x 280
    name = "23322E759967N_clipped_1m_1of2"
    _run([scene], trained_aerial_model, tmp_path / "compiled", crf=False, compile=True)
    before = set(compile_cache.iterdir())
    _run([scene], trained_aerial_model, tmp_path / "compiled-crf", crf=True, compile=True)
    assert len(set(compile_cache.iterdir()) - before) == 2  # prepare and one iteration
    _run([scene], trained_aerial_model, tmp_path / "eager-crf", crf=True)
    compiled = _read(tmp_path / "compiled-crf" / name / "mask.tif")
    assert (compiled == _read(tmp_path / "eager-crf" / name / "mask.tif")).mean() >= 0.999
    # The CRF ran: it changed the compiled model's classes.
    assert (compiled != _read(tmp_path / "compiled" / name / "mask.tif")).mean() > 0.001
