"""Geometry of scene tiles: where the tiles of a scene fall (the partial-edge rule), their footprints from the
scene's affine transform, in lon/lat, and whether a footprint overlaps or lies inside a lon/lat box.

Footprints are the four corners of a tile's pixel window, upper-left, upper-right, lower-right, lower-left, as
the scene's transform maps them; in lon/lat they are those corners reprojected, joined by straight lines (across
a tile of a few hundred pixels the projected edge bends by far less than a pixel).
"""
from __future__ import annotations

import numpy as np

WGS84 = "EPSG:4326"


def tile_offsets(size: int, tile: int, stride: int) -> list[int]:
    """Offsets of the tiles along one axis of `size` pixels: every `stride` while a whole tile fits, then, where
    pixels are left over at the end, one more tile shifted back to end at the scene's edge (overlapping its
    neighbour), so every tile is `tile` real pixels and every pixel is covered. An axis shorter than a tile has
    one tile at 0 (read padded; the padding counts as not valid)."""
    if size <= tile:
        return [0]
    offsets = list(range(0, size - tile + 1, stride))
    if offsets[-1] + tile < size:
        offsets.append(size - tile)
    return offsets


def tile_windows(width: int, height: int, tile: int, stride: int) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """(row index, column index, (col_off, row_off, width, height)) of every tile of a scene, row by row; windows
    are clipped to the scene (smaller than `tile` only where the scene is)."""
    rows, cols = tile_offsets(height, tile, stride), tile_offsets(width, tile, stride)
    return [(i, j, (c, r, min(tile, width - c), min(tile, height - r)))
            for i, r in enumerate(rows) for j, c in enumerate(cols)]


def window_corners(transform, windows: np.ndarray) -> np.ndarray:
    """[N, 4, 2] corners (ul, ur, lr, ll) of [N, 4] pixel windows (col_off, row_off, width, height) under an
    affine transform (a, b, c, d, e, f): x = a col + b row + c, y = d col + e row + f."""
    a, b, c, d, e, f = (float(v) for v in tuple(transform)[:6])
    w = np.asarray(windows, np.float64).reshape(-1, 4)
    col = np.stack([w[:, 0], w[:, 0] + w[:, 2], w[:, 0] + w[:, 2], w[:, 0]], axis=1)
    row = np.stack([w[:, 1], w[:, 1], w[:, 1] + w[:, 3], w[:, 1] + w[:, 3]], axis=1)
    return np.stack([a * col + b * row + c, d * col + e * row + f], axis=2)


def to_lonlat(crs: str, points: np.ndarray) -> np.ndarray:
    """Points [..., 2] in `crs` (any form rasterio's CRS reads: "EPSG:32611", WKT) as lon/lat [..., 2]."""
    from rasterio.crs import CRS
    from rasterio.warp import transform

    points = np.asarray(points, np.float64)
    flat = points.reshape(-1, 2)
    if not len(flat):
        return points.copy()
    lon, lat = transform(CRS.from_string(crs), CRS.from_string(WGS84), flat[:, 0].tolist(), flat[:, 1].tolist())
    return np.stack([lon, lat], axis=1).reshape(points.shape)


def bounds_of(polygons: np.ndarray) -> np.ndarray:
    """[N, 4] (min x, min y, max x, max y) of [N, K, 2] polygons; NaN where a polygon is NaN."""
    p = np.asarray(polygons, np.float64)
    return np.concatenate([p.min(axis=1), p.max(axis=1)], axis=1)


def inside_box(polygons: np.ndarray, box) -> np.ndarray:
    """[N] bool: every corner of the polygon within the closed box (min x, min y, max x, max y)."""
    p = np.asarray(polygons, np.float64)
    x0, y0, x1, y1 = box
    x, y = p[..., 0], p[..., 1]
    return ((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)).all(axis=1)


def overlaps_box(polygons: np.ndarray, box) -> np.ndarray:
    """[N] bool: the convex polygon and the box share some area (touching along an edge or at a corner does not
    count), by the separating-axis test on the box's axes and the polygon's edge normals. NaN polygons: False."""
    p = np.asarray(polygons, np.float64)
    x0, y0, x1, y1 = box
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
    edges = np.roll(p, -1, axis=1) - p
    normals = np.stack([-edges[..., 1], edges[..., 0]], axis=2)  # [N, K, 2]
    axes = np.concatenate([np.broadcast_to(np.eye(2), (len(p), 2, 2)), normals], axis=1)
    proj_p = np.einsum("nad,nkd->nak", axes, p)
    proj_b = np.einsum("nad,kd->nak", axes, corners)
    separated = (proj_p.max(axis=2) <= proj_b.min(axis=2)) | (proj_b.max(axis=2) <= proj_p.min(axis=2))
    separated &= np.abs(axes).sum(axis=2) > 0  # a zero-length edge gives no axis
    return ~separated.any(axis=1) & np.isfinite(p).all(axis=(1, 2))


def ccw_ring(corners) -> list[list[float]]:
    """A closed ring of the corners, counterclockwise as GeoJSON (RFC 7946) wants an exterior ring."""
    c = np.asarray(corners, np.float64)
    x, y = c[:, 0], c[:, 1]
    area2 = float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
    if area2 < 0:
        c = c[::-1]
    return [[float(u), float(v)] for u, v in c] + [[float(c[0, 0]), float(c[0, 1])]]


def convex_hull(points) -> np.ndarray:
    """[K, 2] corners of the convex hull of [N, 2] points, counterclockwise from the lowest-x (then lowest-y) one,
    collinear points left out (Andrew's monotone chain); NaN points are ignored. A scene's outline from the corners
    of its tiles (which cover it without gaps)."""
    p = np.asarray(points, np.float64).reshape(-1, 2)
    p = p[np.isfinite(p).all(axis=1)]
    if len(p) > 64:  # points strictly inside the quadrilateral of the extreme points cannot be on the hull
        quad = p[[p[:, 0].argmin(), p[:, 1].argmin(), p[:, 0].argmax(), p[:, 1].argmax()]]  # counterclockwise
        edges = np.roll(quad, -1, axis=0) - quad
        inside = ((edges[:, 0] * (p[:, None, 1] - quad[:, 1]) - edges[:, 1] * (p[:, None, 0] - quad[:, 0])) > 0)
        p = p[~inside.all(axis=1)]
    p = np.unique(p, axis=0)  # sorted by x, then y
    if len(p) < 3:
        return p

    def half(seq):
        chain: list = []
        for q in seq:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (q[1] - chain[-2][1]) -
                                       (chain[-1][1] - chain[-2][1]) * (q[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(q)
        return chain

    lower, upper = half(p), half(p[::-1])
    return np.array(lower[:-1] + upper[:-1], np.float64)
