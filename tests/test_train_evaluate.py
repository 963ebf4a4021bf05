"""`geoseg train` and `geoseg evaluate`: label rasterisation, spatial split, and the real loop
(train on one New Brunswick aerial tile, segment the other, evaluate against the polygons)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import AERIAL_CLASSES, rasterize_aerial_labels, shared
from rasterio.crs import CRS
from rasterio.warp import transform_geom
from shapely.geometry import box, mapping, shape

from geoseg.io.labels import UNLABELLED, Grid, read_labels
from geoseg.metrics import majority_baseline
from geoseg.models.store import load_model
from geoseg.training import (
    assign_validation_blocks,
    crop_positions,
    dilate,
    expand_blocks,
    split_image,
)

UTM = CRS.from_epsg(32633)


def _geoseg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "geoseg", "-q", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_ADDRESS": ""},
    )


def test_vector_labels_in_another_crs_land_on_their_pixels(tmp_path: Path) -> None:
    # A 10 m UTM grid; polygons drawn on pixel edges in UTM, stored in lon/lat.
    grid = Grid(40, 50, Affine(10, 0, 500_000, 0, -10, 5_000_400), UTM.to_wkt())
    t = grid.transform
    a = box(t.c + 5 * 10, t.f - 20 * 10, t.c + 15 * 10, t.f - 10 * 10)  # rows 10-19, cols 5-14
    b = box(t.c + 30 * 10, t.f - 35 * 10, t.c + 40 * 10, t.f - 30 * 10)  # rows 30-34, cols 30-39
    c = box(t.c, t.f - 5 * 10, t.c + 5 * 10, t.f)  # a class not listed: stays unlabelled
    lonlat = [shape(transform_geom(UTM, "EPSG:4326", mapping(g))) for g in (a, b, c)]
    path = tmp_path / "labels.gpkg"
    gpd.GeoDataFrame({"kind": ["water", "built", "cloud"]}, geometry=lonlat, crs=4326).to_file(path)

    labels = read_labels(path, grid, ["built", "water"], field="kind")

    expected = np.full((40, 50), UNLABELLED, dtype=np.uint8)
    expected[10:20, 5:15] = 1
    expected[30:35, 30:40] = 0
    np.testing.assert_array_equal(labels, expected)


def test_raster_labels_read_in_the_image_window_and_remapped(tmp_path: Path) -> None:
    # One labels raster larger than the image: read over the image's window, values remapped.
    values = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30) % 10
    path = tmp_path / "lulc.tif"
    transform = Affine(10, 0, 1000, 0, -10, 2000)
    profile = {"driver": "GTiff", "height": 20, "width": 30, "count": 1, "dtype": "uint8"}
    with rasterio.open(path, "w", **profile, crs=UTM, transform=transform, nodata=0) as dst:
        dst.write(values, 1)
    grid = Grid(8, 12, transform @ Affine.translation(5, 4), UTM.to_wkt())

    labels = read_labels(path, grid, ["a", "b"], label_map={1: 0, 8: 1})

    window = values[4:12, 5:17]
    expected = np.select([window == 1, window == 8], [0, 1], UNLABELLED)
    np.testing.assert_array_equal(labels, expected)


def test_spatial_split_is_disjoint_with_the_requested_fraction() -> None:
    block, margin, crop = 16, 8, 16
    transform = Affine(10, 0, 0, 0, -10, 0)
    grid = Grid(128, 160, transform, UTM.to_wkt())
    same_place = Grid(128, 160, transform, UTM.to_wkt())  # a second date of the same place
    labelled = np.ones((128, 160), dtype=bool)

    val_blocks = assign_validation_blocks([grid, same_place], [labelled, labelled], block, 0.25, 3)

    assert val_blocks[0].shape == (8, 10)
    assert val_blocks[0].sum() == 20  # 25% of 80 blocks
    # A place is validation on every date or on none.
    np.testing.assert_array_equal(val_blocks[0], val_blocks[1])
    # Another seed draws other blocks; the same seed the same ones.
    other = assign_validation_blocks([grid], [labelled], block, 0.25, 4)[0]
    assert not np.array_equal(other, val_blocks[0])
    again = assign_validation_blocks([grid], [labelled], block, 0.25, 3)[0]
    np.testing.assert_array_equal(again, val_blocks[0])

    split = split_image(val_blocks[0], block, (128, 160), margin)
    np.testing.assert_array_equal(split.val, expand_blocks(val_blocks[0], block, (128, 160)))
    assert not (split.train & dilate(split.val, margin)).any()  # margin kept free
    assert (split.train | dilate(split.val, margin)).all()
    positions = crop_positions(labelled & split.train, split.val, crop)
    assert len(positions) > 0
    for r, c in positions:
        assert not split.val[r : r + crop, c : c + crop].any()


def test_split_only_draws_labelled_blocks() -> None:
    grid = Grid(64, 64, Affine(1, 0, 0, 0, -1, 0), UTM.to_wkt())
    labelled = np.zeros((64, 64), dtype=bool)
    labelled[:16, :32] = True  # 2 labelled blocks of 16
    val = assign_validation_blocks([grid], [labelled], 16, 0.5, 0)[0]
    assert val.sum() == 1
    assert val[0, :2].sum() == 1


def test_train_segment_evaluate_new_brunswick(tmp_path: Path) -> None:
    train_tile = shared("aerial-new-brunswick/23322E759967N_clipped_1m_2of2.tif")
    test_tile = shared("aerial-new-brunswick/23322E759967N_clipped_1m_1of2.tif")
    polygons = shared("aerial-new-brunswick/BakerLake_2017_clipped.gpkg")
    model_dir = tmp_path / "unet"
    classes = ",".join(AERIAL_CLASSES)
    proc = _geoseg(
        "train", "--images", str(train_tile), "--labels", str(polygons),
        "--label-field", "Niveau_2", "--classes", classes, "--arch", "unet",
        "--arch-arg", "depth=3", "--arch-arg", "base_channels=8",
        "--steps", "60", "--crop", "64", "--block", "128", "--device", "cpu",
        "--out", str(model_dir),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr

    card, _, _ = load_model(model_dir)
    assert card.bands == ["red", "green", "blue"] and card.input_dtypes == ["uint8"]
    assert [c.name for c in card.classes] == AERIAL_CLASSES
    assert len(card.normalization.mean) == 3  # per-band mean/std of the training pixels
    log = json.loads((model_dir / "train_log.json").read_text())
    assert len(log["loss"]) == 60 and log["train_seconds"] > 0
    assert np.mean(log["loss"][-10:]) < np.mean(log["loss"][:10])

    split = json.loads((model_dir / "split.json").read_text())
    (image,) = split["images"]
    val = {tuple(b) for b in image["val_blocks"]}
    trained = {tuple(b) for b in image["train_blocks"]}
    assert val and trained and not val & trained
    assert len(val | trained) == image["block_rows"] * image["block_cols"]

    metrics = json.loads((model_dir / "metrics.json").read_text())
    v, base = metrics["validation"], metrics["majority_baseline"]
    assert {"confusion", "iou", "miou", "overall_accuracy", "boundary_f1"} <= set(v)
    assert np.array(v["confusion"]).shape == (5, 5)
    assert v["miou"] > base["miou"] + 0.05, (v, base)

    out = tmp_path / "seg"
    proc = _geoseg("segment", str(test_tile), "--model", str(model_dir), "--out", str(out),
                   "--no-polygons")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    mask = out / test_tile.stem / "mask.tif"
    scores_path = tmp_path / "scores.json"
    proc = _geoseg("evaluate", "--pred", str(mask), "--labels", str(polygons),
                   "--label-field", "Niveau_2", "--json", str(scores_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "mIoU" in proc.stdout and "Hydro" in proc.stdout
    scores = json.loads(scores_path.read_text())
    assert scores["classes"] == AERIAL_CLASSES
    assert 0 <= scores["boundary_f1"] <= 1 and 0 <= scores["overall_accuracy"] <= 1

    # The floor: the training tile's majority class predicted everywhere on the test tile.
    train_labels = rasterize_aerial_labels(train_tile)
    majority = int(np.argmax(np.bincount(train_labels[train_labels != 255], minlength=5)))
    floor = majority_baseline([rasterize_aerial_labels(test_tile)], majority, 5, ignore=255)
    assert scores["pixels"] == int(floor.confusion.sum())
    assert scores["miou"] > floor.miou + 0.05, (scores["miou"], floor.miou)


def test_evaluate_maps_vector_classes_to_the_mask_ids_by_name(tmp_path: Path) -> None:
    from geoseg.evaluate import evaluate_mask, format_table

    transform = Affine(1, 0, 0, 0, -1, 20)
    pred = np.zeros((20, 20), dtype=np.uint8)  # "water" everywhere ...
    pred[:, 10:] = 1  # ... "built" on the right half
    pred[0, 0] = 255  # nodata: never scored
    path = tmp_path / "mask.tif"
    profile = {"driver": "GTiff", "height": 20, "width": 20, "count": 1, "dtype": "uint8"}
    with rasterio.open(path, "w", **profile, crs=UTM, transform=transform, nodata=255) as dst:
        dst.write(pred, 1)
        dst.update_tags(CLASS_NAMES=json.dumps({0: "water", 1: "built"}))
    # Labels: "built" over columns 5-19 (all rows), in another class order than the mask's.
    polygons = tmp_path / "truth.gpkg"
    gpd.GeoDataFrame({"kind": ["built", "water"]}, geometry=[box(5, 0, 20, 20), box(0, 0, 5, 20)],
                     crs=UTM).to_file(polygons)  # fmt: skip

    result = evaluate_mask(path, polygons, label_field="kind", classes=["built", "water"])

    assert result["classes"] == ["water", "built"]
    # Rows = labels: water (cols 0-4, less the nodata pixel) all right; built cols 5-9 wrong.
    assert result["confusion"] == [[99, 0], [100, 200]]
    assert result["iou"]["built"] == 200 / 300
    assert result["pixels"] == 399
    assert "built" in format_table(result)


def test_balanced_weights_lift_rare_classes() -> None:
    from geoseg.training import balanced_weights

    w = balanced_weights(np.array([900, 100, 0]))
    assert w[2] == 0 and w[1] == pytest.approx(3 * w[0])
    assert 0.9 * w[0] + 0.1 * w[1] == pytest.approx(1.0)
