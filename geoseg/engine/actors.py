"""Model actors: each loads the model once onto its device, turns runs of tiles into blended
class ids (or probabilities, for the CRF) and partial sums for the driver, and refines bands of
probabilities with the CRF.

The tiles come from read tasks (:mod:`geoseg.engine.reads`); a batch's read task runs while the
actor is busy with the previous batch: reading, inference and the driver's share (the frames
between runs, writing) overlap. Blending and classifying where the model ran spares the driver's
one thread most of that work, which on a GPU held a scene to 17-26 MP/s of model pixels: on an
H200 the driver's share of a 10k² scene fell from 2.3 to 1.4 s (the scene is then bound by the
reads and the first batch's compile: ``benchmarks/README.md``, "On a GPU").
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from geoseg.crf import CRFParams
from geoseg.crf_compiled import PieceGraphs, crf_refine_pieces, prepare, step
from geoseg.crf_local import crf_refine, crf_refine_tiled
from geoseg.engine.aot import AheadOfTime
from geoseg.engine.predict import Predictor
from geoseg.io.cog import mask_dtype
from geoseg.models.store import normalize
from geoseg.tiling.bands import Band
from geoseg.tiling.blend import RunOutput, Stitcher, classes_and_confidence
from geoseg.tiling.device_blend import blend_run, classify, tensor_view
from geoseg.tiling.grid import Tile, TileGrid

log = logging.getLogger(__name__)


CRF_CPU_TILE = 1024  # 286-row bands x 10k columns, 4 classes: 6.8 MP/s at 1024, 3.3 whole


def _runs(tiles: list[Tile]) -> list[tuple[int, int]]:
    """``[first, last)`` index ranges of ``tiles`` (row-major) that lie in one tile row."""
    starts = [i for i, tile in enumerate(tiles) if i == 0 or tile.grid_row != tiles[i - 1].grid_row]
    return list(zip(starts, [*starts[1:], len(tiles)], strict=True))


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
        self._nodata = mask_dtype(self.card.num_classes)[1]
        self._grids: dict[
            TileGrid, tuple[Stitcher, dict[tuple[bool | int, ...], torch.Tensor]]
        ] = {}
        self._streams = streams
        self._crf_graphs: dict[CRFParams, PieceGraphs] = {}
        self._crf_lock = threading.Lock()

    def ready(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "weights_sha256": self.predictor.weights_sha256,
            "torch_threads": torch.get_num_threads(),
        }

    @torch.inference_mode()
    def predict(
        self,
        grid: TileGrid,
        tiles: list[Tile],
        batch: tuple[NDArray[np.generic], NDArray[np.bool_], float],
        classify_final: bool,
    ) -> tuple[list[RunOutput], dict[str, float]]:
        """A batch of tiles (row-major) through the model, blended here run by run.

        Each run (the batch's tiles of one tile row) leaves what it alone finishes as class ids
        and confidence (``classify_final``) or as blended probabilities (for the CRF), and the
        frame it shares with its neighbours as partial sums for the driver's :class:`Stitcher`.
        A batch, not a run, is the unit of work: runs cut at row ends would pad the model's
        last batch of every row (a 23-tile row in batches of 4: 4% more model work).
        Tiles without any valid pixel never reach the model.
        """
        data, valid, read_s = batch
        start = time.perf_counter()
        has_data = valid.reshape(len(valid), -1).any(axis=1)
        if has_data.all():
            probs = self.predictor.device_probabilities(data)
        else:
            probs = torch.zeros(
                (len(tiles), self.card.num_classes, *data.shape[2:]),
                dtype=torch.float16,
                device=self.device,
            )
            if has_data.any():
                probs[torch.from_numpy(has_data).to(self.device)] = (
                    self.predictor.device_probabilities(data[has_data])
                )
        if self.device.type == "cuda":  # the model's kernels are queued, not done: time them
            torch.cuda.current_stream(self.device).synchronize()
        blend_start = time.perf_counter()
        stitcher, device_weights = self._grid_state(grid)

        def weights(tile: Tile) -> torch.Tensor:
            key = stitcher.weights_key(tile)
            if key not in device_weights:
                device_weights[key] = tensor_view(stitcher.weights_for(tile)).to(self.device)
            return device_weights[key]

        device_valid = tensor_view(valid).to(self.device, non_blocking=True)
        layouts, pieces = [], []
        for first, last in _runs(tiles):
            layout = stitcher.layout(tiles[first:last])
            run = blend_run(
                grid,
                layout,
                tiles[first:last],
                probs[first:last],
                device_valid[first:last],
                weights,
            )
            final: list[torch.Tensor] = []
            if run.final is not None:
                probs_sum, valid_sum = run.final
                # For the CRF as float16, the model's own precision: half the bytes to copy
                # through the object store and the driver's bands, each way.
                final = (
                    list(classify(probs_sum, valid_sum, self._nodata))
                    if classify_final
                    else [probs_sum.to(torch.float16), valid_sum]
                )
            layouts.append(layout)
            pieces.append([run.partial, run.partial_valid, *final])
        # One transfer off a GPU for the whole batch.
        host = self.predictor.to_host([t for run_pieces in pieces for t in run_pieces])
        outputs = []
        for layout, run_pieces in zip(layouts, pieces, strict=True):
            arrays, host = host[: len(run_pieces)], host[len(run_pieces) :]
            outputs.append(RunOutput(layout, arrays[0], arrays[1], tuple(arrays[2:])))  # type: ignore[arg-type]
        end = time.perf_counter()
        stats = {
            "read_s": read_s,
            "infer_s": end - start,  # the actor's whole step, blending included
            "blend_s": end - blend_start,
            "tiles_skipped": float((~has_data).sum()),
        }
        return outputs, stats

    def _grid_state(
        self, grid: TileGrid
    ) -> tuple[Stitcher, dict[tuple[bool | int, ...], torch.Tensor]]:
        """The scene's stitcher (only its layouts and weights are used here) and its weights on
        this device, kept for the scene's next batch; another scene's are dropped."""
        state = self._grids.get(grid)
        if state is None:
            state = (Stitcher(grid, self.card.num_classes), {})
            self._grids = {grid: state}
        return state

    def _compiled_crf(self, params: CRFParams) -> PieceGraphs:
        """The CRF's graphs for ``params``, compiled ahead of time like the model (on first use,
        cached on disk): :mod:`geoseg.crf_compiled`."""
        with self._crf_lock:  # the actor's streams refine bands at once
            graphs = self._crf_graphs.get(params)
            if graphs is None:
                kernel = {k: v for k, v in asdict(params).items() if k != "iterations"}
                start = AheadOfTime(
                    partial(prepare, params=params),
                    torch.nn.Module(),
                    {"graph": "crf-prepare", "params": kernel},
                    self._streams,
                )
                iterate = AheadOfTime(
                    partial(step, radius=params.radius),
                    torch.nn.Module(),
                    {"graph": "crf-step", "radius": params.radius},
                    self._streams,
                )
                graphs = self._crf_graphs[params] = PieceGraphs(start, iterate)
            return graphs

    @torch.inference_mode()
    def refine(
        self,
        band: Band,
        rows_read: tuple[NDArray[np.generic], float],
        feature_indexes: list[int],
        params: CRFParams,
        backend: str,
    ) -> tuple[NDArray[np.integer], NDArray[np.uint8], dict[str, float]]:
        """CRF-refine a band of blended probabilities; class ids and confidence of its core rows,
        and the seconds of the CRF and of its read.

        ``rows_read``: the band's rows (context included) of every scene band as a read task read
        them again, and its seconds (:func:`geoseg.engine.reads.read_rows`, run beside this call's
        predecessors); normalised here as for the model, so the CRF sees what the model saw.
        The local CRF's result is classified where it ran: off a GPU come only ids and
        confidence (a 10k-wide band: 5 MB instead of 41 MB of float32), and no CPU time of the
        actor's goes to them. On an H200 these two took a 10k² scene's CRF from 7.8 to 1.3 s.
        """
        start = time.perf_counter()
        pixels, read_s = rows_read
        core = slice(band.halo_top, band.halo_top + band.rows)
        raw = tensor_view(pixels)[None].to(self.device)
        features = normalize(raw, self.card, feature_indexes)[0]
        dtype, nodata = mask_dtype(self.card.num_classes)
        if backend == "dense":
            from geoseg.crf_dense import dense_crf_refine

            if len(feature_indexes) != 3:
                raise ValueError("the dense CRF backend needs exactly 3 feature bands")
            image = np.clip(features.cpu().permute(1, 2, 0).numpy() * 255, 0, 255).astype(np.uint8)
            probs_32 = band.probs.astype(np.float32)
            dense = dense_crf_refine(probs_32, image, band.valid, params)[:, core]
            ids, confidence = classes_and_confidence(dense, band.valid[core], nodata, dtype)
            return ids, confidence, {"crf_s": time.perf_counter() - start, "read_s": read_s}
        # Read only (the CRF makes new tensors): no copy of the band out of the object store.
        probs = tensor_view(band.probs).to(self.device)
        valid = tensor_view(band.valid).to(self.device)
        wanted = (core, slice(0, probs.shape[2]))  # the context rows only inform the core's
        if self.device.type == "cpu" and self.predictor.compiled:
            self.predictor.configure_thread()
            # float16 as it came: the pieces are copied into float32 buffers anyway.
            refined = crf_refine_pieces(
                probs, features, valid, params, self._compiled_crf(params), core=wanted
            )
        elif self.device.type == "cpu":
            # Pieces of the band that fit the CPU's caches (exact: crf_refine_tiled keeps the
            # CRF's halo): 2x faster than the whole 10k-wide band at once on this CPU.
            refined = crf_refine_tiled(
                probs.float(), features, valid, params, CRF_CPU_TILE, core=wanted
            )
        else:
            refined = crf_refine(probs.float(), features, valid, params, core=wanted)
        host_ids, host_confidence = self.predictor.to_host(
            list(classify(refined, valid[core], nodata))
        )
        seconds = {"crf_s": time.perf_counter() - start, "read_s": read_s}
        return host_ids.astype(dtype, copy=False), host_confidence.view(np.uint8), seconds
