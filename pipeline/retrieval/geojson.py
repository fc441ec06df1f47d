"""Hits as a GeoJSON FeatureCollection (RFC 7946) of their footprints."""
from __future__ import annotations

from duch.data.geo import ccw_ring


def geojson(hits: list, matched: int | None = None, query: str | None = None) -> dict:
    """The hits as a GeoJSON FeatureCollection (RFC 7946): each a Polygon of its footprint in lon/lat
    (counterclockwise, closed) with its bbox, and properties rank, distance, score, id, scene, window, date, crs,
    footprint (in the CRS), label and path. A hit without lon/lat (an ungeoreferenced scene, or an image that is
    no scene tile) has a null geometry. `matched` and `query` are kept as members of the collection."""
    features = []
    for h in hits:
        place = getattr(h, "place", None)
        feature = {"type": "Feature", "id": h.id, "geometry": None}
        if place is not None and place.lonlat is not None:
            feature["bbox"] = place.bounds
            feature["geometry"] = {"type": "Polygon", "coordinates": [ccw_ring(place.lonlat)]}
        props = {"rank": h.rank, "distance": h.distance, "score": h.score, "id": h.id, "label": h.label,
                 "path": h.path}
        if place is not None:
            props.update(scene=place.scene, window=place.window, date=place.date, crs=place.crs,
                         footprint=place.footprint)
        feature["properties"] = props
        features.append(feature)
    out: dict = {"type": "FeatureCollection", "features": features}
    if query is not None:
        out["query"] = query
    if matched is not None:
        out["matched"] = matched
    return out
