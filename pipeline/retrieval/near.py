"""`near`: scene tiles within a distance of a point, a filter applied before the top k (retrieval/filters.py
PlaceFilter holds it beside the box and the dates).

The rule: a tile is near when the great-circle distance from the point to its footprint (the lon/lat corners'
quadrilateral, its edges great-circle arcs, on a sphere of the Earth's mean radius) is at most `radius_m`; a point
inside the footprint is at distance 0, so that a radius of 0 finds the tiles that contain the point. Distances are
computed on unit vectors, so the antimeridian and the poles need no special case. A tile without lon/lat (an
ungeoreferenced scene's) is never near.
"""
from __future__ import annotations

import numpy as np

from duch.pipeline import DuchError

EARTH_RADIUS_M = 6_371_008.8  # the mean radius (IUGG): the error of a sphere is under 0.5 % anywhere
NEAR_FORM = "LON,LAT,METRES"


def finite_numbers(text) -> tuple[str, tuple[float, ...]]:
    """A comma list of numbers (or a list of them) as written and as floats; () when any is not a finite number."""
    if isinstance(text, (list, tuple)):
        text = ",".join(str(v) for v in text)
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        return str(text), ()
    return str(text), values if all(np.isfinite(values)) else ()


def parse_near(text) -> tuple[float, float, float]:
    """"LON,LAT,METRES" (or three numbers) -> (lon, lat, radius in metres), or the one-line error naming `near`."""
    text, values = finite_numbers(text)
    if len(values) != 3:
        raise DuchError(f"`near` {text!r}: give three numbers {NEAR_FORM}, a point in degrees and a radius in "
                        "metres, e.g. -120.5,37.3,2000")
    lon, lat, radius = values
    if not (-180 <= lon <= 180 and -90 <= lat <= 90):
        raise DuchError(f"`near` {text!r}: the longitude lies within -180..180 and the latitude within -90..90 "
                        f"({NEAR_FORM}, lon first)")
    if radius < 0:
        raise DuchError(f"`near` {text!r}: the radius is 0 or more metres (0: the tiles that contain the point)")
    return lon, lat, radius


def unit_vectors(lon, lat) -> np.ndarray:
    """Degrees -> points on the unit sphere [..., 3]."""
    lon, lat = np.radians(np.asarray(lon, np.float64)), np.radians(np.asarray(lat, np.float64))
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def footprint_distance(footprints: np.ndarray, lon: float, lat: float) -> np.ndarray:
    """[N] metres from the point to each footprint [N, C, 2] (lon/lat corners of a convex polygon, either
    orientation): 0 inside, else the nearest point of its edges (great-circle arcs); NaN for a footprint with a
    NaN corner."""
    corners = unit_vectors(footprints[..., 0], footprints[..., 1])  # [N, C, 3]
    p = unit_vectors(lon, lat)
    a, b = corners, np.roll(corners, -1, axis=1)
    normal = np.cross(a, b)  # [N, C, 3]: each edge's great circle
    length = np.linalg.norm(normal, axis=-1)
    # Inside: on the inner side of every edge, the inner side being the corners' centre's (either orientation);
    # the antipodal quadrilateral lies on the outer side of them all.
    centre = corners.sum(axis=1)
    orientation = np.sign(np.einsum("ncd,ncd->nc", normal, centre[:, None, :]).sum(axis=1))
    inside = ((np.einsum("ncd,d->nc", normal, p) * orientation[:, None]) >= -1e-15).all(axis=1)
    # The point's projection on an edge's circle lies on the arc when it is on the inner side of both ends.
    n_hat = np.divide(normal, length[..., None], out=np.zeros_like(normal), where=length[..., None] > 0)
    foot = p - np.einsum("ncd,d->nc", n_hat, p)[..., None] * n_hat
    on_arc = (np.einsum("ncd,ncd->nc", np.cross(a, foot), normal) >= 0) & \
             (np.einsum("ncd,ncd->nc", np.cross(foot, b), normal) >= 0) & (length > 0)
    to_circle = np.arcsin(np.clip(np.abs(np.einsum("ncd,d->nc", n_hat, p)), 0, 1))
    to_corner = np.arccos(np.clip(np.einsum("ncd,d->nc", corners, p), -1, 1))
    to_edge = np.where(on_arc, to_circle, np.minimum(to_corner, np.roll(to_corner, -1, axis=1)))
    out = np.where(inside, 0.0, to_edge.min(axis=1)) * EARTH_RADIUS_M
    out[~np.isfinite(footprints).all(axis=(1, 2))] = np.nan
    return out


def near_mask(footprints: np.ndarray, near: tuple[float, float, float]) -> np.ndarray:
    """[N] bool: the footprints within `near`'s radius of its point (NaN footprints: False)."""
    lon, lat, radius = near
    with np.errstate(invalid="ignore"):
        return footprint_distance(np.asarray(footprints, np.float64), lon, lat) <= radius
