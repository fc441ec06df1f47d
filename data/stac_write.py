"""A STAC ItemCollection made from GeoTIFFs (COGs) of one's own, for `extract --data` (`duch stac-items`): one
Item per file, its footprint and bbox in lon/lat from the file's transform, its date by the scenes' rules (a
sidecar, dates.csv, the file's metadata, `date`), one asset `image` whose `eo:bands` name each band: the given
common names, else those the file's colour interpretation says (red, green, blue, gray), else b1, b2...
Hrefs are written relative to the collection file."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from duch.data.geo import to_lonlat, window_corners
from duch.data.records import DatasetError
from duch.data.scene_dates import read_dates_csv, scene_date

COLOURS = {"red": "red", "green": "green", "blue": "blue", "gray": "gray"}


def geotiff_item(path: Path, out_dir: Path, names: tuple[str, ...], date: str | None, collection: str | None) -> dict:
    import rasterio

    with rasterio.open(path) as src:
        if src.crs is None:
            raise DatasetError(f"{path}: no CRS; georeference it first (e.g. gdal_edit.py -a_srs EPSG:XXXX)")
        corners = window_corners(src.transform, [(0, 0, src.width, src.height)])[0]
        lonlat = to_lonlat(src.crs.to_string(), corners)
        found, _ = scene_date(path.parent, path.name, src.tags(), read_dates_csv(path.parent), date)
        if found is None:
            raise DatasetError(f"{path}: no acquisition date in a sidecar, dates.csv or its metadata; give `date`")
        if names and len(names) != src.count:
            raise DatasetError(f"{path}: {src.count} bands, but {len(names)} common names given")
        bands = names or tuple(COLOURS.get(c.name, f"b{k + 1}") for k, c in enumerate(src.colorinterp))
    ring = [[float(x), float(y)] for x, y in lonlat] + [[float(lonlat[0][0]), float(lonlat[0][1])]]
    item_id = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)
    href = os.path.relpath(path.resolve(), out_dir.resolve())
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": item_id,
        "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json"],
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "bbox": [float(v) for v in (*np.min(lonlat, axis=0), *np.max(lonlat, axis=0))],
        "properties": {"datetime": f"{found}T00:00:00Z"}, "links": [],
        **({"collection": collection} if collection else {}),
        "assets": {"image": {"href": href, "type": "image/tiff; application=geotiff", "roles": ["data"],
                             "eo:bands": [{"name": f"b{k + 1}", "common_name": n} for k, n in enumerate(bands)]}},
    }


def write_item_collection(paths: list[Path], out: Path, names: tuple[str, ...] = (), date: str | None = None,
                          collection: str | None = None) -> int:
    """The files as an ItemCollection at `out`; returns how many items it holds."""
    if not paths:
        raise DatasetError("no GeoTIFFs given")
    items = [geotiff_item(Path(p), out.parent, names, date, collection) for p in paths]
    seen: dict[str, Path] = {}
    for item, path in zip(items, paths):
        if item["id"] in seen:
            raise DatasetError(f"{path} and {seen[item['id']]} would both be item {item['id']!r}; rename one")
        seen[item["id"]] = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"type": "FeatureCollection", "features": items}, indent=1) + "\n")
    return len(items)
