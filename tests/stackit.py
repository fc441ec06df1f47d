"""Cloud-Optimized GeoTIFFs written by rasterio's COG driver, and STAC documents (Item, ItemCollection, Collection,
Catalog) pointing at them, for the tests and the bench."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio
from rasterio.io import MemoryFile
from rasterio.shutil import copy as rio_copy

from .scenekit import MERCED, UTM11, north_up


def write_cog(path: Path, bands: np.ndarray, crs: str = UTM11, transform=None, nodata=None, block: int = 128,
              resampling: str = "NEAREST") -> Path:
    """[C, H, W] bands as a COG (tiled `block`, at least 128; deflate; overviews down to one block) at MERCED, 1 m
    pixels unless `transform` says otherwise."""
    count, height, width = bands.shape
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=bands.dtype.name, crs=crs,
                   transform=transform or north_up(*MERCED, 1.0, 1.0))
    if nodata is not None:
        profile["nodata"] = nodata
    path.parent.mkdir(parents=True, exist_ok=True)
    with MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(bands)
        with mem.open() as src:
            rio_copy(src, path, driver="COG", BLOCKSIZE=block, COMPRESS="DEFLATE", OVERVIEW_RESAMPLING=resampling)
    with rasterio.open(path) as check:
        assert check.driver == "GTiff" and check.overviews(1) or max(width, height) <= block
    return path


def stac_item(item_id: str, assets: dict[str, tuple[str, list[str]]], bbox=(-120.49, 37.29, -120.47, 37.31),
              datetime: str = "2021-06-03T18:30:00Z", collection: str | None = None, **properties) -> dict:
    """An Item (STAC 1.0, eo extension): assets {key: (href, [band common names])}."""
    x0, y0, x1, y1 = bbox
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": item_id,
        "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json"],
        "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
        "bbox": list(bbox), "properties": {"datetime": datetime, **properties},
        **({"collection": collection} if collection else {}),
        "links": [],
        "assets": {key: {"href": href, "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                         "roles": ["data"], **({"eo:bands": [{"name": key, "common_name": c} for c in names]}
                                               if names else {})}
                   for key, (href, names) in assets.items()},
    }


def item_collection(items: list[dict]) -> dict:
    return {"type": "FeatureCollection", "features": items}


def catalog(cat_id: str, links: list[tuple[str, str]], kind: str = "Catalog") -> dict:
    """A Catalog (or Collection) linking to children/items: [(rel, href)]."""
    doc = {"type": kind, "stac_version": "1.0.0", "id": cat_id, "description": f"{cat_id} for the tests",
           "links": [{"rel": rel, "href": href} for rel, href in links]}
    if kind == "Collection":
        doc.update(license="proprietary", extent={"spatial": {"bbox": [[-121, 37, -120, 38]]},
                                                  "temporal": {"interval": [[None, None]]}})
    return doc


def write_json(path: Path, doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path


def smooth_bands(count: int, height: int, width: int, seed: int = 0, dtype=np.uint16, high: int = 5000) -> np.ndarray:
    """Structured bands (a smooth field plus noise), so resampling and stretches are checked on real variation."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    out = []
    for c in range(count):
        field = (np.sin(x / (11.0 + 3 * c)) * np.cos(y / (17.0 + c)) + 1) / 2
        out.append(field * high * 0.9 + rng.integers(0, high // 10, (height, width)))
    return np.stack(out).astype(dtype)


def write_stac_parquet(path: Path, items: list[dict]) -> Path:
    """Items as a stac-geoparquet file (its layout: properties as top-level columns, `datetime` a timestamp,
    `bbox` a struct, `geometry` WKB, `assets` a struct of assets), written with pyarrow."""
    import datetime as dt
    import struct

    import pyarrow as pa
    import pyarrow.parquet as pq

    def wkb(polygon: dict) -> bytes:  # a GeoJSON Polygon as little-endian WKB
        rings = polygon["coordinates"]
        out = struct.pack("<BII", 1, 3, len(rings))
        for ring in rings:
            out += struct.pack("<I", len(ring)) + b"".join(struct.pack("<dd", *p[:2]) for p in ring)
        return out

    rows = []
    for item in items:
        props = dict(item["properties"])
        props["datetime"] = dt.datetime.fromisoformat(props["datetime"].replace("Z", "+00:00"))
        x0, y0, x1, y1 = item["bbox"]
        rows.append({"type": "Feature", "stac_version": item["stac_version"], "id": item["id"],
                     "collection": item.get("collection"),
                     "geometry": wkb(item["geometry"]),
                     "bbox": {"xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1},
                     "links": item["links"], "assets": item["assets"], **props})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path
