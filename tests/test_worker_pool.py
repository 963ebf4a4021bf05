"""How many GPUs the model actors ask Ray for (a request no node can meet waits forever)."""

from __future__ import annotations

import pytest

from geoseg.engine.scene import gpu_share


@pytest.mark.parametrize(
    ("gpus", "workers", "per_worker", "expected"),
    [
        (1.0, 1, 1.0, 1.0),  # one actor per GPU: the request as configured
        (4.0, 2, 1.0, 1.0),  # room to spare: not grown
        (1.0, 3, 0.25, 0.25),  # fractions that fit: kept
        (1.0, 2, 1.0, 0.5),  # --workers 2 on one GPU: they share it
        (1.0, 3, 0.5, 1 / 3),
        (2.0, 4, 1.0, 0.5),
        (3.0, 2, 2.0, 1.0),  # 1.5 GPUs each cannot be placed: whole GPUs
        (8.0, 3, 4.0, 2.0),
    ],
)
def test_actors_ask_for_what_the_gpus_hold(
    gpus: float, workers: int, per_worker: float, expected: float
) -> None:
    share = gpu_share(gpus, workers, per_worker)
    assert share == pytest.approx(expected)
    assert workers * share <= gpus
