"""The polygons of a mask made while it is written (PolygonStream) equal those of the finished mask.

Real files: the mask goes through geoseg's own COG writer, whose block rows feed the stream, and
the reference polygonises the COG it wrote, as a run did before streaming.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import shapely
from test_vectors_io import blob_mask, card, finished_mask_layer, make_geoseg_scene

from geoseg.engine.scene import PolygonStream, SegmentOptions
from geoseg.errors import InputError
from geoseg.io.cog import BLOCK, ClassRasterWriter
from geoseg.measure import Quantity
from geoseg.vectorize import PolygonLayer

NODATA = 255
OPTIONS = SegmentOptions(simplify=Quantity(1.0, "px"), min_area=Quantity(4.0, "px"))


def _layers_equal(a: PolygonLayer, b: PolygonLayer) -> None:
    assert len(a) == len(b) > 100
    np.testing.assert_array_equal(a.class_ids, b.class_ids)
    np.testing.assert_array_equal(a.pixel_counts, b.pixel_counts)
    np.testing.assert_array_equal(a.confidence_mean, b.confidence_mean)
    np.testing.assert_array_equal(a.area_m2, b.area_m2)
    assert shapely.equals_exact(a.geometries, b.geometries, tolerance=0).all()


def test_block_rows_written_out_of_order_give_the_finished_masks_polygons(
    tmp_path: Path,
) -> None:
    # 1,300 rows: block rows of 512, 512 and 276, written bottom first and in column pieces, as
    # tiles finish them; a backlog of 1 makes the writer wait for the thread at every row.
    _, scene = make_geoseg_scene(tmp_path / "ref", h=1300, w=700)
    reference = finished_mask_layer(tmp_path / "ref", scene, OPTIONS)

    mask = blob_mask(1300, 700)
    confidence = np.where(
        mask == NODATA, 0, np.random.default_rng(1).integers(64, 256, mask.shape)
    ).astype(np.uint8)
    stream = PolygonStream(scene, NODATA, OPTIONS, with_confidence=True, backlog=1)
    out = tmp_path / "streamed"
    out.mkdir()
    writer = ClassRasterWriter(out, scene, card().classes, confidence=True, on_block_row=stream.add)
    for rows in (slice(1024, 1300), slice(0, 300), slice(300, 512), slice(512, 1024)):
        for cols in (slice(350, 700), slice(0, 350)):
            writer.write(rows.start, cols.start, mask[rows, cols], confidence[rows, cols])
    writer.close_streams()
    _layers_equal(stream.result(), reference)
    # The stream was fed the very pixels the COG holds.
    writer.write_cogs()
    _layers_equal(finished_mask_layer(out, scene, OPTIONS), reference)


def test_a_stopped_stream_ends_without_polygons_and_never_blocks_the_writer(
    tmp_path: Path,
) -> None:
    _, scene = make_geoseg_scene(tmp_path, h=1300, w=300)
    stream = PolygonStream(scene, NODATA, OPTIONS, with_confidence=False, backlog=1)
    strip = np.zeros((BLOCK, 300), np.uint8)
    stream.add(512, strip, None)  # ahead of the missing first row: returns at once
    stream.stop()
    for row_off in (0, 1024):  # after stop nothing waits
        stream.add(row_off, strip, None)
    with pytest.raises(RuntimeError, match="stopped before its last row"):
        stream.result()
    assert not any(t.name == "geoseg-polygons" and t.is_alive() for t in threading.enumerate())


def test_a_failing_stream_hands_its_error_to_result_and_frees_the_writer(tmp_path: Path) -> None:
    # Promised confidence that never comes: vectorize_strips refuses the first strip.
    _, scene = make_geoseg_scene(tmp_path, h=1300, w=300)
    stream = PolygonStream(scene, NODATA, OPTIONS, with_confidence=True, backlog=1)
    strip = np.zeros((BLOCK, 300), np.uint8)
    for row_off in (0, 512, 1024):  # the thread dies at the first; the writer must not wait
        stream.add(row_off, strip[: min(BLOCK, 1300 - row_off)], None)
    with pytest.raises(InputError, match="row_off=0 has no confidence"):
        stream.result()


def test_result_refuses_a_mask_whose_rows_did_not_all_arrive(tmp_path: Path) -> None:
    _, scene = make_geoseg_scene(tmp_path, h=1300, w=300)
    stream = PolygonStream(scene, NODATA, OPTIONS, with_confidence=False)
    stream.add(0, np.zeros((BLOCK, 300), np.uint8), None)
    with pytest.raises(RuntimeError, match="only 512 of the mask's 1300 rows"):
        stream.result()
    assert not any(t.name == "geoseg-polygons" and t.is_alive() for t in threading.enumerate())
