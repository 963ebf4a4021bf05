"""A model's graph compiled ahead of time for the CPU (AOTInductor), cached on disk.

``torch.compile`` pays at the start of every process: importing dynamo and inductor (1.4 s on the
development VM), then tracing the Python code again and loading the cached kernels (2.5 s for the
default U-Net): about 4 s of each ``geoseg segment`` run before its first tile. An AOTInductor
package is one shared library with the weights inside: it loads in about 15 ms, without dynamo
or inductor, and its first call is an ordinary forward pass. The kernels are inductor's, so the
speed is the same.

A package is built on first use (export, then compile: 10-20 s for the default U-Net on 2 cores)
and kept under :func:`cache_dir`, named by a hash of everything the generated code depends on: the
graph's identity (weights, card, precision, layout), the inputs' shapes and dtypes, geoseg's
sources (:func:`sources_digest`), the torch version, the CPU's instruction set and the thread
count (inductor writes it into its OpenMP loops). Before it is stored, it runs the first batch it
was built for beside the eager graph and must agree with it (:func:`agrees`, on every output):
an export made outside inference mode once compiled a U-Net here into a graph that agreed on 46%
of the classes.

The package's shared library is run through its C interface with ``ctypes``
(:class:`CompiledLibrary`). torch's own runners (``AOTIModelPackageLoader.run``,
``AOTIModelContainerRunnerCpu.run``) hold the GIL for the whole forward pass, so two threads
calling one model ran one at a time (2 threads: 0.93-0.94 s a batch, as many as 1 thread's 0.95);
``ctypes`` lets the GIL go during the call, and the same two threads ran 1.92x as many batches as
one. An actor's forward streams share one library, with one model instance per stream. CUDA keeps
``torch.compile`` (:mod:`geoseg.engine.predict`): an AOTInductor package for CUDA needs the CUDA
toolkit's headers at build time, which a pip-installed torch does not bring.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import warnings
import zipfile
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


def sources_digest() -> str:
    """A digest of geoseg's Python sources (paths and contents).

    Compiled code is built from them (the graphs' functions, the models' classes): a package
    named with it is never loaded by another version of geoseg.
    """
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package.parent)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


_SOURCES = functools.cache(sources_digest)  # of this process's geoseg: read once


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

    def __init__(self, function: Callable[..., Any], model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.function = function

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.function(*inputs)


_Handle = ctypes.c_void_p


def _capsule_api() -> tuple[Any, Any]:
    """CPython's ``PyCapsule_GetPointer`` and ``PyCapsule_New``, typed for ``ctypes``."""
    api = ctypes.pythonapi
    get, new = api.PyCapsule_GetPointer, api.PyCapsule_New
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return get, new


