"""Model actors: each loads the model once onto its device and turns tile batches into
probabilities (and refines bands of them with the CRF).

The tiles come from read tasks (:mod:`geoseg.engine.reads`); a batch's read task runs while the
actor is busy with the previous batch: reading, inference and the driver's blending and writing
overlap.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from geoseg.crf import CRFParams, crf_refine, crf_refine_tiled
from geoseg.engine.predict import Predictor
from geoseg.io.cog import mask_dtype
from geoseg.io.rasters import SceneInfo, read_tile
from geoseg.models.store import normalize
from geoseg.tiling.bands import Band
from geoseg.tiling.blend import classes_and_confidence, tensor_view

log = logging.getLogger(__name__)

CRF_CPU_TILE = 1024  # 286-row bands x 10k columns, 4 classes: 6.8 MP/s at 1024, 3.3 whole


class SegmentationWorker:
    """Holds one :class:`Predictor`. Created as a Ray actor by :class:`WorkerPool`.

    The actor may run several calls at once (Ray's ``max_concurrency``, one thread each): the
    methods keep no state between calls, and torch releases the GIL while it computes.
    """

    def __init__(
        self,
        model_dir: str,
        device: str,
        precision: str,
        threads: int,
        compile: bool = False,
        batch_size: int | None = None,
        streams: int = 1,
    ) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.predictor = Predictor(
            Path(model_dir), device, precision, compile, batch_size, concurrency=streams
        )
        self.card = self.predictor.card
        self.device = self.predictor.device

    def ready(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "weights_sha256": self.predictor.weights_sha256,
            "torch_threads": torch.get_num_threads(),
        }

    def predict(
        self, batch: tuple[NDArray[np.generic], NDArray[np.bool_], float]
    ) -> tuple[NDArray[np.float16] | None, NDArray[np.bool_], dict[str, float]]:
        """Class probabilities ``(B, classes, H, W)`` (float16) for the tiles with valid pixels.

        Tiles without any valid pixel never reach the model: the probabilities of such a batch are
        ``None`` and their rows are zero.
        """
        data, valid, read_s = batch
        start = time.perf_counter()
        has_data = valid.reshape(len(valid), -1).any(axis=1)
        if not has_data.any():
            return None, valid, {"read_s": read_s, "infer_s": 0.0, "tiles_skipped": len(valid)}
        if has_data.all():
            out = self.predictor.probabilities(data)
        else:
            probs = self.predictor.probabilities(data[has_data])
            out = np.zeros((len(valid), *probs.shape[1:]), dtype=probs.dtype)
            out[has_data] = probs
        stats = {
            "read_s": read_s,
            "infer_s": time.perf_counter() - start,
            "tiles_skipped": float((~has_data).sum()),
        }
        return out, valid, stats

    @torch.inference_mode()
    def refine(
        self,
        scene: SceneInfo,
        band: Band,
        feature_indexes: list[int],
        params: CRFParams,
        backend: str,
    ) -> tuple[NDArray[np.integer], NDArray[np.uint8], float]:
        """CRF-refine a band of blended probabilities; class ids and confidence of its core rows.

        The appearance features are the band's pixels read again from the scene and normalised
        as for the model, so the CRF sees what the model saw.
        """
        start = time.perf_counter()
        rows = band.probs.shape[1]
        data, _ = read_tile(scene, band.context_row_off, 0, rows, scene.width)
        features = normalize(torch.from_numpy(data.astype(np.float32))[None], self.card)[0]
        features = features[feature_indexes]
        if backend == "dense":
            from geoseg.crf_dense import dense_crf_refine

            if len(feature_indexes) != 3:
                raise ValueError("the dense CRF backend needs exactly 3 feature bands")
            image = np.clip(features.permute(1, 2, 0).numpy() * 255, 0, 255).astype(np.uint8)
            refined = dense_crf_refine(band.probs, image, band.valid, params)
        else:
            # Read only (the CRF makes new tensors): no copy of the band out of the object store.
            probs = tensor_view(band.probs).to(self.device)
            valid = tensor_view(band.valid).to(self.device)
            features = features.to(self.device)
            if self.device.type == "cpu":
                # Pieces of the band that fit the CPU's caches (exact: crf_refine_tiled keeps the
                # CRF's halo): 2x faster than the whole 10k-wide band at once on this CPU.
                refined = crf_refine_tiled(probs, features, valid, params, CRF_CPU_TILE).numpy()
            else:
                refined = crf_refine(probs, features, valid, params).cpu().numpy()
        core = slice(band.halo_top, band.halo_top + band.rows)
        dtype, nodata = mask_dtype(self.card.num_classes)
        ids, confidence = classes_and_confidence(refined[:, core], band.valid[core], nodata, dtype)
        return ids, confidence, time.perf_counter() - start
