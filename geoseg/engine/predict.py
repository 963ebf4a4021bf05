"""One model on one device turning batches of raw tiles into class probabilities (no Ray here).

:class:`Predictor` is what a model actor holds; it imports only torch and numpy, so the GPU check
(``benchmarks/gpu_check.py``) runs the very same code on a bare GPU machine.

Speed options, each kept only where the class map stays within 0.1% of fp32 (the card's
``precisions`` say which the model allows):

* ``precision``: ``bf16`` or ``fp16`` autocast (fp16 on CUDA only: CPUs without AMX-FP16 run it
  slower than fp32). Probabilities are always computed in float32 from the logits.
* ``compile``: inductor's kernels. On the CPU the graph is compiled ahead of time into a library
  cached on disk (:mod:`geoseg.engine.aot`: a process loads it in milliseconds, where
  ``torch.compile`` spent ~4 s per process on dynamo and its cache), run without the GIL by as
  many threads as ``concurrency`` says; on CUDA, ``torch.compile``. Shapes are kept static: a
  short last batch is padded to the batch size, so one scene compiles once.
* channels_last memory format on the CPU and under autocast on CUDA (where it pays off).

Probabilities leave the step as float16, on the device (:meth:`Predictor.device_probabilities`):
an actor blends them there and sends on far fewer bytes. What comes back to the host
(:meth:`Predictor.to_host`) comes, on CUDA, through a reused page-locked host buffer per calling
thread, in one transfer: copying into freshly allocated pageable memory took 3x longer than the
forward pass itself (H100, ``benchmarks/README.md``).

A predictor may be called from several threads at once (an actor running several forward passes
at a time): calls share nothing but the model.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from geoseg.engine.aot import AheadOfTime
from geoseg.errors import ConfigError
from geoseg.models.store import load_model, normalize
from geoseg.tiling.device_blend import tensor_view

log = logging.getLogger(__name__)

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def choose_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when this process sees a GPU, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA device is visible to the actor")
    return torch.device(requested)


class Predictor:
    """Normalise, forward, softmax: raw tiles ``(B, bands, H, W)`` to class probabilities."""

    def __init__(
        self,
        model_dir: Path,
        device: str = "auto",
        precision: str = "fp32",
        compile: bool = False,
        batch_size: int | None = None,
        concurrency: int = 1,
    ) -> None:
        """``concurrency``: how many threads may call at once (an actor's forward streams)."""
        self.card, model, self.weights_sha256 = load_model(model_dir)
        self.card.check_precision(precision)
        self.device = choose_device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise ConfigError(
                f"model {self.card.name!r}: fp16 autocast needs a CUDA device (this one is "
                f"{self.device}); use bf16 on the CPU"
            )
        self.precision = precision
        self.channels_last = self.device.type == "cpu" or precision in AUTOCAST
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model = model
        self.compiled = compile
        self.batch_size = batch_size
        # Compiled on first use, each as one graph: the forward alone (the benchmarks' raw
        # forward) and the actors' whole step, normalisation and softmax fused with the model.
        self._forward: Any = self._forward_eager
        self._step: Any = self._step_eager
        if compile and self.device.type == "cpu":
            identity = {
                "weights": self.weights_sha256,
                "card": self.card.model_dump(
                    mode="json", include={"arch", "arch_args", "bands", "normalization"}
                ),
                "precision": precision,
                "channels_last": self.channels_last,
            }
            forward, step = {**identity, "graph": "forward"}, {**identity, "graph": "step"}
            self._forward = AheadOfTime(self._forward_eager, model, forward, concurrency)
            self._step = AheadOfTime(self._step_eager, model, step, concurrency)
        elif compile:  # CUDA
            self._forward = torch.compile(self._forward_eager, dynamic=False)
            self._step = torch.compile(self._step_eager, dynamic=False)
        # Per calling thread: .host, its page-locked buffer (CUDA); .configured (configure_thread)
        self._local = threading.local()
        log.info(
            "model %s on %s (%s%s)",
            self.card.name, self.device, precision, ", compiled" if compile else "",
        )  # fmt: skip

    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = AUTOCAST.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            out: torch.Tensor = self.model(x)
        return out

    def _step_eager(self, raw: torch.Tensor) -> torch.Tensor:
        logits = self._forward_eager(normalize(raw, self.card))
        return torch.softmax(logits.float(), dim=1).to(torch.float16)

    def configure_thread(self) -> None:
        """Apply torch's thread count to the calling thread (once), for compiled code."""
        # OpenMP's thread count belongs to each calling thread, and code compiled ahead of time
        # (oneDNN inside it) takes it from there: called from a thread torch never configured (a
        # pool thread of the benchmarks), it would run on every core whatever torch was told.
        # Torch's own setting is applied once per calling thread.
        if not getattr(self._local, "configured", False):
            torch.set_num_threads(torch.get_num_threads())
            self._local.configured = True

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model on a normalised batch on this device, under the configured autocast."""
        self.configure_thread()
        out: torch.Tensor = self._forward(x)
        return out

    @torch.inference_mode()
    def device_probabilities(self, data: NDArray[np.generic]) -> torch.Tensor:
        """Class probabilities ``(B, classes, H, W)`` float16, on this device, of raw tiles
        ``(B, bands, H, W)``."""
        self.configure_thread()
        count = len(data)
        # Only read: the step's first op, the normalisation, makes a new tensor.
        x = tensor_view(np.ascontiguousarray(data)).to(self.device, non_blocking=True)
        if self.compiled and self.batch_size and count < self.batch_size:
            # A new batch size would compile the graph again (tens of seconds on a CPU).
            x = torch.cat([x, x.new_zeros((self.batch_size - count, *x.shape[1:]))])
        probs: torch.Tensor = self._step(x)[:count]
        return probs

    @torch.inference_mode()
    def probabilities(self, data: NDArray[np.generic]) -> NDArray[np.float16]:
        """Class probabilities ``(B, classes, H, W)`` float16 of raw tiles ``(B, bands, H, W)``.

        The array may be a view of a buffer reused by this thread's next call: the caller copies it
        (a Ray actor does so when it stores its return value) before calling again.
        """
        (probs,) = self.to_host([self.device_probabilities(data)])
        return probs  # type: ignore[return-value]

    def to_host(self, tensors: list[torch.Tensor]) -> list[NDArray[np.generic]]:
        """``tensors`` of this device as numpy arrays in host memory, in one transfer off a GPU.

        On CUDA they are views of a page-locked buffer this thread reuses at its next call: the
        caller copies them (a Ray actor does so when it stores its return value) before calling
        again.
        """
        if self.device.type != "cuda":
            return [t.contiguous().numpy() for t in tensors]
        sizes = [t.numel() * t.element_size() for t in tensors]
        starts = [sum(-(-size // 64) * 64 for size in sizes[:i]) for i in range(len(sizes))]
        total = (starts[-1] + sizes[-1]) if tensors else 0
        buffer: torch.Tensor | None = getattr(self._local, "host", None)
        if buffer is None or buffer.numel() < total:
            buffer = torch.empty(total, dtype=torch.uint8, pin_memory=True)
            self._local.host = buffer
        hosts = []
        for tensor, start, size in zip(tensors, starts, sizes, strict=True):
            host = buffer[start : start + size].view(tensor.dtype).view(tensor.shape)
            host.copy_(tensor, non_blocking=True)
            hosts.append(host)
        torch.cuda.current_stream(self.device).synchronize()
        return [host.numpy() for host in hosts]
