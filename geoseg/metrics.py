"""Segmentation quality metrics (pure): confusion matrix, IoU, accuracy, boundary F1.

Pixels whose label is ``ignore`` (unlabelled) or whose prediction is ``nodata`` are left out of
every metric.

Boundary F1 (Csurka et al. 2013, "What is a good evaluation measure for semantic segmentation?"):
a pixel is a boundary pixel when one of its 4-neighbours holds another class. With ``B_p`` and
``B_l`` the boundary pixels of prediction and labels, and ``D_t(B)`` the pixels within Chebyshev
distance ``t`` of ``B``::

    precision = |B_p ∩ D_t(B_l)| / |B_p|      recall = |B_l ∩ D_t(B_p)| / |B_l|
    BF        = 2 precision recall / (precision + recall)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Scores:
    """Scores of one prediction against labels over ``num_classes`` classes."""

    confusion: NDArray[np.int64]  # [label, prediction]
    boundary_precision: float
    boundary_recall: float

    @property
    def iou(self) -> NDArray[np.float64]:
        """Per-class IoU; NaN for classes absent from both labels and prediction."""
        tp = np.diag(self.confusion).astype(np.float64)
        union = self.confusion.sum(0) + self.confusion.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    @property
    def miou(self) -> float:
        """Mean IoU over the classes present in labels or prediction."""
        return float(np.nanmean(self.iou))

    @property
    def overall_accuracy(self) -> float:
        total = self.confusion.sum()
        return float(np.trace(self.confusion) / total) if total else float("nan")

    @property
    def boundary_f1(self) -> float:
        p, r = self.boundary_precision, self.boundary_recall
        return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _boundaries(classes: NDArray[np.integer], valid: NDArray[np.bool_]) -> NDArray[np.bool_]:
    edge = np.zeros(classes.shape, dtype=bool)
    for axis in (0, 1):
        a = np.moveaxis(classes, axis, 0)
        v = np.moveaxis(valid, axis, 0)
        differs = (a[1:] != a[:-1]) & v[1:] & v[:-1]
        e = np.moveaxis(edge, axis, 0)
        e[1:] |= differs
        e[:-1] |= differs
    return edge & valid


def _dilate(mask: NDArray[np.bool_], radius: int) -> NDArray[np.bool_]:
    """Binary dilation by a (2 radius + 1)² square, separable, without scipy."""
    out = mask.copy()
    for axis in (0, 1):
        grown = out.copy()
        view = np.moveaxis(grown, axis, 0)
        src = np.moveaxis(out, axis, 0)
        for shift in range(1, radius + 1):
            view[shift:] |= src[:-shift]
            view[:-shift] |= src[shift:]
        out = grown
    return out


def score(
    prediction: NDArray[np.integer],
    labels: NDArray[np.integer],
    num_classes: int,
    *,
    ignore: int | None = None,
    nodata: int | None = None,
    boundary_tolerance: int = 2,
) -> Scores:
    """Score a class map against labels of the same shape (class ids ``0..num_classes-1``)."""
    if prediction.shape != labels.shape:
        raise ValueError(f"prediction {prediction.shape} and labels {labels.shape} differ in shape")
    valid = np.ones(labels.shape, dtype=bool)
    if ignore is not None:
        valid &= labels != ignore
    if nodata is not None:
        valid &= prediction != nodata
    valid &= (labels >= 0) & (labels < num_classes)
    valid &= (prediction >= 0) & (prediction < num_classes)
    pairs = labels[valid].astype(np.int64) * num_classes + prediction[valid].astype(np.int64)
    confusion = np.bincount(pairs, minlength=num_classes**2).reshape(num_classes, num_classes)
    pred_edges = _boundaries(prediction, valid)
    label_edges = _boundaries(labels, valid)
    near_label = _dilate(label_edges, boundary_tolerance)
    near_pred = _dilate(pred_edges, boundary_tolerance)
    n_pred, n_label = int(pred_edges.sum()), int(label_edges.sum())
    precision = float((pred_edges & near_label).sum() / n_pred) if n_pred else 1.0
    recall = float((label_edges & near_pred).sum() / n_label) if n_label else 1.0
    return Scores(confusion, precision, recall)
