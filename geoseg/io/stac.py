"""STAC inputs: items of a local ItemCollection or of a STAC API search, as scenes GDAL can open.

Each item becomes one :class:`StacScene`. With one asset key its ``uri`` is that asset's GDAL path;
with several (e.g. Sentinel-2's per-band COGs) it is a VRT stacking band 1 of each asset in the
given order, each band described by its asset key so that geoseg matches it to the model card's
bands. Assets are never resampled: stacked assets must share CRS, transform and size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import rasterio
from rasterio.dtypes import dtype_rev, typename_fwd
from rasterio.errors import RasterioError

from geoseg.errors import ConfigError, InputError, RasterReadError

log = logging.getLogger(__name__)

# Remote assets: without this GDAL lists the asset's "folder" on open, one extra request per file.
_OPEN_ENV = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}

# Page size asked of a STAC API; servers cap it anyway, and small pages keep each response quick.
_PAGE_LIMIT = 100

# Object-store schemes and the GDAL virtual file system that reads them.
_VSI_PREFIX = {"s3": "/vsis3/", "gs": "/vsigs/", "http": "/vsicurl/", "https": "/vsicurl/"}

# Outside [A-Za-z0-9._-], plus a leading dot (hidden files, "." and "..").
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]|^\.")
_MAX_NAME_CHARS = 100


@dataclass(frozen=True)
class StacScene:
    """One STAC item, ready for the pipeline to open."""

    item_id: str
    uri: str  # what rasterio opens: the single asset's GDAL path, or a VRT stacking the assets
    identity: str  # sha256 hex; changes when the item, its timestamp or a used asset changes
    name: str  # output name suggestion: the item id reduced to file-name-safe characters


@dataclass(frozen=True)
class _Asset:
    key: str
    path: str  # GDAL path
    checksum: str | None  # file:checksum, when the item states one


@dataclass(frozen=True)
class _Item:
    item_id: str
    stamp: str | None  # properties.updated, else properties.datetime
    assets: tuple[_Asset, ...]  # the requested assets, in the requested order
    source: str  # the file or URL the item came from, for messages


@dataclass(frozen=True)
class _Request:
    """One HTTP request of a STAC API search: the first POST or a page's 'next' link."""

    url: str
    method: str
    body: dict[str, Any] | None
    headers: dict[str, str]


