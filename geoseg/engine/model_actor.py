"""The model actor's class as Ray sees it: a shell that builds the torch worker in its process.

Ray's actor process imports the module of the class it hosts, and the driver imports it to create
the actor: this module imports neither torch nor the engine's other modules. The driver never
imports torch (it cost the driver ~180 MiB and ~0.9 s before Ray started; it only stitches
frames and writes numpy arrays, :mod:`geoseg.tiling.blend`), and the actor's process imports
only what the worker needs (not the driver's geopandas, ~0.6 s).
"""

from __future__ import annotations

from typing import Any


class ModelActor:
    """A :class:`geoseg.engine.actors.SegmentationWorker`, built in the actor's own process."""

    def __init__(self, *args: Any) -> None:
        from geoseg.engine.actors import SegmentationWorker

        self._worker = SegmentationWorker(*args)

    def ready(self) -> dict[str, Any]:
        return self._worker.ready()

    def predict(self, *args: Any) -> Any:
        return self._worker.predict(*args)

    def refine(self, *args: Any) -> Any:
        return self._worker.refine(*args)
