"""STAC catalogs as lists of items: a STAC Item, ItemCollection, Collection or Catalog JSON (a local path,
file:// or http(s)://; child and item links walked, each document once), or a stac-geoparquet file
(data/stac_parquet.py), and which of an item's assets are read as R, G, B.

- An asset is named by its key (`B04`, `red`) or by a band's common name (`eo:bands` of STAC 1.0, or `bands`
  with `eo:common_name` of STAC 1.1): band k of an asset's file is its k-th listed band. One name: a grey band.
- A document that cannot be read or is not STAC rejects that item (or the links under it) by name, in one line;
  the rest goes on. Only the catalog's root failing stops the listing.
- Over HTTP: GET with the environment's GDAL_HTTP_HEADERS (credentials stay in the environment), retried with
  backoff on 5xx, resets and timeouts (GDAL_HTTP_MAX_RETRY, GDAL_HTTP_RETRY_DELAY, GDAL_HTTP_TIMEOUT, as GDAL
  reads the assets); URLs are named without user, password or query (windows.shown).
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from duch.data.records import DatasetError, Reject
from duch.data.scene_dates import parse_date

CATALOG_SUFFIXES = (".json", ".geojson", ".parquet", ".geoparquet")
DEFAULT_ASSETS = ("red", "green", "blue")
MAX_DOCUMENTS = 1_000_000  # links followed at most: a catalog linking to itself in a cycle is walked once anyway
UNREACHABLE = "unreachable: "  # as data/windows.py marks a reject a rerun tries again


def is_catalog(data: str | os.PathLike) -> bool:
    """Whether `data` names a STAC catalog (or a stac-geoparquet file) rather than GeoTIFF scenes."""
    text = os.fspath(data)
    return text.startswith(("http://", "https://", "file://")) or Path(text).suffix.lower() in CATALOG_SUFFIXES


def is_url(href: str) -> bool:
    return href.startswith(("http://", "https://"))


def shown(href: str) -> str:
    """A URL without user:password, query or fragment (signed URLs carry their credentials in the query)."""
    if not is_url(href):
        return href
    parts = urllib.parse.urlsplit(href)
    netloc = f"{parts.hostname}:{parts.port}" if parts.port else (parts.hostname or "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def resolve(base: str, href: str) -> str:
    """`href` as written in the document at `base`, made absolute (a URL, or a local path)."""
    if is_url(href) or os.path.isabs(href):
        return href
    if href.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlsplit(href).path)
    if is_url(base):
        return urllib.parse.urljoin(base, href)
    return os.path.normpath(os.path.join(os.path.dirname(base), href))


def _http_settings() -> tuple[int, float, float, dict[str, str]]:
    env = os.environ
    headers = {}
    for line in env.get("GDAL_HTTP_HEADERS", "").replace("\r\n", "\n").split("\n"):
        name, _, value = line.partition(":")
        if name.strip() and value.strip():
            headers[name.strip()] = value.strip()
    return (int(env.get("GDAL_HTTP_MAX_RETRY", "3")), float(env.get("GDAL_HTTP_RETRY_DELAY", "0.5")),
            float(env.get("GDAL_HTTP_TIMEOUT", "30")), headers)


def fetch_json(href: str):
    """The JSON document at a local path, file:// or http(s):// URL. Raises OSError (its message names the
    document without credentials; marked UNREACHABLE where the server, not the document, failed) or ValueError."""
    if not is_url(href):
        path = urllib.parse.unquote(urllib.parse.urlsplit(href).path) if href.startswith("file://") else href
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    retries, delay, timeout, headers = _http_settings()
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(urllib.request.Request(href, headers=headers), timeout=timeout) as r:
                return json.loads(r.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            if e.code < 500 or attempt == retries:
                marker = UNREACHABLE if e.code >= 500 else ""
                raise OSError(f"{marker}{shown(href)}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            if attempt == retries:
                why = getattr(e, "reason", e)
                raise OSError(f"{UNREACHABLE}{shown(href)}: {why} (after {retries + 1} tries, "
                              f"{timeout:g} s timeout)") from None
        time.sleep(delay * 2 ** attempt)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class StacItem:
    """One item as duch reads it: where it was found, its assets' hrefs made absolute, its date and bounds."""

    id: str
    collection: str
    href: str  # the document it came from (for an ItemCollection's items, the collection's)
    date: str | None  # `datetime` (or `start_datetime`) as YYYY-MM-DD
    bbox: tuple[float, ...] | None  # lon/lat, from `bbox` or the geometry
    properties: dict = field(hash=False)
    assets: dict = field(hash=False)  # key -> {"href": absolute, "bands": [common or band names, per band]}

    @property
    def name(self) -> str:
        """The scene name its tiles are prefixed with: COLLECTION/ID (ID alone outside a collection)."""
        return f"{self.collection}/{self.id}" if self.collection else self.id

    def record(self) -> dict:
        """The item as a manifest, a hit and the page show it (hrefs without credentials)."""
        return {"id": self.id, "collection": self.collection or None, "datetime": self.properties.get("datetime"),
                "properties": {k: v for k, v in self.properties.items() if k != "datetime"},
                "assets": {k: shown(a["href"]) for k, a in self.assets.items()}}