def scenes_from_item_collection(
    path: Path, assets: Sequence[str], vrt_dir: Path
) -> list[StacScene]:
    """Scenes of the items of a local ItemCollection (a GeoJSON FeatureCollection of STAC items).

    Relative asset hrefs resolve against the item's self link when it has one, else against the
    file's folder. VRTs (several ``assets``) are written to ``vrt_dir``. Sorted by item id.
    """
    keys = _check_assets(assets)
    source = str(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{source}: cannot read the STAC ItemCollection: {exc}") from exc
    except ValueError as exc:
        raise InputError(
            f"{source}: not valid JSON ({exc}); pass a STAC ItemCollection (GeoJSON "
            "FeatureCollection of STAC items)"
        ) from exc
    features = _features(document, source)
    base = path.resolve().as_uri()
    items = [_parse_item(feature, base, source, keys) for feature in features]
    return _scenes(items, vrt_dir)


def scenes_from_api(
    url: str,
    assets: Sequence[str],
    vrt_dir: Path,
    *,
    collections: Sequence[str] = (),
    bbox: Sequence[float] | None = None,
    datetime: str | None = None,
    query: Mapping[str, Any] | None = None,
    max_items: int = 1000,
    timeout_s: float = 30.0,
) -> list[StacScene]:
    """Scenes of the items a STAC API search returns, following ``next`` links up to ``max_items``.

    ``url`` is the search endpoint itself (``.../search``); the search is a POST of ``collections``,
    ``bbox``, ``datetime`` and ``query`` (those given). Sorted by item id.
    """
    keys = _check_assets(assets)
    if urlsplit(url).scheme not in ("http", "https"):
        raise ConfigError(f"STAC API URL {_redact(url)!r} is not http(s); pass the /search URL")
    if max_items < 1:
        raise ConfigError(f"max_items must be at least 1, got {max_items}")
    if bbox is not None and len(bbox) not in (4, 6):
        raise ConfigError(
            f"bbox must have 4 numbers (west, south, east, north) or 6 (with heights), "
            f"got {list(bbox)}"
        )
    body: dict[str, Any] = {"limit": min(max_items, _PAGE_LIMIT)}
    if collections:
        body["collections"] = list(collections)
    if bbox is not None:
        body["bbox"] = [float(v) for v in bbox]
    if datetime is not None:
        body["datetime"] = datetime
    if query is not None:
        body["query"] = dict(query)

    items: list[_Item] = []
    request: _Request | None = _Request(url, "POST", body, {})
    seen: set[str] = set()
    while request is not None and len(items) < max_items:
        fingerprint = json.dumps([request.url, request.method, request.body], sort_keys=True)
        if fingerprint in seen:
            raise InputError(
                f"STAC API {_redact(request.url)}: the 'next' link repeats an earlier page, so "
                "paging would not end; lower max_items or report it to the API's operator"
            )
        seen.add(fingerprint)
        page = _fetch_json(request, timeout_s)
        source = _redact(request.url)
        features = _features(page, source)
        for feature in features[: max_items - len(items)]:
            items.append(_parse_item(feature, request.url, source, keys))
        request = _next_request(page, request, source)
    return _scenes(items, vrt_dir)


def _check_assets(assets: Sequence[str]) -> tuple[str, ...]:
    # A bare string is a Sequence[str] too; it would silently become one key per character.
    if isinstance(assets, str) or not assets:
        raise ConfigError(f"assets must be a non-empty list of asset keys, got {assets!r}")
    keys = tuple(assets)
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ConfigError(f"asset keys repeat: {', '.join(duplicates)}; name each asset once")
    return keys


def _features(document: Any, source: str) -> list[Any]:
    features = document.get("features") if isinstance(document, dict) else None
    if not isinstance(features, list):
        raise InputError(
            f"{source}: not a STAC ItemCollection (no 'features' list); expected a GeoJSON "
            "FeatureCollection of STAC items"
        )
    return features


def _parse_item(feature: Any, base: str, source: str, keys: tuple[str, ...]) -> _Item:
    """Validate one STAC item and resolve the requested assets to GDAL paths."""
    if not isinstance(feature, dict) or not isinstance(feature.get("id"), str) or not feature["id"]:
        raise InputError(f"{source}: a feature has no string 'id'; every STAC item needs one")
    item_id: str = feature["id"]
    item_assets = feature.get("assets")
    if not isinstance(item_assets, dict):
        raise InputError(
            f"{source}: item {item_id!r} has no 'assets' object; it is not a STAC item"
        )
    properties = feature.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    stamp = properties.get("updated") or properties.get("datetime")
    base = _self_href(feature, base) or base

    resolved: list[_Asset] = []
    for key in keys:
        asset = item_assets.get(key)
        if asset is None:
            available = ", ".join(sorted(item_assets)) or "(none)"
            raise InputError(
                f"{source}: item {item_id!r} has no asset {key!r}; its assets are: {available}. "
                "Pass asset keys that every item has"
            )
        href = asset.get("href") if isinstance(asset, dict) else None
        if not isinstance(href, str) or not href:
            raise InputError(
                f"{source}: item {item_id!r}, asset {key!r} has no string 'href'; fix the item"
            )
        checksum = asset.get("file:checksum")
        path = _gdal_path(_urljoin_any(base, href), source, item_id, key)
        resolved.append(_Asset(key, path, checksum if isinstance(checksum, str) else None))
    return _Item(item_id, str(stamp) if stamp else None, tuple(resolved), source)


def _self_href(feature: dict[str, Any], base: str) -> str | None:
    links = feature.get("links")
    for link in links if isinstance(links, list) else []:
        if isinstance(link, dict) and link.get("rel") == "self":
            href = link.get("href")
            if isinstance(href, str) and href:
                return _urljoin_any(base, href)
    return None


def _urljoin_any(base: str, href: str) -> str:
    """``href`` resolved against ``base`` as a URL, for object-store schemes (s3://, gs://) too."""
    if urlsplit(href).scheme:
        return href
    parts = urlsplit(base)
    if parts.scheme in ("http", "https", "file"):
        return urljoin(base, href)
    # urljoin resolves only schemes it knows; object stores follow the same path rules as https.
    joined = urlsplit(urljoin(urlunsplit(("https", parts.netloc, parts.path, "", "")), href))
    return urlunsplit((parts.scheme, joined.netloc, joined.path, joined.query, ""))


def _gdal_path(url: str, source: str, item_id: str, key: str) -> str:
    """The path GDAL opens for an absolute asset URL."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return unquote(parts.path)
    if parts.scheme in ("s3", "gs"):
        return f"{_VSI_PREFIX[parts.scheme]}{parts.netloc}{parts.path}"
    if parts.scheme in ("http", "https"):
        return f"{_VSI_PREFIX[parts.scheme]}{url}"
    raise InputError(
        f"{source}: item {item_id!r}, asset {key!r}: href {_redact(url)!r} has a scheme geoseg "
        "cannot read; use a local path, file://, s3://, gs:// or http(s)://"
    )


def _redact(url: str) -> str:
    """``url`` without user info or query, which may carry credentials or signatures."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", ""))


