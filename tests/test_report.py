"""Quicklook PNGs and the run report, on real GeoTIFFs and a real run record."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import shared
from numpy.typing import NDArray
from PIL import Image
from rasterio.enums import Resampling

from geoseg.models.card import ClassInfo
from geoseg.report import quicklook, write_report

CLASSES = [
    ClassInfo(id=0, name="water", color=(30, 100, 220)),
    ClassInfo(id=1, name="trees", color=(20, 150, 40)),
    ClassInfo(id=2, name="built", color=(220, 30, 30)),
    ClassInfo(id=3, name="snow", color=(200, 0, 200)),  # never in the masks
]
ALPHA = 0.45
HEIGHT, WIDTH, BORDER = 200, 300, 10
UTM33 = "EPSG:32633"
TRANSFORM = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_100_000.0)


def _write(path: Path, data: NDArray[Any], nodata: int, **extra: Any) -> Path:
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        nodata=nodata,
        crs=extra.pop("crs", UTM33),
        transform=extra.pop("transform", TRANSFORM),
        **extra,
    ) as dst:
        dst.write(data)
    return path


@pytest.fixture
def scene(tmp_path: Path) -> tuple[Path, Path, NDArray[np.uint8]]:
    """RGB image with a 10 px nodata border and a mask: water | trees above, built | none below."""
    rng = np.random.default_rng(7)
    image = rng.integers(1, 256, size=(3, HEIGHT, WIDTH), dtype=np.uint8)
    image[:, :BORDER] = image[:, -BORDER:] = 0
    image[:, :, :BORDER] = image[:, :, -BORDER:] = 0
    mask = np.full((1, HEIGHT, WIDTH), 255, dtype=np.uint8)
    mask[0, BORDER:100, BORDER:150] = 0
    mask[0, BORDER:100, 150:-BORDER] = 1
    mask[0, 100:-BORDER, BORDER:200] = 2  # cols 200.. of the lower half stay unlabelled
    return (
        _write(tmp_path / "scene.tif", image, 0),
        _write(tmp_path / "mask.tif", mask, 255),
        image,
    )


def _stretched(image: NDArray[np.uint8]) -> NDArray[np.float64]:
    """The expected 2-98 percentile stretch of each band over the valid interior."""
    valid = (image > 0).any(axis=0)
    out = np.zeros(image.shape, dtype=np.float64)
    for b in range(3):
        lo, hi = np.percentile(image[b][valid].astype(np.float32), [2, 98])
        out[b] = np.clip((image[b] - lo) * 255.0 / (hi - lo), 0, 255)
    return out


def _panel_colors(png: Image.Image, image_width: int) -> set[tuple[int, int, int]]:
    panel = np.asarray(png.crop((image_width, 0, png.width, png.height)))
    return {tuple(int(v) for v in px) for px in panel.reshape(-1, 3)}


def test_quicklook_blends_classes_and_draws_legend(
    scene: tuple[Path, Path, NDArray[np.uint8]], tmp_path: Path
) -> None:
    image_path, mask_path, image = scene
    out = tmp_path / "quicklooks" / "scene.png"
    quicklook(str(image_path), [1, 2, 3], mask_path, CLASSES, out, alpha=ALPHA)

    png = Image.open(out)
    assert png.mode == "RGB"
    # Smaller than max_size: shown at full resolution, the legend panel to the right.
    assert png.width > WIDTH and png.height >= HEIGHT
    pixels = np.asarray(png).astype(int)
    stretched = _stretched(image)
    trees = np.array(CLASSES[1].color)
    for row, col in [(50, 200), (20, 280), (99, 150)]:  # class 1 (trees)
        expected = np.round((1 - ALPHA) * stretched[:, row, col] + ALPHA * trees)
        np.testing.assert_allclose(pixels[row, col], expected, atol=2)
    # Unlabelled mask (nodata 255) over valid image: the stretched image alone.
    np.testing.assert_allclose(pixels[150, 250], np.round(stretched[:, 150, 250]), atol=2)
    # Input nodata border: black, whatever the mask says.
    assert (pixels[:BORDER, :WIDTH] == 0).all()
    assert (pixels[HEIGHT - BORDER : HEIGHT, :WIDTH] == 0).all()
    assert (pixels[:HEIGHT, :BORDER] == 0).all()

    colors = _panel_colors(png, WIDTH)
    for present in CLASSES[:3]:
        assert present.color in colors
    assert CLASSES[3].color not in colors
    assert not list(tmp_path.glob("quicklooks/.*"))  # no temporary file left


def test_quicklook_decimates_and_grey(
    scene: tuple[Path, Path, NDArray[np.uint8]], tmp_path: Path
) -> None:
    image_path, mask_path, _ = scene
    out = tmp_path / "grey.png"
    quicklook(str(image_path), [2], mask_path, CLASSES, out, max_size=150)

    png = Image.open(out)
    pixels = np.asarray(png).astype(int)
    # 300 x 200 at most 150 on the long side: 150 x 100, the panel beside it.
    assert png.width > 150 and png.height >= 100
    assert (pixels[50, 150] == 255).all()  # the panel starts right after the image ...
    assert not (pixels[50, 149] == 255).all()  # ... which ends at column 149
    unlabelled = pixels[75, 125]  # lower right quarter, no class: grey image value
    assert unlabelled[0] == unlabelled[1] == unlabelled[2]
    assert (pixels[0, :150] == 0).all()  # border row stays black after decimation


def test_quicklook_rejects_two_bands(
    scene: tuple[Path, Path, NDArray[np.uint8]], tmp_path: Path
) -> None:
    image_path, mask_path, _ = scene
    with pytest.raises(ValueError, match="one or three"):
        quicklook(str(image_path), [1, 2], mask_path, CLASSES, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_quicklook_real_naip_scene(tmp_path: Path) -> None:
    naip = shared("naip/m_4709963_se_14_1_20190904.tif")
    with rasterio.open(naip) as src:
        height, width, crs, transform = src.height, src.width, src.crs, src.transform
    # Synthetic classes in vertical stripes: water, trees, built left to right.
    mask = np.zeros((1, height, width), dtype=np.uint8)
    mask[0, :, width // 3 :] = 1
    mask[0, :, 2 * width // 3 :] = 2
    mask_path = _write(tmp_path / "mask.tif", mask, 255, crs=crs, transform=transform, tiled=True)
    with rasterio.open(mask_path, "r+") as dst:
        dst.build_overviews([2, 4], Resampling.mode)

    out = tmp_path / "naip.png"
    quicklook(str(naip), [1, 2, 3], mask_path, CLASSES, out, max_size=256, gdal_env={})

    png = Image.open(out)
    long_side = 256
    short_side = round(min(height, width) * 256 / max(height, width))
    assert png.width > long_side and png.height >= short_side
    pixels = np.asarray(png).astype(int)[:short_side, :long_side]
    # Real imagery: varied, mostly valid content under the blend.
    assert pixels.std() > 10
    assert (pixels.sum(axis=-1) > 0).mean() > 0.5
    colors = _panel_colors(png, long_side)
    assert {c.color for c in CLASSES[:3]} <= colors
    assert CLASSES[3].color not in colors


def _run_record() -> dict[str, Any]:
    def ok(name: str, pixels: dict[str, int], area: float | None, total_s: float) -> dict[str, Any]:
        return {
            "uri": f"/data/{name}.tif",
            "name": name,
            "status": "ok",
            "error": None,
            "error_type": None,
            "height": 1000,
            "width": 2000,
            "tiles": 8,
            "timings_s": {"read_s": 1.0, "infer_s": total_s - 1.0, "total_s": total_s},
            "class_pixels": pixels,
            "polygons": 12,
            "pixel_area_m2": area,
        }

    return {
        "started": "2025-05-01T10:00:00+00:00",
        "finished": "2025-05-01T10:05:00+00:00",
        "model": {"card": {"name": "landcover-unet"}, "weights_sha256": "ab" * 32},
        "summary": {"ok": 3, "failed": 1},
        "scenes": [
            ok("a", {"water": 1000, "trees": 2500, "built": 0, "snow": 0}, 100.0, 10.5),
            ok("b", {"water": 300, "trees": 0, "built": 4200, "snow": 0}, 100.0, 4.25),
            ok("geo", {"water": 7, "trees": 0, "built": 0, "snow": 0}, None, 2.0),
            {
                "uri": "/data/c.tif",
                "name": "c",
                "status": "unchanged",
                "height": 100,
                "width": 100,
                "class_pixels": {"water": 500, "trees": 0, "built": 0, "snow": 0},
                "polygons": 3,
                "pixel_area_m2": 100.0,
            },
            {
                "uri": "/data/d<b>.tif",
                "name": "d_b_",
                "status": "failed",
                "error": "cannot read <script>alert(1)</script> & more",
                "error_type": "RasterReadError",
                "height": None,
                "width": None,
                "tiles": 0,
                "timings_s": {"read_s": 0.25, "total_s": 0.25},
                "class_pixels": {},
                "polygons": None,
                "pixel_area_m2": None,
            },
        ],
    }


def test_write_report(tmp_path: Path) -> None:
    looks = tmp_path / "quicklooks"
    looks.mkdir()
    for name in ("a", "c"):
        Image.new("RGB", (4, 4)).save(looks / f"{name}.png")
    quicklooks = {"a": looks / "a.png", "c": looks / "c.png", "b": looks / "b.png"}  # b: missing

    files = write_report(tmp_path, _run_record(), CLASSES, quicklooks)

    assert files.json == tmp_path / "report.json"
    assert files.html == tmp_path / "report.html"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "quicklooks",
        "report.html",
        "report.json",
    ]
    report = json.loads(files.json.read_text())
    assert report["run"] == {
        "started": "2025-05-01T10:00:00+00:00",
        "finished": "2025-05-01T10:05:00+00:00",
        "model": "landcover-unet",
        "weights_sha256": "ab" * 32,
    }
    assert report["counts"] == {"processed": 3, "unchanged": 1, "failed": 1, "total": 5}
    # Unchanged scenes are part of the map at the output root: c's water counts.
    assert report["area_km2"] == {"water": 0.18, "trees": 0.25, "built": 0.42, "snow": 0.0}
    assert report["area_unmeasured"] == ["geo"]
    assert report["timings_s"] == {"read_s": 3.25, "infer_s": 13.75, "total_s": 17.0}
    by_name = {s["name"]: s for s in report["scenes"]}
    assert [s["name"] for s in report["scenes"]] == ["a", "b", "geo", "c", "d_b_"]
    assert by_name["a"] == {
        "name": "a",
        "uri": "/data/a.tif",
        "status": "ok",
        "message": None,
        "error_type": None,
        "megapixels": 2.0,
        "seconds": 10.5,
        "polygons": 12,
        "area_km2": {"water": 0.1, "trees": 0.25, "built": 0.0, "snow": 0.0},
        "quicklook": "quicklooks/a.png",
    }
    assert by_name["b"]["area_km2"] == {"water": 0.03, "trees": 0.0, "built": 0.42, "snow": 0.0}
    assert by_name["b"]["quicklook"] is None
    assert by_name["geo"]["area_km2"] is None
    assert by_name["c"]["message"] == "unchanged since an earlier run"
    assert by_name["c"]["quicklook"] == "quicklooks/c.png"
    assert by_name["c"]["megapixels"] == 0.01
    assert by_name["c"]["area_km2"] == {"water": 0.05, "trees": 0.0, "built": 0.0, "snow": 0.0}
    assert by_name["d_b_"]["message"] == "cannot read <script>alert(1)</script> & more"
    assert by_name["d_b_"]["error_type"] == "RasterReadError"

    page = files.html.read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    assert "<script" not in page.lower()
    assert "/data/d&lt;b&gt;.tif" in page
    assert page.index("RasterReadError") < page.index("Area per class")
    assert "3</b> processed, <b>1</b> unchanged" in page
    assert re.findall(r"<img src='([^']*)'", page) == ["quicklooks/a.png", "quicklooks/c.png"]
    assert "http" not in page and "<link" not in page  # self-contained
    assert "rgb(220, 30, 30)" in page  # the built swatch
    assert "0.4200" in page and "49.4" in page  # built km² and its share of 0.85 km²
    assert not list(tmp_path.glob(".*"))  # no temporary file left
