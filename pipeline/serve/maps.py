"""What the service's map panel and place filters need from an archive of scene tiles: whether it has places, the
place filter of a request as a mask over its images (removed tiles left out), its lon/lat extent and dates, each
scene's outline, and a hit's place as the API shows it."""
from __future__ import annotations

import functools

import numpy as np

from duch.data.geo import ccw_ring, convex_hull
from duch.pipeline import DuchError
from duch.pipeline.retrieval.filters import PlaceFilter
from duch.pipeline.retrieval.places import NO_PLACES, has_places

PLACE_FIELDS = "bbox, inside, date_from, date_to and near"


class ArchiveMap:
    """The places of one encoded archive's images (an `Index`'s image table), read once."""

    def __init__(self, index):
        self.index = index
        self.table = index.tables.get("image")

    @functools.cached_property
    def has_places(self) -> bool:
        return self.table is not None and has_places(self.table)

    @functools.cached_property
    def _kept(self) -> np.ndarray:
        return ~self.index.archive.removed["image"]

    def mask(self, places: PlaceFilter, modality: str) -> np.ndarray | None:
        """The filter as a bool mask over `modality`'s rows (None when it is empty); one DuchError when the archive
        or the modality asked for has no places."""
        if not places.active:
            return None
        if modality != "image":
            raise DuchError(f"modality: {PLACE_FIELDS} find scene tiles, which are images; ask for modality image "
                            "(or leave it out)")
        if not self.has_places:
            raise DuchError(f"{PLACE_FIELDS} filter scene tiles, and {NO_PLACES}; leave them out here")
        return places.mask(self.table) & self._kept

    @functools.cached_property
    def extent(self) -> list[float] | None:
        """[min lon, min lat, max lon, max lat] of the georeferenced tiles still in the archive (None: none)."""
        if not self.has_places:
            return None
        bounds = np.asarray(self.table.meta["bounds"], np.float64)[self._kept]
        bounds = bounds[np.isfinite(bounds).all(axis=1)]
        if not len(bounds):
            return None
        return [float(bounds[:, 0].min()), float(bounds[:, 1].min()), float(bounds[:, 2].max()),
                float(bounds[:, 3].max())]

    @functools.cached_property
    def dates(self) -> list[str] | None:
        """[first, last] acquisition date of the tiles (None: no tile has one)."""
        if not self.has_places:
            return None
        dates = np.asarray(self.table.meta["date"]).astype(str)[self._kept]
        dates = np.unique(dates[dates != ""])  # sorted: YYYY-MM-DD sorts as dates do
        return [str(dates[0]), str(dates[-1])] if len(dates) else None

    @functools.cached_property
    def scenes(self) -> dict:
        """Each scene as a GeoJSON Feature: the outline of its tiles (the convex hull of their lon/lat corners),
        with its name, tile count and date(s); scenes without lon/lat have a null geometry."""
        features = []
        if self.has_places:
            meta = self.table.meta
            names = np.asarray(meta["scene"]).astype(str)[self._kept]
            corners = np.asarray(meta["lonlat"], np.float64)[self._kept]
            dates = np.asarray(meta["date"]).astype(str)[self._kept]
            order = np.argsort(names, kind="stable")
            split = np.flatnonzero(names[order][1:] != names[order][:-1]) + 1
            for rows in np.split(order, split) if len(order) else []:
                hull = convex_hull(corners[rows].reshape(-1, 2))
                geometry = {"type": "Polygon", "coordinates": [ccw_ring(hull)]} if len(hull) >= 3 else None
                seen = sorted(set(dates[rows].tolist()) - {""})
                features.append({"type": "Feature", "id": names[rows[0]], "geometry": geometry,
                                 "properties": {"scene": names[rows[0]], "tiles": len(rows),
                                                "date": seen[0] if len(seen) == 1 else None, "dates": seen}})
        return {"type": "FeatureCollection", "features": features}

    def info(self) -> dict:
        return {"places": self.has_places, "extent": self.extent, "dates": self.dates,
                "scenes": len(self.scenes["features"]) if self.has_places else 0}


def place_json(place) -> dict | None:
    """A hit's or an item's place (retrieval.places.Place) as the API shows it."""
    return None if place is None else place.to_dict()