def _scenes(items: list[_Item], vrt_dir: Path) -> list[StacScene]:
    unique: dict[str, _Item] = {}
    for item in items:
        if item.item_id in unique:
            log.warning(
                "%s: item id %r appears again; keeping the first one", item.source, item.item_id
            )
            continue
        unique[item.item_id] = item
    return [_scene(unique[item_id], vrt_dir) for item_id in sorted(unique)]


def _scene(item: _Item, vrt_dir: Path) -> StacScene:
    digest = hashlib.sha256(
        json.dumps(
            [item.item_id, item.stamp, [[a.key, a.path, a.checksum] for a in item.assets]]
        ).encode()
    ).hexdigest()
    name = _safe_name(item.item_id)
    if len(item.assets) == 1:
        uri = item.assets[0].path
    else:
        vrt_path = vrt_dir / f"{name}.vrt"
        _write_atomic(vrt_path, _stack_vrt(item))
        uri = str(vrt_path)
    return StacScene(item_id=item.item_id, uri=uri, identity=digest, name=name)


def _safe_name(item_id: str) -> str:
    """A file name stem for ``item_id``: only [A-Za-z0-9._-], no leading dot, bounded length."""
    name = _UNSAFE_NAME_CHARS.sub("_", item_id)
    if name != item_id or len(name) > _MAX_NAME_CHARS:
        # A hash of the original keeps two ids that reduce to the same characters apart.
        suffix = hashlib.sha256(item_id.encode()).hexdigest()[:10]
        name = f"{name[:_MAX_NAME_CHARS]}-{suffix}"
    return name


