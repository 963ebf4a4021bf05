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

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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


def _counts(
    prediction: NDArray[np.integer],
    labels: NDArray[np.integer],
    num_classes: int,
    ignore: int | None,
    nodata: int | None,
    boundary_tolerance: int,
) -> tuple[NDArray[np.int64], tuple[int, int, int, int]]:
    """Confusion matrix and boundary counts (pred hits, pred edges, label hits, label edges)."""
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
    counts = (
        int((pred_edges & near_label).sum()),
        int(pred_edges.sum()),
        int((label_edges & near_pred).sum()),
        int(label_edges.sum()),
    )
    return confusion, counts


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
    return score_many(
        [(prediction, labels)],
        num_classes,
        ignore=ignore,
        nodata=nodata,
        boundary_tolerance=boundary_tolerance,
    )


def score_many(
    pairs: Iterable[tuple[NDArray[np.integer], NDArray[np.integer]]],
    num_classes: int,
    *,
    ignore: int | None = None,
    nodata: int | None = None,
    boundary_tolerance: int = 2,
) -> Scores:
    """Score several ``(prediction, labels)`` maps as one: confusion matrices and boundary pixel
    counts are summed (so a large map weighs more), boundaries never cross from map to map."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    totals = np.zeros(4, dtype=np.int64)
    for prediction, labels in pairs:
        c, counts = _counts(prediction, labels, num_classes, ignore, nodata, boundary_tolerance)
        confusion += c
        totals += counts
    hit_pred, n_pred, hit_label, n_label = (int(v) for v in totals)
    precision = hit_pred / n_pred if n_pred else 1.0
    recall = hit_label / n_label if n_label else 1.0
    return Scores(confusion, precision, recall)


def majority_baseline(
    labels: Iterable[NDArray[np.integer]],
    majority: int,
    num_classes: int,
    *,
    ignore: int | None = None,
    boundary_tolerance: int = 2,
) -> Scores:
    """Scores of predicting class ``majority`` everywhere (the floor a trained model must beat)."""
    return score_many(
        ((np.full(y.shape, majority, dtype=np.int64), y) for y in labels),
        num_classes,
        ignore=ignore,
        boundary_tolerance=boundary_tolerance,
    )


def scores_dict(scores: Scores, class_names: Sequence[str]) -> dict[str, Any]:
    """JSON-ready scores: confusion matrix (rows = labels), per-class IoU and pixel counts
    (NaN IoU -> null), mIoU, overall accuracy, boundary precision, recall and F1."""

    def num(value: float) -> float | None:
        return None if math.isnan(value) else float(value)

    iou = scores.iou
    return {
        "classes": list(class_names),
        "confusion": scores.confusion.tolist(),
        "iou": {name: num(float(iou[i])) for i, name in enumerate(class_names)},
        "label_pixels": {
            n: int(v) for n, v in zip(class_names, scores.confusion.sum(1), strict=True)
        },
        "pred_pixels": {
            n: int(v) for n, v in zip(class_names, scores.confusion.sum(0), strict=True)
        },
        "miou": num(scores.miou) if not np.all(np.isnan(iou)) else None,
        "overall_accuracy": num(scores.overall_accuracy),
        "boundary_precision": scores.boundary_precision,
        "boundary_recall": scores.boundary_recall,
        "boundary_f1": scores.boundary_f1,
        "pixels": int(scores.confusion.sum()),
    }
