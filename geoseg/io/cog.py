"""Class-id and confidence rasters: streamed into tiled GeoTIFFs, then converted to COGs.

The stitcher hands over finished rows; they are gathered into full block rows (``BLOCK`` lines, the
whole width) so that every compressed block of the intermediate GeoTIFF is written exactly once.
Each block row is also halved into the overview levels as it is written (:mod:`geoseg.overviews`:
the most frequent class for class ids, the mean for confidence), each level streamed into a GeoTIFF
of its own. GDAL's COG driver then copies the raster with those levels as internal overviews,
keeping the palette. Class names go into the dataset metadata and into a PAM
sidecar (``mask.tif.aux.xml``) as category names, which ``gdalinfo`` and QGIS read, and a QGIS
style (``mask.qml``) makes QGIS show the class names and colours.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from numpy.typing import NDArray
from rasterio._err import CPLE_BaseError
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.io import MemoryFile

from geoseg.io.outputs import write_failed
from geoseg.io.rasters import SceneInfo
from geoseg.models.card import ClassInfo
from geoseg.overviews import halve_mean, halve_mode, level_factors
from geoseg.styles import paletted_raster_qml

BLOCK = 512
CONFIDENCE_NODATA = 0  # 255 x max probability is never 0: at least 255 / classes
# DEFLATE of the streamed blocks and of the COGs on every core: on a GPU machine the driver's COGs
# sat on one core's worth of 2 threads (a 10k² scene's two COGs took 2.8 s of its 10 s on the
# H200's 16 cores); on the 2-core CPU machine this is the 2 threads it always had.
WRITE_THREADS = "ALL_CPUS"
# The block cache in bytes (rasterio hands GDAL_CACHEMAX to GDALSetCacheMax64): smaller than any
# block, so GDAL writes every block through as it is written. Dirty blocks do not sit in memory
# (a 256 MiB cache added ~55 MiB to a 10k² scene's peak RSS and wrote no faster), and a full disk
# fails the write that hit it: with 16 MiB, an ENOSPC escaped the job once in the disk-full test.
WRITE_ENV = {"GDAL_CACHEMAX": 256, "GDAL_NUM_THREADS": WRITE_THREADS}


BlockRowSink = Callable[[int, NDArray[np.integer], NDArray[np.uint8] | None], None]


def mask_dtype(num_classes: int) -> tuple[str, int]:
    """Class-id dtype and its nodata value: uint8/255 up to 254 classes, else uint16/65535."""
    return ("uint8", 255) if num_classes <= 254 else ("uint16", 65535)


def _profile(scene: SceneInfo, dtype: str, nodata: int) -> dict[str, object]:
    return {
        "driver": "GTiff",
        "width": scene.width,
        "height": scene.height,
        "count": 1,
        "dtype": dtype,
        "nodata": nodata,
        "crs": CRS.from_wkt(scene.crs_wkt),
        "transform": scene.transform,
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "compress": "ZSTD",
        "zstd_level": 1,
        "bigtiff": "IF_SAFER",
    }


Halve = Callable[[NDArray[np.integer], int], NDArray[np.integer]]


class _Pyramid:
    """The overview levels of one streamed raster, made from each block row as it is written.

    Levels of factor up to ``BLOCK`` take ``BLOCK / factor`` rows from every block row and are
    streamed, a strip of those rows at a time, into GeoTIFFs of their own (in any block row
    order). Coarser levels (scenes wider or taller than ``BLOCK^2`` pixels) get less than a row
    from a block row: they are made at :meth:`finish` from the last streamed level, which is then
    at most ``BLOCK^2`` times smaller than the raster.
    """

    def __init__(
        self, stream: Path, scene: SceneInfo, dtype: str, nodata: int, halve: Halve
    ) -> None:
        self._scene, self._dtype, self._nodata, self._halve = scene, dtype, nodata, halve
        self._factors = level_factors(scene.height, scene.width, BLOCK)
        self.paths = [stream.with_name(f"{stream.stem}.ovr{f}.tif") for f in self._factors]
        self._streamed = [f for f in self._factors if f <= BLOCK]
        self._files = [
            rasterio.open(path, "w", **self._profile(factor, BLOCK // factor))
            for factor, path in zip(self._streamed, self.paths[: len(self._streamed)], strict=True)
        ]

    def _profile(self, factor: int, strip_rows: int) -> dict[str, object]:
        """The stream's profile for the level of ``factor``, in strips of ``strip_rows``."""
        profile = _profile(self._scene, self._dtype, self._nodata)
        del profile["blockxsize"]
        return {
            **profile,
            "width": -(-self._scene.width // factor),
            "height": -(-self._scene.height // factor),
            "transform": self._scene.transform @ Affine.scale(factor),
            "tiled": False,
            "blockysize": strip_rows,
        }

    def add(self, row_off: int, values: NDArray[np.integer]) -> None:
        """Halve a block row (it starts at ``row_off``, a multiple of ``BLOCK``) level by level."""
        for factor, level in zip(self._streamed, self._files, strict=True):
            values = self._halve(values, self._nodata)
            rows, cols = values.shape
            level.write(values, 1, window=rasterio.windows.Window(0, row_off // factor, cols, rows))

    def finish(self) -> None:
        """Close the streamed levels and make the coarser ones."""
        self.close()
        streamed = len(self._files)
        if streamed == len(self.paths):
            return
        with rasterio.open(self.paths[streamed - 1]) as last:
            values = last.read(1)
        for factor, path in list(zip(self._factors, self.paths, strict=True))[streamed:]:
            values = self._halve(values, self._nodata)
            with rasterio.open(path, "w", **self._profile(factor, values.shape[0])) as level:
                level.write(values, 1)

    def close(self) -> None:
        for level in self._files:
            level.close()


def _category_sidecar(classes: list[ClassInfo]) -> str:
    names = ["" for _ in range(max(c.id for c in classes) + 1)]
    for c in classes:
        names[c.id] = c.name
    categories = "".join(f"      <Category>{escape(n)}</Category>\n" for n in names)
    return (
        "<PAMDataset>\n"
        '  <PAMRasterBand band="1">\n'
        "    <CategoryNames>\n"
        f"{categories}"
        "    </CategoryNames>\n"
        "  </PAMRasterBand>\n"
        "</PAMDataset>\n"
    )


class ClassRasterWriter:
    """Writes ``mask.tif`` (and ``confidence.tif``) of one scene into ``out_dir``, row by row."""

    def __init__(
        self,
        out_dir: Path,
        scene: SceneInfo,
        classes: list[ClassInfo],
        confidence: bool,
        on_block_row: BlockRowSink | None = None,
    ) -> None:
        """``on_block_row(row_off, class ids, confidence or None)`` gets each block row once it
        is written (in completion order), e.g. to polygonise the mask while it is streamed."""
        self.out_dir = out_dir
        self._on_block_row = on_block_row
        self.scene = scene
        self.classes = classes
        self.dtype, self.nodata = mask_dtype(len(classes))
        self._env = rasterio.Env(**WRITE_ENV)
        self._env.__enter__()
        self._closed = False
        self._mask = rasterio.open(
            out_dir / "mask.stream.tif", "w", **_profile(scene, self.dtype, self.nodata)
        )
        self._conf = (
            rasterio.open(
                out_dir / "confidence.stream.tif",
                "w",
                **_profile(scene, "uint8", CONFIDENCE_NODATA),
            )
            if confidence
            else None
        )
        # The palette goes in before any pixel: GDAL cannot change the photometric tag later.
        self._mask.write_colormap(1, {c.id: (*c.color, 255) for c in classes})
        self._mask_levels = _Pyramid(
            out_dir / "mask.stream.tif", scene, self.dtype, self.nodata, halve_mode
        )
        self._conf_levels = (
            _Pyramid(
                out_dir / "confidence.stream.tif", scene, "uint8", CONFIDENCE_NODATA, halve_mean
            )
            if confidence
            else None
        )
        # Pending block rows: index -> (class ids, confidence or None without it, pixels filled).
        self._rows: dict[int, tuple[NDArray[np.integer], NDArray[np.uint8] | None, int]] = {}
        self.class_pixels = np.zeros(len(classes), dtype=np.int64)

    def write(
        self,
        row_off: int,
        col_off: int,
        class_ids: NDArray[np.integer],
        confidence: NDArray[np.uint8],
    ) -> None:
        """Place a finished block (class ids with nodata set, confidence); flush full block rows."""
        valid = class_ids != self.nodata
        self.class_pixels += np.bincount(class_ids[valid], minlength=len(self.classes))[
            : len(self.classes)
        ]
        rows, cols = class_ids.shape
        start = row_off
        while start < row_off + rows:
            index = start // BLOCK
            stop = min(row_off + rows, (index + 1) * BLOCK)
            if index not in self._rows:
                height = min(BLOCK, self.scene.height - index * BLOCK)
                self._rows[index] = (
                    np.full((height, self.scene.width), self.nodata, dtype=self.dtype),
                    None
                    if self._conf is None
                    else np.full((height, self.scene.width), CONFIDENCE_NODATA, dtype=np.uint8),
                    0,
                )
            ids, conf, filled = self._rows[index]
            local = slice(start - index * BLOCK, stop - index * BLOCK)
            ids[local, col_off : col_off + cols] = class_ids[start - row_off : stop - row_off]
            if conf is not None:
                conf[local, col_off : col_off + cols] = confidence[start - row_off : stop - row_off]
            filled += (stop - start) * cols
            if filled == ids.size:
                del self._rows[index]
                self._flush(index, ids, conf)
            else:
                self._rows[index] = (ids, conf, filled)
            start = stop

    def _flush(self, index: int, ids: NDArray[np.integer], conf: NDArray[np.uint8] | None) -> None:
        window = rasterio.windows.Window(0, index * BLOCK, self.scene.width, ids.shape[0])
        self._mask.write(ids, 1, window=window)
        self._mask_levels.add(index * BLOCK, ids)
        if self._conf is not None and self._conf_levels is not None and conf is not None:
            self._conf.write(conf, 1, window=window)
            self._conf_levels.add(index * BLOCK, conf)
        if self._on_block_row is not None:
            self._on_block_row(index * BLOCK, ids, conf)

    def close(self) -> None:
        """Release files without producing outputs (on failure); safe to call again."""
        self._mask.close()
        self._mask_levels.close()
        if self._conf is not None:
            self._conf.close()
        if self._conf_levels is not None:
            self._conf_levels.close()
        if not self._closed:
            self._closed = True
            self._env.__exit__(None, None, None)

    def close_streams(self) -> None:
        """Check completeness, tag and close the streamed rasters (on the thread that wrote them:
        the GDAL options of the writer are that thread's)."""
        if self._rows:
            missing = sorted(self._rows)
            self.close()
            raise RuntimeError(f"{self.scene.uri}: block rows {missing} were never completed")
        self._mask.update_tags(
            CLASS_NAMES=json.dumps({c.id: c.name for c in self.classes}),
            CLASS_COLORS=json.dumps({c.id: list(c.color) for c in self.classes}),
        )
        self._mask.set_band_description(1, "class")
        if self._conf is not None:
            self._conf.set_band_description(1, "confidence")
            self._conf.update_tags(1, SCALE="255 x max class probability")
        self.close()
        self._mask_levels.finish()
        if self._conf_levels is not None:
            self._conf_levels.finish()

    def write_cogs(self) -> None:
        """Convert the closed streamed rasters to COGs with overviews, plus the sidecar and the
        QGIS style; any thread (a scene's COGs are written while the next scene is inferred)."""
        with rasterio.Env(**WRITE_ENV):
            _to_cog(
                self.out_dir / "mask.stream.tif", self._mask_levels.paths, self.out_dir / "mask.tif"
            )
            if self._conf_levels is not None:
                _to_cog(
                    self.out_dir / "confidence.stream.tif",
                    self._conf_levels.paths,
                    self.out_dir / "confidence.tif",
                )
            # GDAL reports a failed block write (disk full, I/O error) only as a logged error when
            # the file is closed: read every block back, so an incomplete file is never committed.
            _check_readable(self.out_dir / "mask.tif")
            if self._conf is not None:
                _check_readable(self.out_dir / "confidence.tif")
        (self.out_dir / "mask.tif.aux.xml").write_text(_category_sidecar(self.classes))
        # QGIS applies mask.qml to mask.tif: class names as legend labels, the card's colours.
        (self.out_dir / "mask.qml").write_text(paletted_raster_qml(self.classes), encoding="utf-8")


def _read_every_block(dataset: rasterio.DatasetReader) -> None:
    for band in dataset.indexes:
        for _, window in dataset.block_windows(band):
            dataset.read(band, window=window)


def _check_readable(path: Path) -> None:
    """Read every block of every band and overview of ``path``; StorageError if any fails."""
    try:
        with rasterio.open(path) as src:
            _read_every_block(src)
            levels = len(src.overviews(1))
        for level in range(levels):
            with rasterio.open(path, overview_level=level) as overview:
                _read_every_block(overview)
    except (RasterioError, OSError) as exc:
        raise write_failed(path, exc) from exc


def _to_cog(src: Path, overviews: list[Path], dst: Path) -> None:
    """``src`` with ``overviews`` (its levels, finest first) as the COG ``dst``; both removed."""
    try:
        _copy_to_cog(src, overviews, dst)
    except (RasterioError, CPLE_BaseError, OSError) as exc:  # GDAL's: a stream cut short
        raise write_failed(dst, exc) from exc
    for path in (src, *overviews):
        path.unlink()


def _copy_to_cog(src: Path, overviews: list[Path], dst: Path) -> None:
    # GDAL's copy of src as a VRT (in memory) keeps its georeferencing, palette, nodata and tags;
    # the levels are added to its band, and the COG driver takes them instead of its own.
    with MemoryFile(ext=".vrt") as vrt:
        rasterio.shutil.copy(src.resolve(), vrt.name, driver="VRT")
        root = ET.fromstring(vrt.read())
    band = root.find("VRTRasterBand")
    assert band is not None
    for path in overviews:
        overview = ET.SubElement(band, "Overview")
        ET.SubElement(overview, "SourceFilename", relativeToVRT="0").text = str(path.resolve())
        ET.SubElement(overview, "SourceBand").text = "1"
    with rasterio.open(ET.tostring(root, encoding="unicode")) as source:
        rasterio.shutil.copy(
            source,
            dst,
            driver="COG",
            COMPRESS="DEFLATE",
            PREDICTOR="NO",
            BLOCKSIZE=BLOCK,
            OVERVIEWS="FORCE_USE_EXISTING",
            BIGTIFF="IF_SAFER",
            NUM_THREADS=WRITE_THREADS,
        )
