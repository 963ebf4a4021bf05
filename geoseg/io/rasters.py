"""Input rasters: open and validate a scene against a model card, read padded tile windows.

Everything here fails loudly where GDAL/rasterio would only warn: a raster without a CRS or with an
identity or rotated geotransform is an error, and so is a broken block (reported with its window).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import rasterio
from affine import Affine
from numpy.typing import NDArray
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from geoseg.errors import BandMismatchError, NotGeoreferencedError, RasterReadError
from geoseg.io.storage import gdal_http_statuses, gdal_request_error
from geoseg.models.card import ModelCard, canonical_band_name

# Colour interpretations that name a band well enough to match a card by.
_NAMED_COLORINTERP = {"red", "green", "blue", "alpha"}

# GDAL's block cache must hold the blocks that a batch's overlapping windows share, or every window
# decodes its blocks again (a 512² window off the block grid spans 2 x 2 of them). rasterio hands
# an integer GDAL_CACHEMAX to GDALSetCacheMax64, in bytes: the 512 this once said meant 512 bytes,
# not MB, and the 10k² benchmark scene's 529 tiles took 2.2 core-s to read instead of 1.55, the
# NAIP mosaic VRT's 432 tiles 4.7 instead of 1.95. A dataset is open for one batch, so the cache
# holds at most that batch's blocks. Scoped with rasterio.Env, never set globally.
READ_ENV = {"GDAL_CACHEMAX": 512 * 2**20, "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}


@dataclass(frozen=True)
class SceneInfo:
    """What the pipeline needs to know of an input scene, validated against a model card."""

    uri: str
    height: int
    width: int
    crs_wkt: str
    transform: Affine
    band_indexes: tuple[int, ...]  # 1-based file bands, in the card's order
    dtype: str
    # GDAL options for reading this input (S3 endpoint, HTTP retries), beside READ_ENV. Carried
    # with the scene so that read tasks on any worker open it the same way as the driver.
    gdal_env: tuple[tuple[str, str], ...] = ()
    # Validity from the declared nodata of the bands read, one value per band (None: none
    # declared), as GDAL's nodata mask has it: valid where any band holds data. Unset (None),
    # GDAL's dataset mask is read instead: an internal mask or an alpha band the model does not
    # read. Set (1) where a band the model reads is tagged alpha (GDAL's default for 4 uint8
    # bands, so many R,G,B,NIR files): as a mask, every NIR 0 (dark water) would be nodata; (2)
    # where the mask comes from nodata values alone: computed from the pixels already read, it
    # costs nothing, where GDAL's mask band reads every band again (4x the read itself, NAIP).
    nodata_from_bands: tuple[float | None, ...] | None = None

    def env(self) -> rasterio.Env:
        return rasterio.Env(**READ_ENV, **dict(self.gdal_env))

    @property
    def pixel_area(self) -> float:
        """Area of one pixel in squared CRS units."""
        t = self.transform
        return abs(t.a * t.e - t.b * t.d)


def _file_band_names(src: rasterio.io.DatasetReader) -> list[str | None]:
    names: list[str | None] = []
    for description, interp in zip(src.descriptions, src.colorinterp, strict=True):
        if description:
            names.append(description)
        elif interp.name in _NAMED_COLORINTERP:
            names.append(interp.name)
        else:
            names.append(None)
    return names


def match_bands(
    uri: str, file_names: list[str | None], card_bands: list[str], override: list[str] | None
) -> tuple[int, ...]:
    """1-based indexes of the file bands that feed the card's bands, in the card's order."""
    if override is not None:
        if len(override) != len(file_names):
            raise BandMismatchError(
                f"{uri}: --bands names {len(override)} bands ({','.join(override)}) but the file "
                f"has {len(file_names)}: name every band of the file, in order"
            )
        file_names = list(override)
    index = {canonical_band_name(n): i + 1 for i, n in enumerate(file_names) if n}
    missing = [b for b in card_bands if canonical_band_name(b) not in index]
    if missing:
        shown = ", ".join(n if n else "(unnamed)" for n in file_names)
        example = [
            card_bands[i] if i < len(card_bands) else f"band{i + 1}" for i in range(len(file_names))
        ]
        raise BandMismatchError(
            f"{uri}: the model expects bands [{', '.join(card_bands)}]; the file has "
            f"{len(file_names)} bands [{shown}]; missing: {', '.join(missing)}. Name the file's "
            f"bands in order with --bands, e.g. --bands {','.join(example)}"
        )
    return tuple(index[canonical_band_name(b)] for b in card_bands)


def open_scene(
    uri: str,
    card: ModelCard,
    band_names: list[str] | None = None,
    gdal_env: dict[str, str] | None = None,
) -> SceneInfo:
    """Open ``uri`` (a path GDAL opens: local, ``/vsis3/``...) and check that the model can
    segment it, before any compute. ``gdal_env``: GDAL options for reading it."""
    gdal_options = tuple(sorted((gdal_env or {}).items()))
    try:
        with (
            rasterio.Env(**READ_ENV, **dict(gdal_options)),
            gdal_http_statuses(uri) as http_statuses,
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(uri) as src:
                crs, transform = src.crs, src.transform
                file_names = _file_band_names(src)
                file_dtypes = list(src.dtypes)
                height, width = src.height, src.width
                alphas = {i + 1 for i, c in enumerate(src.colorinterp) if c == ColorInterp.alpha}
                nodatavals = src.nodatavals
                mask_flags = src.mask_flag_enums
    except RasterioError as exc:
        failed = gdal_request_error(uri, exc, "open it", dict(gdal_options), http_statuses)
        if failed is not None:
            raise failed from exc  # S3/HTTP gave up: not a broken file
        raise RasterReadError(
            f"{uri}: cannot open as a raster ({exc}); check it with gdalinfo, and re-download or "
            "re-export it as a GeoTIFF"
        ) from exc
    if crs is None:
        raise NotGeoreferencedError(
            f"{uri}: the raster has no CRS; assign one (gdal_edit.py -a_srs EPSG:...) first"
        )
    if transform == Affine.identity():
        raise NotGeoreferencedError(
            f"{uri}: the raster has an identity geotransform (no georeferencing); "
            "set one (gdal_edit.py -a_ullr ...) first"
        )
    if transform.b != 0 or transform.d != 0:
        raise NotGeoreferencedError(
            f"{uri}: rotated or sheared geotransform {tuple(transform)[:6]}; "
            "warp it north-up first (gdalwarp)"
        )
    indexes = match_bands(uri, file_names, card.bands, band_names)
    dtypes = {file_dtypes[i - 1] for i in indexes}
    dtype = file_dtypes[indexes[0] - 1]
    if len(dtypes) > 1 or dtype not in card.input_dtypes:
        raise BandMismatchError(
            f"{uri}: the model expects input dtype {' or '.join(card.input_dtypes)}, "
            f"the file has {', '.join(sorted(dtypes))}: rescale it to what the model card states"
        )
    alpha_is_data = bool(alphas & set(indexes))
    # Per band, GDAL reports all_valid (no nodata) or nodata (a nodata value) without a mask of
    # its own; anything else (per_dataset: alpha or internal mask) is a real mask band.
    from_values = all(set(flags) <= {MaskFlags.all_valid, MaskFlags.nodata} for flags in mask_flags)
    return SceneInfo(
        uri=uri,
        height=height,
        width=width,
        crs_wkt=crs.to_wkt(),
        transform=transform,
        band_indexes=indexes,
        dtype=dtype,
        gdal_env=gdal_options,
        nodata_from_bands=(
            tuple(nodatavals[i - 1] for i in indexes) if alpha_is_data or from_values else None
        ),
    )


def read_tile(
    scene: SceneInfo, row_off: int, col_off: int, height: int, width: int
) -> tuple[NDArray[np.generic], NDArray[np.bool_]]:
    """One window of :func:`read_windows`."""
    return read_windows(scene, [(row_off, col_off, height, width)])[0]


def read_windows(
    scene: SceneInfo, windows: Sequence[tuple[int, int, int, int]]
) -> list[tuple[NDArray[np.generic], NDArray[np.bool_]]]:
    """Read tile windows ``(row_off, col_off, height, width)``, padded where past the edges.

    A window may start before the scene (negative offsets) and end past it: the part outside is
    reflect-padded and marked not valid. Each window gives raw pixel values ``(bands, height,
    width)`` in the file's dtype and the validity mask: declared nodata, internal mask or alpha
    band (see :attr:`SceneInfo.nodata_from_bands`), and non-finite values.

    The file is opened once for all the windows: GDAL's block cache belongs to the open dataset,
    so the blocks that overlapping neighbours share are decoded once (opening the file per tile
    decoded them again for each tile).
    """
    try:
        with scene.env(), gdal_http_statuses(scene.uri) as http_statuses, warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(scene.uri) as src:
                return [_read_window(src, scene, *window) for window in windows]
    except _WindowError as failure:
        row_off, col_off, rows, cols = failure.window
        exc = failure.cause
    except RasterioError as exc_open:
        row_off, col_off, rows, cols = _inside(scene, *windows[0])[:4]
        exc = exc_open
    where = f"rows {row_off}:{row_off + rows}, cols {col_off}:{col_off + cols}"
    gdal_env = dict(scene.gdal_env)
    failed = gdal_request_error(scene.uri, exc, f"read {where}", gdal_env, http_statuses)
    if failed is not None:
        raise failed from exc  # S3/HTTP gave up: not a broken file
    raise RasterReadError(
        f"{scene.uri}: cannot read window {where}: the file is corrupt or truncated ({exc}); "
        "re-download or re-export it"
    ) from exc


class _WindowError(Exception):
    """A read of one window failed: which window (inside the scene) and GDAL's error."""

    def __init__(self, window: tuple[int, int, int, int], cause: RasterioError) -> None:
        super().__init__(str(cause))
        self.window = window
        self.cause = cause