def _stack_vrt(item: _Item) -> bytes:
    """VRT XML stacking band 1 of each asset, on the first asset's grid (checked, not resampled)."""
    grid: tuple[Any, Any, int, int] | None = None
    bands: list[ET.Element] = []
    first_key = item.assets[0].key
    for number, asset in enumerate(item.assets, start=1):
        where = f"{item.source}: item {item.item_id!r}, asset {asset.key!r} ({asset.path})"
        try:
            with rasterio.Env(**_OPEN_ENV), rasterio.open(asset.path) as src:
                crs, transform, width, height = src.crs, src.transform, src.width, src.height
                count, dtype, nodata = src.count, src.dtypes[0], src.nodata
                block_height, block_width = src.block_shapes[0]
        except RasterioError as exc:
            raise RasterReadError(f"{where}: cannot open as a raster: {exc}") from exc
        if count != 1:
            raise InputError(
                f"{where}: has {count} bands, but stacking takes single-band assets; request a "
                "multi-band asset on its own"
            )
        if grid is None:
            grid = (crs, transform, width, height)
        elif (
            crs != grid[0]
            or (width, height) != (grid[2], grid[3])
            # A thousandth of a pixel: float noise in the geotransform, not a different grid.
            or not transform.almost_equals(grid[1], precision=abs(grid[1].a) * 1e-3)
        ):
            raise InputError(
                f"{where}: grid {width}x{height} at {transform.a:g} x {-transform.e:g} "
                f"({crs}) differs from asset {first_key!r}: {grid[2]}x{grid[3]} at "
                f"{grid[1].a:g} x {-grid[1].e:g} ({grid[0]}). Pick assets of the same "
                "resolution or resample them to one grid first"
            )
        band = ET.Element(
            "VRTRasterBand", dataType=typename_fwd[dtype_rev[dtype]], band=str(number)
        )
        ET.SubElement(band, "Description").text = asset.key
        if nodata is not None:
            ET.SubElement(band, "NoDataValue").text = repr(nodata)
        source = ET.SubElement(band, "SimpleSource")
        ET.SubElement(source, "SourceFilename", relativeToVRT="0").text = asset.path
        ET.SubElement(source, "SourceBand").text = "1"
        # Stating the source's size and blocks lets GDAL defer opening it until pixels are read.
        ET.SubElement(
            source,
            "SourceProperties",
            RasterXSize=str(width),
            RasterYSize=str(height),
            DataType=typename_fwd[dtype_rev[dtype]],
            BlockXSize=str(block_width),
            BlockYSize=str(block_height),
        )
        window = {"xOff": "0", "yOff": "0", "xSize": str(width), "ySize": str(height)}
        ET.SubElement(source, "SrcRect", window)
        ET.SubElement(source, "DstRect", window)
        bands.append(band)
    assert grid is not None  # _check_assets guarantees at least one asset
    crs, transform, width, height = grid
    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    if crs is not None:
        ET.SubElement(root, "SRS").text = crs.to_wkt()
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(v) for v in transform.to_gdal())
    root.extend(bands)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode").encode()


def _write_atomic(path: Path, data: bytes) -> None:
    # A reader (another worker) never sees a half-written VRT: write aside, then rename over.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _fetch_json(request: _Request, timeout_s: float) -> Any:
    shown = _redact(request.url)
    data = None if request.body is None else json.dumps(request.body).encode()
    headers = {"Accept": "application/geo+json, application/json", **request.headers}
    if data is not None:
        headers["Content-Type"] = "application/json"
    http_request = urllib.request.Request(
        request.url, data=data, headers=headers, method=request.method
    )
    try:
        with urllib.request.urlopen(http_request, timeout=timeout_s) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read(500).decode("utf-8", "replace").strip()
        message = f"STAC API {request.method} {shown} answered HTTP {exc.code}: {detail}"
        if exc.code >= 500:
            raise InputError(f"{message}. The server failed; retry later") from exc
        # 4xx: the server rejects what we asked (collection, bbox, datetime, query or access).
        raise ConfigError(f"{message}. Check the search parameters and the URL") from exc
    except (urllib.error.URLError, TimeoutError) as exc:
        raise ConfigError(
            f"STAC API {request.method} {shown}: cannot connect ({exc}); check the URL"
        ) from exc
    try:
        return json.loads(payload)
    except ValueError as exc:
        raise InputError(
            f"STAC API {request.method} {shown}: the answer is not JSON ({exc}); is this the "
            "search endpoint (…/search)?"
        ) from exc


def _next_request(page: Any, previous: _Request, source: str) -> _Request | None:
    """The request for the page after ``page``, from its ``next`` link (STAC API item search)."""
    links = page.get("links") if isinstance(page, dict) else None
    for link in links if isinstance(links, list) else []:
        if not (isinstance(link, dict) and link.get("rel") == "next"):
            continue
        href = link.get("href")
        if not isinstance(href, str) or not href:
            raise InputError(f"{source}: a 'next' link has no 'href'; the API's paging is broken")
        method = str(link.get("method", "GET")).upper()
        body = link.get("body")
        if method == "POST" and isinstance(body, dict):
            # merge=true: the link's body holds only what changes (the token) on top of ours.
            body = {**(previous.body or {}), **body} if link.get("merge") else body
        elif method == "POST":
            body = previous.body
        else:
            body = None
        headers = link.get("headers")
        headers = {str(k): str(v) for k, v in headers.items()} if isinstance(headers, dict) else {}
        return _Request(urljoin(previous.url, href), method, body, headers)
    return None
