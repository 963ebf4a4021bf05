"""Run report at the output root: ``report.json``, ``report.html`` and quicklook PNGs.

Written at the end of every ``geoseg run`` from the run record (``run.json``), so a person sees
first what failed and why, then how much ground each class covers, then every scene.

``report.json``::

    {
      "run": {"started": str|null, "finished": str|null,
              "model": str|null,            # the card's name
              "weights_sha256": str|null},
      "counts": {"processed": int,          # scenes segmented in this run (status "ok")
                 "unchanged": int,          # scenes skipped (outputs of an earlier run kept)
                 "failed": int, "total": int},
      "scenes": [{"name": str|null, "uri": str,
                  "status": "ok"|"unchanged"|"failed",
                  "message": str|null,      # the error message, or that it is unchanged
                  "error_type": str|null,
                  "megapixels": float|null, # height x width / 1e6, 3 decimals
                  "seconds": float|null,    # timings_s.total_s
                  "polygons": int|null,
                  "area_km2": {class: float}|null,  # null: failed, or the
                                                    # grid is geographic (no constant pixel area)
                  "quicklook": str|null}],  # path relative to the report, "quicklooks/<name>.png"
      "area_km2": {class: float},           # summed over "ok" and "unchanged" scenes (the whole
                                            # map at the output root) whose area_km2 is not null
      "area_unmeasured": [str],             # names of those scenes left out of area_km2
      "timings_s": {stage: float}           # each timings_s key summed over all scenes
    }

Areas are ``class_pixels x pixel_area_m2 / 1e6``, rounded to 6 decimals (1 m²), listed for every
class of the card in class-id order (0.0 where absent), then any other class name a scene reports.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from rasterio.enums import Resampling

from geoseg.errors import InputError
from geoseg.io.outputs import write_json_atomic
from geoseg.io.vectors import complete_classes
from geoseg.models.card import ClassInfo

__all__ = [
    "QUICKLOOK_DIR",
    "REPORT_HTML",
    "REPORT_JSON",
    "ReportFiles",
    "quicklook",
    "write_report",
]

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
# Scenes whose committed outputs are part of the map at the output root.
_MAPPED = ("ok", "unchanged")
QUICKLOOK_DIR = "quicklooks"

_STRETCH_PERCENTILES = (2.0, 98.0)
_FONT_SIZE = 14
_TITLE_SIZE = 16
_PAD = 8
_SWATCH = 14
_ROW = 20
_TITLE_CHARS = 60  # longer scene names are shortened so the legend panel stays narrow
_PANEL_BG = (255, 255, 255)
_TEXT = (20, 20, 20)
_UNKNOWN_COLOR = (160, 160, 160)  # swatch of a class name the card does not list


@dataclass(frozen=True)
class ReportFiles:
    """The files :func:`write_report` wrote."""

    json: Path
    html: Path


def _decimated_shape(height: int, width: int, max_size: int) -> tuple[int, int]:
    # Never upsampled: a small scene is shown at its own resolution.
    scale = min(1.0, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _stretch(band: NDArray[np.float32], valid: NDArray[np.bool_]) -> NDArray[np.float32]:
    """``band`` mapped to 0..255 by its 2-98 percentiles over ``valid`` pixels."""
    if not valid.any():
        return np.zeros(band.shape, dtype=np.float32)
    lo, hi = (float(v) for v in np.percentile(band[valid], _STRETCH_PERCENTILES))
    if hi <= lo:
        # A flat band has no contrast to stretch; mid-grey shows it is there, unlike black.
        return np.full(band.shape, 128.0, dtype=np.float32)
    scaled: NDArray[np.float32] = (band - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(scaled, np.float32(0.0), np.float32(255.0))


def _read_image(
    src: rasterio.DatasetReader, indexes: Sequence[int], shape: tuple[int, int]
) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """The stretched RGB image (H, W, 3) at ``shape`` and where it is valid."""
    data = src.read(list(indexes), out_shape=(len(indexes), *shape), resampling=Resampling.average)
    masks = src.read_masks(
        list(indexes), out_shape=(len(indexes), *shape), resampling=Resampling.nearest
    )
    # A pixel is shown when any of its displayed bands has data (as GDAL's dataset mask does).
    valid = (masks > 0).any(axis=0)
    bands = [_stretch(band.astype(np.float32), valid) for band in data]
    if len(bands) == 1:
        bands = bands * 3
    rgb = np.stack(bands, axis=-1)
    rgb[~valid] = 0.0
    return np.round(rgb).astype(np.uint8), valid


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font: nothing to find on the system or download.
    return ImageFont.load_default(size=size)


def _legend_canvas(
    image: NDArray[np.uint8], title: str, entries: Sequence[ClassInfo]
) -> Image.Image:
    """``image`` at the top left, a panel to its right with the title and one row per class."""
    font, title_font = _font(_FONT_SIZE), _font(_TITLE_SIZE)
    if len(title) > _TITLE_CHARS:
        title = title[: _TITLE_CHARS - 1] + "…"
    text_w = max(
        [title_font.getlength(title)] + [_SWATCH + _PAD + font.getlength(c.name) for c in entries]
    )
    panel_w = math.ceil(text_w) + 2 * _PAD
    panel_h = _PAD + _ROW + _PAD + len(entries) * _ROW + _PAD
    height, width = image.shape[:2]
    canvas = Image.new("RGB", (width + panel_w, max(height, panel_h)), _PANEL_BG)
    canvas.paste(Image.fromarray(image, mode="RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = width + _PAD
    draw.text((x, _PAD), title, fill=_TEXT, font=title_font)
    y = _PAD + _ROW + _PAD
    for c in entries:
        top = y + (_ROW - _SWATCH) // 2
        draw.rectangle((x, top, x + _SWATCH - 1, top + _SWATCH - 1), fill=c.color, outline=_TEXT)
        draw.text((x + _SWATCH + _PAD, y + 2), c.name, fill=_TEXT, font=font)
        y += _ROW
    return canvas


def quicklook(
    image_path: str,
    band_indexes: Sequence[int] | None,
    mask_path: Path,
    classes: Sequence[ClassInfo],
    out_png: Path,
    *,
    max_size: int = 1024,
    gdal_env: Mapping[str, str] | None = None,
    alpha: float = 0.45,
) -> None:
    """Write a PNG of the scene with its classes blended over it and a legend beside it.

    The input and the mask are read decimated (``out_shape``, so GDAL uses overviews where there
    are any), at most ``max_size`` pixels on the long side. Each displayed band is stretched by
    its 2-98 percentiles over valid pixels; each class's colour is blended over the image with
    weight ``alpha``; mask nodata shows the image alone, input nodata is black. The image sits at
    the PNG's top left; the panel to its right holds the title (the PNG's stem, the scene name)
    and a swatch with the name of every class present in the quicklook.

    Args:
        image_path: The input raster (path or GDAL URI).
        band_indexes: 1-based bands shown as red, green, blue (three), or one band as grey; None:
            the first three bands, or band 1 of a raster with fewer.
        mask_path: The scene's class-id raster (same grid as the input).
        classes: Names and colours per class id.
        out_png: The PNG to write (replaced atomically; its folder is created).
        max_size: Longest side of the image part in pixels.
        gdal_env: GDAL configuration options for the reads (e.g. S3 credentials, cache size).
        alpha: Opacity of the class colours.

    Raises:
        InputError: ``band_indexes`` is not one or three bands of the input.
    """
    with rasterio.Env(**(gdal_env or {})):
        with rasterio.open(image_path) as src:
            if band_indexes is None:
                indexes: Sequence[int] = (1, 2, 3) if src.count >= 3 else (1,)
            else:
                indexes = band_indexes
            if len(indexes) not in (1, 3) or any(not 1 <= i <= src.count for i in indexes):
                raise InputError(
                    f"{image_path}: quicklook bands {list(indexes)} must be one or three of "
                    f"the raster's bands 1..{src.count}"
                )
            shape = _decimated_shape(src.height, src.width, max_size)
            rgb, valid = _read_image(src, indexes, shape)
        with rasterio.open(mask_path) as msk:
            ids = msk.read(1, out_shape=shape, resampling=Resampling.nearest)
            mask_nodata = msk.nodata
    labelled = valid if mask_nodata is None else valid & (ids != mask_nodata)
    present = [int(i) for i in np.unique(ids[labelled])]
    shown = set(present)
    entries = [c for c in complete_classes(classes, present) if c.id in shown]
    lut = np.zeros((max(present, default=0) + 1, 3), dtype=np.float32)
    for c in entries:
        lut[c.id] = c.color
    blended = rgb.astype(np.float32)
    blended[labelled] = (1.0 - alpha) * blended[labelled] + alpha * lut[ids[labelled]]
    image = np.round(blended).astype(np.uint8)
    canvas = _legend_canvas(image, out_png.stem, entries)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp-{os.getpid()}")
    try:
        canvas.save(tmp, format="PNG")
        tmp.replace(out_png)
    finally:
        tmp.unlink(missing_ok=True)


def _km2(pixels: int, pixel_area_m2: float) -> float:
    return round(pixels * pixel_area_m2 / 1e6, 6)


def _class_names(classes: Sequence[ClassInfo], scenes: Sequence[Mapping[str, Any]]) -> list[str]:
    names = [c.name for c in sorted(classes, key=lambda c: c.id)]
    for scene in scenes:
        names += [n for n in scene.get("class_pixels") or {} if n not in names]
    return names


def _relative(path: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(path, out_dir)).as_posix()


def _scene_entry(
    scene: Mapping[str, Any], names: Sequence[str], quicklooks: Mapping[str, Path], out_dir: Path
) -> dict[str, Any]:
    status = scene.get("status")
    name = scene.get("name")
    height, width = scene.get("height"), scene.get("width")
    pixel_area = scene.get("pixel_area_m2")
    area: dict[str, float] | None = None
    if status in _MAPPED and pixel_area is not None:
        pixels = scene.get("class_pixels") or {}
        area = {n: _km2(int(pixels.get(n, 0)), float(pixel_area)) for n in names}
    png = quicklooks.get(name) if name is not None else None
    return {
        "name": name,
        "uri": scene.get("uri"),
        "status": status,
        "message": "unchanged since an earlier run"
        if status == "unchanged"
        else scene.get("error"),
        "error_type": scene.get("error_type"),
        "megapixels": round(height * width / 1e6, 3) if height and width else None,
        "seconds": (scene.get("timings_s") or {}).get("total_s"),
        "polygons": scene.get("polygons"),
        "area_km2": area,
        # Only an existing file: a broken image in the page helps nobody.
        "quicklook": _relative(png, out_dir) if png is not None and png.is_file() else None,
    }


def _report_json(
    out_dir: Path,
    run: Mapping[str, Any],
    classes: Sequence[ClassInfo],
    quicklooks: Mapping[str, Path],
) -> dict[str, Any]:
    scenes: Sequence[Mapping[str, Any]] = run.get("scenes") or []
    names = _class_names(classes, scenes)
    model = run.get("model") or {}
    entries = [_scene_entry(s, names, quicklooks, out_dir) for s in scenes]
    # Square metres summed before the one division, so totals do not collect rounding.
    total_m2 = dict.fromkeys(names, 0.0)
    unmeasured: list[str] = []
    for scene in scenes:
        if scene.get("status") not in _MAPPED:
            continue
        if scene.get("pixel_area_m2") is None:
            unmeasured.append(str(scene.get("name") or scene.get("uri")))
            continue
        for n, count in (scene.get("class_pixels") or {}).items():
            total_m2[n] += int(count) * float(scene["pixel_area_m2"])
    timings: dict[str, float] = {}
    for scene in scenes:
        for stage, seconds in (scene.get("timings_s") or {}).items():
            timings[stage] = timings.get(stage, 0.0) + float(seconds)
    statuses = [s.get("status") for s in scenes]
    return {
        "run": {
            "started": run.get("started"),
            "finished": run.get("finished"),
            "model": (model.get("card") or {}).get("name"),
            "weights_sha256": model.get("weights_sha256"),
        },
        "counts": {
            "processed": statuses.count("ok"),
            "unchanged": statuses.count("unchanged"),
            "failed": statuses.count("failed"),
            "total": len(statuses),
        },
        "scenes": entries,
        "area_km2": {n: round(m2 / 1e6, 6) for n, m2 in total_m2.items()},
        "area_unmeasured": unmeasured,
        "timings_s": {stage: round(s, 3) for stage, s in timings.items()},
    }


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 1em; height: 1em; border: 1px solid #333;
          vertical-align: middle; }
.failed { color: #b00020; }
pre { white-space: pre-wrap; margin: 0; font-size: 0.9em; }
figure { display: inline-block; margin: 0 1em 1em 0; }
figure img { max-width: 100%; border: 1px solid #ccc; }
"""