def _inside(
    scene: SceneInfo, row_off: int, col_off: int, height: int, width: int
) -> tuple[int, int, int, int, int, int]:
    """The part of a window inside the scene (row_off, col_off, rows, cols), and its own offset
    in the window (top, left)."""
    top, left = max(0, -row_off), max(0, -col_off)
    row_off, col_off = row_off + top, col_off + left
    rows = min(height - top, scene.height - row_off)
    cols = min(width - left, scene.width - col_off)
    return row_off, col_off, rows, cols, top, left


def _read_window(
    src: rasterio.io.DatasetReader,
    scene: SceneInfo,
    row_off: int,
    col_off: int,
    height: int,
    width: int,
) -> tuple[NDArray[np.generic], NDArray[np.bool_]]:
    row_off, col_off, rows, cols, top, left = _inside(scene, row_off, col_off, height, width)
    window = Window(col_off, row_off, cols, rows)
    try:
        data = src.read(scene.band_indexes, window=window)
        if scene.nodata_from_bands is None:
            valid = src.dataset_mask(window=window) > 0
        elif None in scene.nodata_from_bands:
            valid = np.ones(data.shape[1:], dtype=bool)
        else:  # as GDAL's nodata mask: valid where any band holds data
            valid = np.zeros(data.shape[1:], dtype=bool)
            for band, nodata in zip(data, scene.nodata_from_bands, strict=True):
                valid |= band != nodata
    except RasterioError as exc:
        raise _WindowError((row_off, col_off, rows, cols), exc) from exc
    if np.issubdtype(data.dtype, np.floating):
        valid &= np.isfinite(data).all(axis=0)
        data = np.where(np.isfinite(data), data, 0).astype(data.dtype)
    pad = ((top, height - top - rows), (left, width - left - cols))
    if pad != ((0, 0), (0, 0)):
        data = np.pad(data, ((0, 0), *pad), mode="reflect")
        valid = np.pad(valid, pad, mode="constant", constant_values=False)
    return data, valid
