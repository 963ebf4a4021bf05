"""Metrics: exact numbers on hand-made maps."""

from __future__ import annotations

import numpy as np
import pytest

from geoseg.metrics import score


def test_iou_accuracy_and_ignored_pixels() -> None:
    labels = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 2, 2]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [2, 2, 2, 9]])
    s = score(pred, labels, 3, ignore=255, nodata=9)
    # Valid: 9 pixels (2 unlabelled, 1 nodata left out); one class-0 pixel predicted as 1.
    assert s.confusion.sum() == 9
    assert s.confusion.tolist() == [[3, 1, 0], [0, 4, 0], [0, 0, 1]]
    np.testing.assert_allclose(s.iou, [3 / 4, 4 / 5, 1.0])
    assert s.miou == pytest.approx((0.75 + 0.8 + 1.0) / 3)
    assert s.overall_accuracy == pytest.approx(8 / 9)


def test_boundary_f1_tolerance() -> None:
    labels = np.zeros((20, 20), dtype=np.uint8)
    labels[:, 10:] = 1
    shifted = np.zeros_like(labels)
    shifted[:, 12:] = 1  # the edge two columns off
    assert score(labels, labels, 2).boundary_f1 == 1.0
    assert score(shifted, labels, 2, boundary_tolerance=2).boundary_f1 == pytest.approx(1.0)
    assert score(shifted, labels, 2, boundary_tolerance=0).boundary_f1 == 0.0
    s = score(shifted, labels, 2, boundary_tolerance=1)
    # Prediction edge columns 11, 12 vs label edge columns 9, 10: only 11 (pred) and 10 (label)
    # are within one pixel of the other's edge.
    assert (s.boundary_precision, s.boundary_recall) == (0.5, 0.5)