def parse_item(doc, href: str) -> StacItem:
    """An Item document as a StacItem; ValueError naming what is wrong with it."""
    if not isinstance(doc, dict) or doc.get("type") != "Feature":
        raise ValueError("not a STAC Item (a GeoJSON Feature)")
    item_id = doc.get("id")
    if not isinstance(item_id, str) or not item_id.strip() or "/" in item_id:
        raise ValueError(f"`id` must be a non-empty string without '/', got {item_id!r}")
    assets, properties = doc.get("assets"), doc.get("properties")
    if not isinstance(assets, dict) or not isinstance(properties, dict):
        raise ValueError("`assets` and `properties` must be objects")
    parsed = {}
    for key, asset in assets.items():
        if not isinstance(asset, dict) or not isinstance(asset.get("href"), str):
            raise ValueError(f"asset {key!r} has no `href` string")
        bands = asset.get("eo:bands") or asset.get("bands") or []
        names = [(b.get("common_name") or b.get("eo:common_name") or b.get("name") or "") if isinstance(b, dict)
                 else "" for b in (bands if isinstance(bands, list) else [])]
        parsed[key] = {"href": resolve(href, asset["href"]), "bands": names}
    date = parse_date(properties.get("datetime") or properties.get("start_datetime"))
    collection = doc.get("collection") if isinstance(doc.get("collection"), str) else ""
    return StacItem(item_id, collection, href, date, _bounds(doc), properties, parsed)


def _bounds(doc: dict) -> tuple[float, ...] | None:
    box = doc.get("bbox")
    if isinstance(box, list) and len(box) in (4, 6) and all(isinstance(v, (int, float)) for v in box):
        return (box[0], box[1], box[3], box[4]) if len(box) == 6 else tuple(float(v) for v in box)
    points: list = []

    def walk(c):
        if isinstance(c, list) and c and isinstance(c[0], (int, float)):
            points.append(c[:2])
        elif isinstance(c, list):
            for x in c:
                walk(x)

    walk((doc.get("geometry") or {}).get("coordinates"))
    if not points:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return (min(xs), min(ys), max(xs), max(ys))


def walk_catalog(location: str) -> tuple[list[StacItem], list[Reject]]:
    """Every item under a STAC document, in link order (each document read once), and the documents rejected."""
    if location.startswith("file://"):
        location = urllib.parse.unquote(urllib.parse.urlsplit(location).path)
    if not is_url(location):
        location = os.path.abspath(location)
    try:
        root = fetch_json(location)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{shown(location)}: cannot read the STAC catalog ({e})") from None
    items: list[StacItem] = []
    rejects: list[Reject] = []
    seen = {location}
    stack = [(location, root)]
    while stack:
        href, doc = stack.pop(0)
        kind = doc.get("type") if isinstance(doc, dict) else None
        if kind == "Feature":
            try:
                items.append(parse_item(doc, href))
            except ValueError as e:
                rejects.append(Reject(_doc_name(doc, href), f"malformed STAC item: {e}"))
        elif kind == "FeatureCollection":
            for k, feature in enumerate(doc.get("features") or []):
                try:
                    items.append(parse_item(feature, href))
                except ValueError as e:
                    rejects.append(Reject(_doc_name(feature, f"{href}#features[{k}]"), f"malformed STAC item: {e}"))
        elif kind in ("Catalog", "Collection"):
            links = [link for link in doc.get("links") or [] if isinstance(link, dict)
                     and link.get("rel") in ("child", "item") and isinstance(link.get("href"), str)]
            for link in links:
                target = resolve(href, link["href"])
                if target in seen or len(seen) >= MAX_DOCUMENTS:
                    continue
                seen.add(target)
                try:
                    stack.append((target, fetch_json(target)))
                except (OSError, ValueError) as e:
                    rejects.append(Reject(shown(target), f"cannot read the linked STAC document: {e}"))
        else:
            if href == location:
                raise DatasetError(f"{shown(location)}: not a STAC Item, ItemCollection, Collection or Catalog "
                                   f"(its `type` is {kind!r})")
            rejects.append(Reject(shown(href), f"not a STAC document (`type` {kind!r})"))
    return items, rejects


def _doc_name(doc, where: str) -> str:
    item_id = doc.get("id") if isinstance(doc, dict) else None
    return item_id if isinstance(item_id, str) and item_id else shown(where)


class AssetsNotFound(ValueError):
    """An item without the assets asked for: rejected, its assets listed."""


def pick_assets(item: StacItem, names: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """(href, 1-based band) per name: an asset key first, else the asset band whose common name (or name) it
    is. ValueError listing the item's assets when a name matches none."""
    picked = []
    for name in names:
        if name in item.assets:
            picked.append((item.assets[name]["href"], 1))
            continue
        found = [(a["href"], k + 1) for a in item.assets.values() for k, band in enumerate(a["bands"]) if band == name]
        if not found:
            listing = ", ".join(f"{key} ({'/'.join(b for b in a['bands'] if b)})" if any(a["bands"]) else key
                                for key, a in item.assets.items())
            raise AssetsNotFound(f"no asset {name!r} by key or band common name; its assets: {listing or 'none'}; "
                             "choose them with `assets`")
        picked.append(found[0])
    return tuple(picked * 3 if len(picked) == 1 else picked)
