"""The actor's CRF step (SegmentationWorker.refine, in process): a band's rows read by a Ray read
task, refined and classified where the CRF ran, give what the CRF of the whole band gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from geoseg.crf import CRFParams
from geoseg.crf_local import crf_refine
from geoseg.engine.actors import SegmentationWorker
from geoseg.engine.reads import read_rows
from geoseg.io.rasters import open_scene, read_tile
from geoseg.models.store import normalize
from geoseg.tiling.bands import Band
from geoseg.tiling.blend import classes_and_confidence


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ),
    ],
)
def test_refine_classifies_the_core_as_the_whole_band_crf_does(
    ray_local: None, rgb_model: Path, fixtures: dict[str, Path], device: str
) -> None:
    worker = SegmentationWorker(str(rgb_model), device, "fp32", threads=2)
    card = worker.card
    scene = open_scene(str(fixtures["good"]), card)  # 200 x 300, RGB
    context_row_off, rows, halo_top, core_rows = 40, 120, 20, 80
    pixels, read_s = ray.get(read_rows.remote(scene, context_row_off, rows))
    assert pixels.shape == (3, rows, 300) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, read_tile(scene, context_row_off, 0, rows, 300)[0])
    assert read_s > 0

    rng = np.random.default_rng(5)
    logits = torch.from_numpy(rng.normal(size=(4, rows // 10, 30)).astype(np.float32))
    smooth = torch.nn.functional.interpolate(logits[None], size=(rows, 300), mode="bilinear")[0]
    probs = torch.softmax(2 * smooth, dim=0).numpy().astype(np.float16)
    valid = np.ones((rows, 300), dtype=bool)
    valid[50:70, 100:160] = False  # nodata in the core
    band = Band(context_row_off + halo_top, core_rows, halo_top, probs, valid)

    ids, confidence, seconds = worker.refine(band, (pixels, 0.25), [0, 1, 2], CRFParams(), "local")

    core = slice(halo_top, halo_top + core_rows)
    # The reference: the CRF of the whole band on the same device, classified in numpy.
    features = normalize(torch.from_numpy(pixels)[None].to(device), card, [0, 1, 2])[0]
    refined = crf_refine(
        torch.from_numpy(probs).to(device).float(),
        features,
        torch.from_numpy(valid).to(device),
        CRFParams(),
    )[:, core]
    expected_ids, expected_confidence = classes_and_confidence(
        refined.cpu().numpy(), valid[core], 255, "uint8"
    )
    assert ids.dtype == np.uint8 and ids.shape == (core_rows, 300)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(confidence, expected_confidence)
    assert (ids[30:50, 100:160] == 255).all() and (confidence[30:50, 100:160] == 0).all()
    assert (confidence[valid[core]] >= 1).all()
    # The CRF changed classes (else the equality says little), and the read's seconds pass through.
    assert (ids != probs[:, core].argmax(0))[valid[core]].mean() > 0.01
    assert seconds["read_s"] == 0.25 and seconds["crf_s"] > 0
