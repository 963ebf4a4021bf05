"""A model's graph compiled ahead of time for the CPU (AOTInductor), cached on disk.

``torch.compile`` pays at the start of every process: importing dynamo and inductor (1.4 s on the
development VM), then tracing the Python code again and loading the cached kernels (2.5 s for the
default U-Net): about 4 s of each ``geoseg segment`` run before its first tile. An AOTInductor
package is one shared library with the weights inside: it loads in about 15 ms, without dynamo
or inductor, and its first call is an ordinary forward pass. The kernels are inductor's, so the
speed is the same.

A package is built on first use (export, then compile: 10-20 s for the default U-Net on 2 cores)
and kept under :func:`cache_dir`, named by a hash of everything the generated code depends on: the
graph's identity (weights, card, precision, layout), the input's shape and dtype, the torch
version, the CPU's instruction set and the thread count (inductor writes it into its OpenMP
loops). Before it is stored, it runs the first batch it was built for beside the eager graph and
must agree with it (:func:`agrees`): an export made outside inference mode once compiled a U-Net
here into a graph that agreed on 46% of the classes.

A package's runner holds the GIL for the whole forward pass (a Python thread beside it ran 30x
slower), so threads calling one predictor would run one at a time: an actor running several
forward streams, and CUDA, keep ``torch.compile`` (:mod:`geoseg.engine.predict`); an AOTInductor
package for CUDA also needs the CUDA toolkit's headers at build time, which a pip-installed torch
does not bring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from geoseg.errors import CompileError

log = logging.getLogger(__name__)

CACHE_ENV = "GEOSEG_COMPILE_CACHE"
# Kernels fused differently move a bf16 U-Net's probabilities by ~5e-4 of their mean; the
# miscompiled one above was off by more than 1.
RELATIVE_TOLERANCE = 0.01
CLASS_AGREEMENT = 0.999  # the class map within 0.1%, as for every speed option


def cache_dir() -> Path:
    """``$GEOSEG_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/geoseg/compiled`` (``~/.cache/...``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "geoseg" / "compiled"


def agrees(got: torch.Tensor, expected: torch.Tensor) -> tuple[bool, str]:
    """Whether a compiled graph's output ``(B, classes, H, W)`` matches the eager one's, and how.

    Numerically close (mean absolute difference within :data:`RELATIVE_TOLERANCE` of the mean
    absolute value), or the same class map within 0.1% (kernels may round a near-tie either way).
    """
    got, expected = got.float(), expected.float()
    difference = float((got - expected).abs().mean()) / (float(expected.abs().mean()) or 1.0)
    agreement = float((got.argmax(1) == expected.argmax(1)).double().mean())
    ok = difference <= RELATIVE_TOLERANCE or agreement >= CLASS_AGREEMENT
    return ok, f"relative difference {difference:.2g}, class agreement {agreement:.4%}"


class _Graph(torch.nn.Module):
    """``function`` as a module owning ``model``, so that export lifts the weights."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


class AheadOfTime:
    """``function`` (a graph over ``model``) run from AOTInductor packages, one per input shape.

    ``identity``: what, besides the input and the platform, makes the compiled code differ (the
    weights' hash, the card, the precision...).
    """

    def __init__(
        self,
        function: Callable[[torch.Tensor], torch.Tensor],
        model: torch.nn.Module,
        identity: dict[str, Any],
    ) -> None:
        self.function = function
        self.model = model
        self.identity = identity
        self.built: list[Path] = []  # packages compiled by this object (the rest were loaded)
        self._runners: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        runner = self._runners.get(key)
        if runner is None:
            with self._lock:  # two threads' first calls compile once
                runner = self._runners.get(key) or self._load_or_build(x)
                self._runners[key] = runner
        out: torch.Tensor = runner.run([x])[0]
        return out

    def package_path(self, x: torch.Tensor) -> Path:
        described = {
            **self.identity,
            "shape": list(x.shape),
            "dtype": str(x.dtype),
            "torch": torch.__version__,
            "cpu": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
        }
        digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
        return cache_dir() / f"{digest[:32]}.pt2"

    def _load_or_build(self, x: torch.Tensor) -> Any:
        path = self.package_path(x)
        if path.exists():
            try:
                return self._load(path)
            except RuntimeError as exc:  # truncated or from an incompatible build: build again
                log.warning("%s: compiled package unusable (%s); compiling it again", path, exc)
        self._build(x, path)
        return self._load(path)

    def _load(self, path: Path) -> Any:
        loader = torch._C._aoti.AOTIModelPackageLoader  # type: ignore[attr-defined]
        return loader(str(path), "model", False, 1, -1)  # one runner, device index unused

    def _build(self, x: torch.Tensor, path: Path) -> None:
        import torch._inductor  # only when compiling: importing it costs ~1 s

        start = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".building-", suffix=".pt2", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                # Export and packaging warn of torch's own deprecated internals (FutureWarning).
                warnings.simplefilter("ignore", FutureWarning)
                program = torch.export.export(_Graph(self.function, self.model), (x,))
                torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
                ok, how = agrees(self._load(tmp).run([x])[0], self.function(x))
            if not ok:
                raise CompileError(
                    f"the compiled graph of {self.identity} disagrees with the eager model on its "
                    f"first batch ({how}): run without --compile (runtime.compile: false) and "
                    "report it with your torch version"
                )
            os.replace(tmp, path)  # whole or absent: another process may be reading the cache
        finally:
            tmp.unlink(missing_ok=True)
        self.built.append(path)
        log.info(
            "compiled %s for input %s %s in %.1f s (against eager: %s) -> %s",
            self.identity.get("graph", "graph"), tuple(x.shape), x.dtype,
            time.perf_counter() - start, how, path,
        )  # fmt: skip