def _e(value: Any) -> str:
    """Any run value as HTML text: scene names, URIs and messages come from outside."""
    return html.escape("" if value is None else str(value), quote=True)


def _failed_class(failed: bool) -> str:
    return " class='failed'" if failed else ""


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table; ``rows`` hold cells already rendered (``<td>...</td>``)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(f"<tr>{''.join(row)}</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


def _report_html(report: Mapping[str, Any], classes: Sequence[ClassInfo]) -> str:
    info, counts, scenes = report["run"], report["counts"], report["scenes"]
    parts = [
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n",
        f"<title>geoseg report: {_e(info['model'])}</title>\n<style>{_CSS}</style>\n",
        "</head>\n<body>\n<h1>geoseg run report</h1>\n<p>",
        f"Started {_e(info['started'])}, finished {_e(info['finished'])}.<br>",
        f"Model <b>{_e(info['model'])}</b>, weights sha256 <code>"
        f"{_e(info['weights_sha256'])}</code>.</p>\n",
        f"<p><b>{counts['processed']}</b> processed, <b>{counts['unchanged']}</b> unchanged, "
        f"<b{_failed_class(counts['failed'] > 0)}>{counts['failed']}</b> failed "
        f"of {counts['total']} scenes.</p>\n",
    ]
    # Failures first: they are what needs someone's attention.
    failed = [s for s in scenes if s["status"] == "failed"]
    parts.append("<h2>Failed scenes</h2>\n")
    if failed:
        rows = [
            [
                f"<td>{_e(s['name'] or s['uri'])}<br><small>{_e(s['uri'])}</small></td>",
                f"<td>{_e(s['error_type'])}</td>",
                f"<td><pre>{_e(s['message'])}</pre></td>",
            ]
            for s in failed
        ]
        parts.append(_table(["Scene", "Error", "Message"], rows))
    else:
        parts.append("<p>No scene failed.</p>\n")

    colors = {c.name: c.color for c in classes}
    areas: Mapping[str, float] = report["area_km2"]
    total = sum(areas.values())
    parts.append("<h2>Area per class</h2>\n")
    rows = []
    for name, km2 in areas.items():
        r, g, b = colors.get(name, _UNKNOWN_COLOR)
        share = 100.0 * km2 / total if total > 0 else None
        rows.append(
            [
                f"<td><span class='swatch' style='background: rgb({r}, {g}, {b})'></span></td>",
                f"<td>{_e(name)}</td>",
                f"<td class='num'>{_num(km2, 4)}</td>",
                f"<td class='num'>{_num(share, 1)}</td>",
            ]
        )
    parts.append(_table(["", "Class", "km²", "Share %"], rows))
    if report["area_unmeasured"]:
        parts.append(
            "<p>Not in the areas (geographic grid, no constant pixel area): "
            f"{_e(', '.join(report['area_unmeasured']))}.</p>\n"
        )

    parts.append("<h2>Scenes</h2>\n")
    rows = [
        [
            f"<td>{_e(s['name'] or s['uri'])}</td>",
            f"<td{_failed_class(s['status'] == 'failed')}>{_e(s['status'])}</td>",
            f"<td class='num'>{_num(s['megapixels'], 2)}</td>",
            f"<td class='num'>{_num(s['seconds'], 1)}</td>",
            f"<td class='num'>{_e(s['polygons'])}</td>",
            # Skipped: why; failed: the error's kind (its message is in the table above).
            f"<td>{_e(s['message'] if s['status'] == 'unchanged' else s['error_type'])}</td>",
        ]
        for s in scenes
    ]
    parts.append(_table(["Scene", "Status", "MP", "Seconds", "Polygons", "Note"], rows))

    looks = [s for s in scenes if s["quicklook"]]
    if looks:
        parts.append("<h2>Quicklooks</h2>\n")
        for s in looks:
            parts.append(
                f"<figure><img src='{_e(s['quicklook'])}' alt='{_e(s['name'])}' loading='lazy'>"
                f"<figcaption>{_e(s['name'])} ({_e(s['status'])})</figcaption></figure>\n"
            )
    parts.append("</body>\n</html>\n")
    return "".join(parts)


def write_report(
    out_dir: Path,
    run: Mapping[str, Any],
    classes: Sequence[ClassInfo],
    quicklooks: Mapping[str, Path],
) -> ReportFiles:
    """Write ``report.json`` and ``report.html`` into ``out_dir``, each replaced atomically.

    Args:
        out_dir: The output root (the quicklooks are linked relative to it).
        run: The run record (``run.json``): ``started``, ``finished``, ``model``, ``scenes``.
        classes: The model's classes (names and colours; their order orders the area table).
        quicklooks: Scene name -> its quicklook PNG; missing files are left out.

    Returns:
        The two files written.
    """
    report = _report_json(out_dir, run, classes, quicklooks)
    json_path = out_dir / REPORT_JSON
    write_json_atomic(json_path, report)
    html_path = out_dir / REPORT_HTML
    tmp = html_path.with_name(f".{html_path.name}.tmp-{os.getpid()}")
    tmp.write_text(_report_html(report, classes), encoding="utf-8")
    tmp.replace(html_path)
    return ReportFiles(json=json_path, html=html_path)
