"""Scene tiles as places: each image row's scene, pixel window, footprint and date, as a code file's metadata holds
them (extract of GeoTIFF scenes with `tile`). Filtering by place is retrieval/filters.py, the hits as GeoJSON
retrieval/geojson.py, a tile's picture retrieval/render.py."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from duch.pipeline.formats.codes import PLACES, CodeTable

NO_PLACES = "this archive's images have no place (it was not extracted from GeoTIFF scenes with `tile`)"


@dataclass
class Place:
    """Where a scene tile hit is: its scene and pixel window, footprint in the scene's CRS, the same corners in
    lon/lat (None without a CRS), their bounds, the acquisition date, and how its pixels are rendered."""

    scene: str
    window: list[int]  # col_off, row_off, width, height
    crs: str  # "" for an ungeoreferenced scene: the footprint is then in pixels
    footprint: list[list[float]]  # corners ul, ur, lr, ll in the CRS
    lonlat: list[list[float]] | None
    bounds: list[float] | None  # min lon, min lat, max lon, max lat
    date: str | None
    bands: list[int]
    stretch: list[float] | None
    # A STAC item's tile: the item (id, collection, datetime, properties such as eo:cloud_cover and platform, its
    # assets' URLs without credentials); None for a GeoTIFF scene's
    stac: dict | None = None
    # How its pixels are read beyond the scene file and bands (declared fill, a STAC item's assets and grid):
    # for rendering, not shown (to_dict leaves it out)
    source: dict | None = None

    def to_dict(self) -> dict:
        """As hits and the API show it: without `source` (how it is read is no part of a hit; a catalog's hrefs
        may carry a signed query), and without `stac` for a GeoTIFF scene's tile (the form hits had before)."""
        out = dataclasses.asdict(self)
        del out["source"]
        if out["stac"] is None:
            del out["stac"]
        return out


def has_places(table: CodeTable) -> bool:
    return all(name in table.meta for name in PLACES)


def place_of(table: CodeTable, row: int) -> Place | None:
    """The place of one image row of a code file; None for an archive of images that are not scene tiles."""
    if not has_places(table):
        return None
    m = table.meta
    lonlat = np.asarray(m["lonlat"][row], np.float64)
    georeferenced = bool(np.isfinite(lonlat).all())
    stretch = np.asarray(m["stretch"][row], np.float64)
    stac, source = (json.loads(str(m[name][row])) if name in m and str(m[name][row]) else None
                    for name in ("stac", "source"))
    return Place(str(m["scene"][row]), [int(v) for v in m["window"][row]], str(m["crs"][row]),
                 np.asarray(m["footprint"][row], np.float64).tolist(), lonlat.tolist() if georeferenced else None,
                 [float(v) for v in m["bounds"][row]] if georeferenced else None, str(m["date"][row]) or None,
                 [int(v) for v in m["bands"][row]], stretch.tolist() if np.isfinite(stretch).all() else None,
                 stac, source)
