"""Output root: safe scene names, atomic commit of a scene's folder, atomic JSON, mask strips.

A scene's outputs are written into a hidden temporary folder beside the final one and renamed into
place only when every file is complete, so a crash leaves either the previous outputs or the new
ones, never a mix, and a rerun finds no partial folder that looks finished.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from numpy.typing import NDArray

from geoseg.errors import OutputExistsError, StorageError, UnsafeOutputNameError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def scene_output_name(uri: str) -> str:
    """The output folder name of an input: its file stem, reduced to ``[A-Za-z0-9._-]``.

    The name can never climb out of the output root (no separators, no leading dot, not empty).
    """
    stem = uri.rstrip("/").rsplit("/", 1)[-1]
    stem = stem.rsplit("\\", 1)[-1]
    for suffix in (".tiff", ".tif", ".vrt", ".jp2", ".img"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    name = _UNSAFE.sub("_", stem).lstrip(".")
    if not name:
        raise UnsafeOutputNameError(f"{uri}: no usable output name can be made from this input")
    return name


def inside(root: Path, name: str) -> Path:
    """``root / name``, refusing any name that would leave ``root``."""
    root = root.resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise UnsafeOutputNameError(f"output name {name!r} would escape the output root {root}")
    return path


class SceneOutput:
    """A scene's output folder, built under a temporary name and committed atomically."""

    def __init__(self, root: Path, name: str, overwrite: bool) -> None:
        self.final = inside(root, name)
        if self.final.exists() and not overwrite:
            raise OutputExistsError(
                f"{self.final}: outputs exist already; pass --overwrite to replace them"
            )
        self.tmp = inside(root, f".{name}.partial-{uuid.uuid4().hex[:8]}")
        self.tmp.mkdir(parents=True)

    def commit(self) -> Path:
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{uuid.uuid4().hex[:8]}")
            self.final.rename(old)
        self.tmp.rename(self.final)
        if old is not None:
            shutil.rmtree(old)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_failed(path: Path, exc: Exception) -> StorageError:
    """The error for an output file that could not be written: the file, why, the free space."""
    try:
        space = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB are free on its filesystem"
    except OSError:  # its folder is gone: say why the file failed, not why the check did
        space = "its folder cannot be read"
    return StorageError(
        f"{path}: could not be written completely ({exc}); {space}: if the disk is full, free "
        "space (or choose another output root) and rerun"
    )


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON, or leave it as it was and raise
    :class:`StorageError` (a full disk): the temporary file is removed either way."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failed(path, exc) from exc


def read_mask_strips(path: Path, rows: int) -> Iterator[tuple[int, NDArray[np.integer]]]:
    """Yield ``(row_off, strip)`` of band 1 of ``path``, ``rows`` lines at a time."""
    with rasterio.open(path) as src:
        for row_off in range(0, src.height, rows):
            height = min(rows, src.height - row_off)
            window = rasterio.windows.Window(0, row_off, src.width, height)
            yield row_off, src.read(1, window=window)
