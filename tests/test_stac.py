"""STAC inputs: real per-band GeoTIFFs split from Sentinel-2 scenes, and a real HTTP STAC API."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from conftest import shared

from geoseg.errors import ConfigError, InputError
from geoseg.io.stac import scenes_from_api, scenes_from_item_collection

BANDS = ["B02", "B03", "B04", "B08"]


def _split(scene: Path, folder: Path) -> None:
    """One single-band GeoTIFF per band of ``scene``, named by band description (B02.tif...)."""
    folder.mkdir(parents=True)
    with rasterio.open(scene) as src:
        profile = src.profile | {"count": 1}
        for index, description in enumerate(src.descriptions, start=1):
            with rasterio.open(folder / f"{description}.tif", "w", **profile) as dst:
                dst.write(src.read(index), 1)


def _item(item_id: str, hrefs: dict[str, str], **properties: Any) -> dict[str, Any]:
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": item_id,
        "geometry": None,
        "properties": {"datetime": "2015-07-04T10:00:00Z", **properties},
        "links": [],
        "assets": {key: {"href": href, "type": "image/tiff"} for key, href in hrefs.items()},
    }


def _write_collection(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    return path


@pytest.fixture(scope="module")
def split_scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """scene_0 and scene_1 of the Slovenia data, split into per-band files under one root."""
    root = tmp_path_factory.mktemp("bands")
    scenes = {}
    for name in ("scene_0", "scene_1"):
        source = shared(f"sentinel2-l1c-slovenia/{name}.tif")
        _split(source, root / name)
        scenes[name] = source
    return {"root": root, **scenes}


def _two_items(root: Path, **properties: Any) -> list[dict[str, Any]]:
    # scene_0 with hrefs relative to the ItemCollection's folder, scene_1 with absolute paths.
    every = [f"B{n:02d}" for n in range(1, 13)] + ["B8A"]
    return [
        _item("scene_0", {b: f"scene_0/{b}.tif" for b in every}, **properties),
        _item("scene_1", {b: str(root / "scene_1" / f"{b}.tif") for b in every}),
    ]


def test_item_collection_stacks_assets_into_vrt(
    split_scenes: dict[str, Path], tmp_path: Path
) -> None:
    root = split_scenes["root"]
    collection = _write_collection(root / "items.json", _two_items(root))
    scenes = scenes_from_item_collection(collection, BANDS, tmp_path / "vrt")

    assert [s.item_id for s in scenes] == ["scene_0", "scene_1"]
    for scene in scenes:
        assert scene.name == scene.item_id
        assert scene.uri == str(tmp_path / "vrt" / f"{scene.item_id}.vrt")
        with rasterio.open(split_scenes[scene.item_id]) as orig, rasterio.open(scene.uri) as vrt:
            assert vrt.count == 4
            assert vrt.descriptions == tuple(BANDS)
            assert vrt.crs == orig.crs
            assert vrt.transform == orig.transform
            assert vrt.shape == orig.shape
            assert vrt.dtypes == ("uint16",) * 4
            indexes = [orig.descriptions.index(b) + 1 for b in BANDS]
            np.testing.assert_array_equal(vrt.read(), orig.read(indexes))
    assert not list((tmp_path / "vrt").glob("*.tmp"))


def test_identity_tracks_item_and_asset_changes(
    split_scenes: dict[str, Path], tmp_path: Path
) -> None:
    root = split_scenes["root"]
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "scene_0").symlink_to(root / "scene_0")
    items = _two_items(root)

    def identities(items: list[dict[str, Any]]) -> dict[str, str]:
        collection = _write_collection(folder / "items.json", items)
        scenes = scenes_from_item_collection(collection, BANDS, tmp_path / "vrt")
        return {s.item_id: s.identity for s in scenes}

    first = identities(items)
    assert identities(items) == first
    assert first["scene_0"] != first["scene_1"]

    items[1]["assets"]["B03"]["href"] = str(root / "scene_0" / "B03.tif")
    moved = identities(items)
    assert moved["scene_1"] != first["scene_1"]
    assert moved["scene_0"] == first["scene_0"]

    updated = identities(_two_items(root, updated="2024-01-01T00:00:00Z"))
    assert updated["scene_0"] != first["scene_0"]
    assert updated["scene_1"] == first["scene_1"]


def test_mismatched_resolution_is_an_input_error(
    split_scenes: dict[str, Path], tmp_path: Path
) -> None:
    with rasterio.open(split_scenes["root"] / "scene_0" / "B05.tif") as src:
        data = src.read(1)[::2, ::2]
        profile = src.profile | {
            "width": data.shape[1],
            "height": data.shape[0],
            "transform": src.transform @ rasterio.Affine.scale(2),
        }
    coarse = tmp_path / "B05_20m.tif"
    with rasterio.open(coarse, "w", **profile) as dst:
        dst.write(data, 1)
    hrefs = {b: str(split_scenes["root"] / "scene_0" / f"{b}.tif") for b in BANDS}
    collection = _write_collection(
        tmp_path / "items.json", [_item("S2A_20m", hrefs | {"B05": str(coarse)})]
    )
    with pytest.raises(InputError, match=r"'S2A_20m'.*'B05'.*same resolution"):
        scenes_from_item_collection(collection, ["B02", "B05"], tmp_path / "vrt")


def test_missing_asset_lists_available_keys(tmp_path: Path) -> None:
    collection = _write_collection(
        tmp_path / "items.json", [_item("x1", {"B02": "a.tif", "visual": "v.tif"})]
    )
    with pytest.raises(InputError, match=r"'x1' has no asset 'B08'.*B02, visual"):
        scenes_from_item_collection(collection, ["B02", "B08"], tmp_path / "vrt")


def test_single_asset_is_the_file_itself(split_scenes: dict[str, Path], tmp_path: Path) -> None:
    collection = _write_collection(tmp_path / "items.json", _two_items(split_scenes["root"]))
    scenes = scenes_from_item_collection(collection, ["B04"], tmp_path / "vrt")
    # scene_0's relative hrefs resolve against this ItemCollection's folder.
    assert [s.uri for s in scenes] == [
        str(tmp_path / "scene_0" / "B04.tif"),
        str(split_scenes["root"] / "scene_1" / "B04.tif"),
    ]
    assert not (tmp_path / "vrt").exists()


def test_hrefs_map_to_gdal_paths_and_ids_stay_inside_vrt_dir(
    split_scenes: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    band = split_scenes["root"] / "scene_0"
    remote = _item("remote", {"B04": "s3://bucket/key/B04.tif"})
    linked = _item("linked", {"B04": "../data/B04.tif"})
    linked["links"] = [{"rel": "self", "href": "https://stac.example/items/linked.json"}]
    evil = _item("../../evil id", {b: (band / f"{b}.tif").as_uri() for b in BANDS})
    dup = _item("remote", {"B04": "s3://other/B04.tif"})
    collection = _write_collection(tmp_path / "items.json", [remote, linked, evil, dup])

    with caplog.at_level(logging.WARNING, logger="geoseg.io.stac"):
        single = {s.item_id: s for s in scenes_from_item_collection(collection, ["B04"], tmp_path)}
    assert single["remote"].uri == "/vsis3/bucket/key/B04.tif"
    assert single["linked"].uri == "/vsicurl/https://stac.example/data/B04.tif"
    assert "'remote' appears again" in caplog.text

    only_evil = _write_collection(tmp_path / "evil.json", [evil])
    (scene,) = scenes_from_item_collection(only_evil, BANDS, tmp_path / "vrt")
    assert Path(scene.uri).parent == tmp_path / "vrt"
    assert set(scene.name) <= set("abcdefghijklmnopqrstuvwxyz0123456789._-")
    assert not scene.name.startswith(".")
    with rasterio.open(scene.uri) as vrt:
        assert vrt.descriptions == tuple(BANDS)


class _StacApi(BaseHTTPRequestHandler):
    """POST /search answers one item per page, the next page behind a token in a POST body."""

    bodies: list[dict[str, Any]]
    band_path: str

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        if self.path != "/search":
            self._send(500, {"code": "ServerError", "description": "boom"})
            return
        search = f"http://127.0.0.1:{self.server.server_address[1]}/search"
        if body.get("token") == "page2":
            page = {"features": [_item("b", {"B04": self.band_path})], "links": []}
        else:
            next_link = {
                "rel": "next",
                "href": search,
                "method": "POST",
                "body": {"token": "page2"},
                "merge": True,
            }
            page = {"features": [_item("a", {"B04": self.band_path})], "links": [next_link]}
        self._send(200, {"type": "FeatureCollection", **page})

    def _send(self, status: int, document: dict[str, Any]) -> None:
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/geo+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test asserts on what the server received instead."""


