"""The stitched result must not depend on the tile grid (with a trained model, on real imagery)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import AERIAL

from geoseg.engine.job import segment
from geoseg.engine.scene import SegmentOptions

SCENES = ["23322E759967N_clipped_1m_1of2", "23322E759967N_clipped_1m_2of2"]


def _masks(model: Path, out: Path, tile_size: int, overlap: int) -> list[np.ndarray]:
    inputs = [str(AERIAL / f"{name}.tif") for name in SCENES]
    options = SegmentOptions(tile_size=tile_size, overlap=overlap, polygons=False, progress=False)
    results = segment(inputs, model, out, options)
    assert [r.status for r in results] == ["ok", "ok"]
    assert all(r.tiles > 1 for r in results) or tile_size >= 512
    masks = []
    for name in SCENES:
        with rasterio.open(out / name / "mask.tif") as src:
            masks.append(src.read(1))
    return masks


def test_two_grids_and_a_whole_image_pass_agree(
    ray_local: None, trained_aerial_model: Path, tmp_path: Path
) -> None:
    whole = _masks(trained_aerial_model, tmp_path / "whole", 512, 64)  # one tile per image
    grid_a = _masks(trained_aerial_model, tmp_path / "a", 160, 64)
    grid_b = _masks(trained_aerial_model, tmp_path / "b", 192, 64)
    for mask_whole, mask_a, mask_b in zip(whole, grid_a, grid_b, strict=True):
        valid = mask_whole != 255
        assert valid.all()  # these tiles have no nodata
        # The model really decides (not one class everywhere): the test would be vacuous otherwise.
        shares = np.bincount(mask_whole.ravel()) / mask_whole.size
        assert (shares >= 0.05).sum() >= 2, shares
        agree_ab = float((mask_a == mask_b)[valid].mean())
        agree_whole = float((mask_a == mask_whole)[valid].mean())
        print(f"agreement: grids {agree_ab:.5f}, grid vs whole {agree_whole:.5f}")
        assert agree_ab >= 0.999, agree_ab
        assert agree_whole >= 0.999, agree_whole


@pytest.mark.parametrize("overlap", [0])
def test_no_overlap_shows_seams_the_blend_removes(
    ray_local: None, trained_aerial_model: Path, tmp_path: Path, overlap: int
) -> None:
    """Control: without overlap the tile edges do disagree, so the test above measures blending."""
    whole = _masks(trained_aerial_model, tmp_path / "whole", 512, 64)
    seamy = _masks(trained_aerial_model, tmp_path / "seamy", 64, overlap)
    disagree = sum(int((w != s).sum()) for w, s in zip(whole, seamy, strict=True))
    assert disagree > 0