class CompiledLibrary:
    """An AOTInductor shared library run through its C interface, without the GIL.

    The interface (``torch/csrc/inductor/aoti_runtime/interface.h``) takes tensors as handles
    it steals, and gives back handles the caller steals; torch makes and adopts such handles
    (``torch._C._aoti``), as its own runners do. A container with ``models`` instances runs that
    many calls at once; a further caller waits for a free instance.
    """

    def __init__(self, package: Path, models: int) -> None:
        """Load the library of ``package``: zipfile.BadZipFile, KeyError or ValueError if the
        package is damaged (the archive checks its members' CRCs as they are read).

        The library is copied out under a fresh name beside the package and removed once
        loaded: a damaged library mapped in place would crash the process (SIGBUS) instead of
        raising, and the dynamic loader hands a library it loaded before back by its name.
        """
        self.path = package
        with zipfile.ZipFile(package) as archive:
            (member,) = [n for n in archive.namelist() if n.endswith(".so")]
            code = archive.read(member)
        fd, name = tempfile.mkstemp(prefix=".loading-", suffix=".so", dir=package.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(code)
            self._lib = ctypes.CDLL(name)
        finally:
            os.unlink(name)
        lib = self._lib
        lib.AOTInductorModelContainerCreateWithDevice.argtypes = [
            ctypes.POINTER(_Handle), ctypes.c_size_t, ctypes.c_char_p, ctypes.c_char_p,
        ]  # fmt: skip
        lib.AOTInductorModelContainerGetNumOutputs.argtypes = [
            _Handle, ctypes.POINTER(ctypes.c_size_t),
        ]  # fmt: skip
        lib.AOTInductorModelContainerRun.argtypes = [
            _Handle, ctypes.POINTER(_Handle), ctypes.c_size_t, ctypes.POINTER(_Handle),
            ctypes.c_size_t, _Handle, _Handle,
        ]  # fmt: skip
        lib.AOTInductorModelContainerDelete.argtypes = [_Handle]
        self._container = _Handle()
        self._check(
            lib.AOTInductorModelContainerCreateWithDevice(
                ctypes.byref(self._container), models, b"cpu", None
            ),
            "load",
        )
        outputs = ctypes.c_size_t()
        self._check(
            lib.AOTInductorModelContainerGetNumOutputs(self._container, ctypes.byref(outputs)),
            "inspect",
        )
        self._outputs = outputs.value
        self._get_pointer, self._new_capsule = _capsule_api()

    def _check(self, error: int, action: str) -> None:
        if error:  # the library has printed the C++ exception on stderr
            raise RuntimeError(f"{self.path}: AOTInductor could not {action} the model ({error})")

    def run(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """The graph's outputs on ``tensors``, its inputs in order."""
        handles = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(list(tensors))  # type: ignore[attr-defined]
        inputs = (_Handle * len(handles))(*(self._get_pointer(h, None) for h in handles))
        outputs = (_Handle * self._outputs)()
        self._check(
            self._lib.AOTInductorModelContainerRun(
                self._container, inputs, len(handles), outputs, self._outputs, None, None
            ),
            "run",
        )
        stolen = [self._new_capsule(pointer, None, None) for pointer in outputs]
        adopt = torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs  # type: ignore[attr-defined]
        results: list[torch.Tensor] = adopt(stolen)
        return results

    def __del__(self) -> None:
        container = getattr(self, "_container", None)
        if container:
            self._lib.AOTInductorModelContainerDelete(container)


class AheadOfTime:
    """``function`` (a graph over ``model``) run from AOTInductor packages, one per input shape.

    ``function`` takes tensors and returns a tensor or a tuple of them, as the call does.
    ``identity``: what, besides the inputs and the platform, makes the compiled code differ (the
    weights' hash, the card, the precision...).
    """

    def __init__(
        self,
        function: Callable[..., Any],
        model: torch.nn.Module,
        identity: dict[str, Any],
        concurrency: int = 1,
    ) -> None:
        """``concurrency``: how many threads may call at once (one model instance each)."""
        self.function = function
        self.model = model
        self.identity = identity
        self.concurrency = concurrency
        self.built: list[Path] = []  # packages compiled by this object (the rest were loaded)
        self._runners: dict[tuple[Any, ...], CompiledLibrary] = {}
        self._lock = threading.Lock()

    def __call__(self, *inputs: torch.Tensor) -> Any:
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        runner = self._runners.get(key)
        if runner is None:
            with self._lock:  # two threads' first calls compile once
                runner = self._runners.get(key) or self._load_or_build(inputs)
                self._runners[key] = runner
        outputs = runner.run(*inputs)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def package_path(self, inputs: tuple[torch.Tensor, ...]) -> Path:
        described = {
            **self.identity,
            "inputs": [[list(x.shape), str(x.dtype)] for x in inputs],
            "geoseg": _SOURCES(),
            "torch": torch.__version__,
            "cpu": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
        }
        digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
        return cache_dir() / f"{digest[:32]}.pt2"

    def _load_or_build(self, inputs: tuple[torch.Tensor, ...]) -> CompiledLibrary:
        path = self.package_path(inputs)
        if path.exists():
            try:
                return CompiledLibrary(path, self.concurrency)
            except (zipfile.BadZipFile, KeyError, ValueError, OSError, RuntimeError) as exc:
                # Damaged, or from an incompatible build: build it again.
                log.warning("%s: compiled package unusable (%s); compiling it again", path, exc)
        self._build(inputs, path)
        return CompiledLibrary(path, self.concurrency)

    def _build(self, inputs: tuple[torch.Tensor, ...], path: Path) -> None:
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
                program = torch.export.export(_Graph(self.function, self.model), inputs)
                torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
                got = CompiledLibrary(tmp, 1).run(*inputs)
                expected = self.function(*inputs)
                expected = list(expected) if isinstance(expected, tuple) else [expected]
                checks = [agrees(g, e) for g, e in zip(got, expected, strict=True)]
                ok, how = all(ok for ok, _ in checks), "; ".join(how for _, how in checks)
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
            self.identity.get("graph", "graph"), tuple(inputs[0].shape), inputs[0].dtype,
            time.perf_counter() - start, how, path,
        )  # fmt: skip
