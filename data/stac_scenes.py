"""A STAC catalog's items as scenes cut into tiles (data/stac.py lists them, data/windows.py reads them).

- Items outside `date_from`/`date_to` (their `datetime`), over `max_cloud` (`eo:cloud_cover`) or whose bounds miss
  `bbox` are left out before any of their files is opened; of the rest, only the tiles overlapping `bbox` are cut.
- An item's scene is its first asset's grid (size, CRS, transform): tiles are windows of it, and the other assets
  are read onto it (WarpedVRT) where their grid differs. Its date is the item's `datetime`; more than 8 bits are
  stretched once per item from its valid pixels (data/windows.py scene_stretch: a COG's overview).
- An item without the assets asked for, a malformed one, or one whose files cannot be opened is rejected by name
  (its id; URLs without credentials) and the rest goes on; a file the server failed to serve is marked so that a
  rerun tries that item again (windows.UNREACHABLE).
- Each item keeps its place in the catalog (`slot`): its tiles make one shard of their own (embed/plan.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from duch.data.geo import overlaps_box, to_lonlat, window_corners
from duch.data.images import ImageLoadError
from duch.data.records import Dataset, DatasetError, Reject, SceneInfo
from duch.data.scenes import TileOptions, in_period, scene_tiles
from duch.data.stac import DEFAULT_ASSETS, AssetsNotFound, StacItem, pick_assets, shown, walk_catalog
from duch.data.windows import Grid, _open, gdal_env, open_error, scene_stretch

STAC_ROOT = Path("/")  # a STAC tile's image is its item's document, an absolute path or a URL


def read_catalog(location: str, options: TileOptions) -> Dataset:
    """Every item of the catalog at `location` kept by the filters, opened (headers, stretch; no tile is read)
    and cut into tile items."""
    if location.lower().endswith((".parquet", ".geoparquet")):
        from duch.data.stac_parquet import read_stac_parquet

        items, rejects = read_stac_parquet(location)
    else:
        items, rejects = walk_catalog(location)
    catalog = catalog_digest(items, rejects)
    scenes, tiles, names = [], [], set()
    for slot, item in enumerate(items):
        if item.name in names:
            rejects.append(Reject(item.name, "a second item of this id in the collection; ids must be unique"))
            continue
        names.add(item.name)
        if not kept(item, options):
            continue
        try:
            scene = open_item(item, slot, options)
        except (ImageLoadError, AssetsNotFound) as e:
            rejects.append(Reject(item.name, str(e)))
            continue
        except ValueError as e:
            rejects.append(Reject(item.name, f"malformed STAC item: {e}"))
            continue
        scenes.append(scene)
        tiles += scene_tiles(scene, item.name, shown(item.href), options)  # the path hits show: the item's document
    return Dataset("stac", Path(location), STAC_ROOT, tiles, rejects, scenes=scenes, catalog=catalog)


def catalog_digest(items: list[StacItem], rejects: list[Reject]) -> str:
    """The catalog as its fingerprint knows it: every item's id, properties and asset hrefs, and the documents
    that could not be read. Not whether its files could be opened: a rerun that reaches them is the same input."""
    listing = [[i.name, i.href, i.properties, {k: a["href"] for k, a in i.assets.items()}] for i in items]
    listing.append(sorted(r.id for r in rejects))
    return hashlib.sha256(json.dumps(listing, sort_keys=True, default=str).encode()).hexdigest()


def kept(item: StacItem, options: TileOptions) -> bool:
    """Whether an item passes the date, cloud and box filters, from its document alone."""
    if not in_period(item.date, options):
        return False
    cloud = item.properties.get("eo:cloud_cover")
    if options.max_cloud is not None and isinstance(cloud, (int, float)) and cloud > options.max_cloud:
        return False
    if options.bbox and item.bbox is not None:
        x0, y0, x1, y1 = item.bbox
        corners = np.array([[[x0, y0], [x1, y0], [x1, y1], [x0, y1]]], np.float64)
        return bool(overlaps_box(corners, options.bbox)[0]) or (x0, y0) == (x1, y1)
    return True


def open_item(item: StacItem, slot: int, options: TileOptions) -> SceneInfo:
    """The item's scene: its first chosen asset's grid, the other assets checked to open, the stretch."""
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    channels = pick_assets(item, tuple(options.assets) or DEFAULT_ASSETS)
    dtypes = set()
    with gdal_env(), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        grid = None
        for href in dict.fromkeys(h for h, _ in channels):
            try:
                src = _open(href, grid, options.nodata)
            except RasterioIOError as e:
                raise open_error(href, e) from None
            if grid is None:
                if src.crs is None:
                    raise ImageLoadError(f"{os.path.basename(href)}: the asset has no CRS; georeference it")
                grid = Grid(src.crs.to_string(), tuple(float(v) for v in tuple(src.transform)[:6]), src.width,
                            src.height)
            for h, band in channels:
                if h == href and not 1 <= band <= src.count:
                    raise ImageLoadError(f"{os.path.basename(href)} has {src.count} bands, not band {band}")
                if h == href:
                    dtypes.add(src.dtypes[band - 1])
    assert grid is not None
    stretch = None if dtypes == {"uint8"} else scene_stretch(channels, grid.width, grid.height, grid, options.nodata)
    try:
        lonlat = bool(np.isfinite(to_lonlat(grid.crs, window_corners(grid.transform, [(0, 0, grid.width,
                                                                                        grid.height)]))).all())
    except Exception:  # PROJ finds no conversion: a local grid
        lonlat = False
    if not lonlat and not options.allow_ungeoreferenced:
        raise DatasetError(f"{item.name}: its assets' CRS does not convert to lon/lat; reproject them, or pass "
                           "`allow_ungeoreferenced`")
    bands = tuple(b for _, b in channels)
    return SceneInfo(item.name, shown(item.href), grid.width, grid.height, len(set(channels)), ",".join(sorted(dtypes)),
                     grid.crs, grid.transform, (bands[0], bands[1], bands[2]), stretch, item.date,
                     "STAC datetime" if item.date else None, lonlat, nodata=options.nodata, channels=channels,
                     stac=json.dumps(item.record(), default=str), slot=slot)