@pytest.fixture
def stac_api(split_scenes: dict[str, Path]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    bodies: list[dict[str, Any]] = []
    handler = type(
        "Handler",
        (_StacApi,),
        {"bodies": bodies, "band_path": str(split_scenes["root"] / "scene_0" / "B04.tif")},
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    server.shutdown()
    server.server_close()
    thread.join()


def test_api_search_follows_next_links(
    stac_api: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    base, bodies = stac_api
    scenes = scenes_from_api(
        f"{base}/search",
        ["B04"],
        tmp_path,
        collections=["sentinel-2-l1c"],
        bbox=[14.5, 45.8, 14.6, 45.9],
        datetime="2015",
    )
    assert [s.item_id for s in scenes] == ["a", "b"]
    search = {
        "collections": ["sentinel-2-l1c"],
        "bbox": [14.5, 45.8, 14.6, 45.9],
        "datetime": "2015",
    }
    assert bodies[0] == {**search, "limit": 100}
    assert bodies[1] == {**search, "limit": 100, "token": "page2"}

    bodies.clear()
    (only,) = scenes_from_api(f"{base}/search", ["B04"], tmp_path, max_items=1)
    assert only.item_id == "a"
    assert bodies == [{"limit": 1}]


def test_api_http_error_names_url_and_status(
    stac_api: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    base, _ = stac_api
    with pytest.raises(InputError, match=rf"{base}/broken answered HTTP 500"):
        scenes_from_api(f"{base}/broken", ["B04"], tmp_path)
    with pytest.raises(ConfigError, match="max_items"):
        scenes_from_api(f"{base}/search", ["B04"], tmp_path, max_items=0)


def test_vrt_keeps_each_sources_dtype_and_nodata(
    split_scenes: dict[str, Path], tmp_path: Path
) -> None:
    with rasterio.open(split_scenes["root"] / "scene_0" / "B02.tif") as src:
        profile, data = src.profile, src.read(1)
    with rasterio.open(tmp_path / "u16.tif", "w", **(profile | {"nodata": 0})) as dst:
        dst.write(data, 1)
    floats = profile | {"dtype": "float32", "nodata": float("nan")}
    with rasterio.open(tmp_path / "f32.tif", "w", **floats) as dst:
        dst.write(data.astype("float32"), 1)
    item = _item("mixed", {"u16": "u16.tif", "f32": "f32.tif"})
    collection = _write_collection(tmp_path / "items.json", [item])
    (scene,) = scenes_from_item_collection(collection, ["u16", "f32"], tmp_path / "vrt")
    with rasterio.open(scene.uri) as vrt:
        assert vrt.dtypes == ("uint16", "float32")
        assert vrt.nodatavals[0] == 0
        assert np.isnan(vrt.nodatavals[1])
        np.testing.assert_array_equal(vrt.read(2), data.astype("float32"))
