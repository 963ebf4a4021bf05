"""``geoseg evaluate``: score a predicted class raster against labels on its grid.

Files are read through :mod:`geoseg.io.labels`; scoring is :mod:`geoseg.metrics`. The mask and
the labels are held whole (evaluation rasters are label-sized, not scene-sized).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from geoseg.errors import InputError
from geoseg.io.labels import UNLABELLED, is_vector, read_class_mask, read_labels
from geoseg.metrics import score, scores_dict

log = logging.getLogger(__name__)


def evaluate_mask(
    pred: Path,
    labels: str | Path,
    *,
    classes: Sequence[str] | None = None,
    label_field: str | None = None,
    label_map: Mapping[int, int] | None = None,
    boundary_tolerance: int = 2,
) -> dict[str, Any]:
    """Scores of class raster ``pred`` against ``labels`` as a JSON-ready dict.

    Class names: the mask's ``CLASS_NAMES`` tag (geoseg writes it), else ``classes``, else
    ``class_<id>`` up to the largest id seen. Vector labels are burnt with each ``label_field``
    value at the id of the same-named class (other values unlabelled); raster labels are ids
    (after ``label_map``). Prediction nodata and unlabelled pixels are left out.
    """
    mask = read_class_mask(pred)
    if mask.names:
        names = [mask.names.get(i, f"class_{i}") for i in range(max(mask.names) + 1)]
        if classes is not None and list(classes) != names:
            log.warning(
                "%s carries class names %s; --classes %s is ignored", pred, names, list(classes)
            )
    elif classes is not None:
        names = list(classes)
    else:
        if is_vector(labels):
            raise InputError(
                f"{pred} carries no class names: give --classes to map the vector labels to ids"
            )
        valid = mask.ids[mask.ids != mask.nodata]
        top = max(
            int(valid.max()) if valid.size else 0,
            max(label_map.values(), default=0) if label_map else 0,
        )
        names = [f"class_{i}" for i in range(min(top + 1, UNLABELLED))]
    truth = read_labels(labels, mask.grid, names, field=label_field, label_map=label_map)
    scores = score(
        mask.ids,
        truth,
        len(names),
        ignore=UNLABELLED,
        nodata=mask.nodata,
        boundary_tolerance=boundary_tolerance,
    )
    return {
        "pred": str(pred),
        "labels": str(labels),
        "label_field": label_field,
        "boundary_tolerance": boundary_tolerance,
        **scores_dict(scores, names),
    }


def format_table(result: Mapping[str, Any]) -> str:
    """A readable table: one row per class (IoU, label and predicted pixels), then the totals."""

    def show(value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else f"{value:.3f}"

    names: list[str] = result["classes"]
    width = max([len("class"), *(len(n) for n in names)])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'label px':>10}  {'pred px':>10}"]
    for name in names:
        lines.append(
            f"{name:<{width}}  {show(result['iou'][name]):>6}  "
            f"{result['label_pixels'][name]:>10}  {result['pred_pixels'][name]:>10}"
        )
    lines.append(
        f"mIoU {show(result['miou'])}   overall accuracy {show(result['overall_accuracy'])}   "
        f"boundary F1 ({result['boundary_tolerance']} px) {show(result['boundary_f1'])}   "
        f"pixels scored {result['pixels']}"
    )
    return "\n".join(lines)


__all__ = ["evaluate_mask", "format_table"]
