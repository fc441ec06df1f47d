"""Pairing the tiles of two dates by footprint: each tile of one date with the tile of the other whose footprint
overlaps it most, by intersection over union (IoU), one to one.

- Same grid (the same windows of scenes with the same georeference): a tile's partner covers exactly its footprint,
  IoU 1, and is its only partner.
- Different grids (another tile size, stride, origin or CRS): the partner is the tile of largest IoU, if that is at
  least `min_iou` (MIN_IOU, 0.5: at least half of what the two cover together is common to both; two equal squares
  shifted by a third of a side along one axis are at IoU 0.5). A tile is in at most one pair: the pairs are chosen by
  IoU, largest first (rounds of mutual best partners, which is the greedy matching).
- A tile with no partner at `min_iou` or above is unpaired, and reported as such by the caller.

Footprints are compared in lon/lat, each pair on a local plane at the first tile's first corner (east-west
degrees scaled by the cosine of its latitude, in metres; longitudes taken across the antimeridian); tiles without
lon/lat (an ungeoreferenced scene) are compared in their own coordinates, only with tiles of the same CRS ('' for
pixels). Candidates are found by a grid of cells over the footprints' bounds, so pairing N tiles costs about N, not
N squared.
"""
from __future__ import annotations

import numpy as np

MIN_IOU = 0.5
METRES_PER_DEGREE = 111_320.0  # along the equator and a meridian, near enough for a ratio of areas
EDGE_EPS = 1e-6  # of a footprint's own units (metres, or pixels): edges closer than this are the same edge


def ccw(quads: np.ndarray) -> np.ndarray:
    """[N, K, 2] convex polygons, each turned counterclockwise where it was clockwise (a north-up scene's
    ul, ur, lr, ll corners run clockwise in x east, y north)."""
    q = np.asarray(quads, np.float64)
    x, y = q[..., 0], q[..., 1]
    area2 = (x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y).sum(axis=1)
    return np.where((area2 < 0)[:, None, None], q[:, ::-1], q)


def polygon_area(quads: np.ndarray) -> np.ndarray:
    """[N] area of [N, K, 2] simple polygons (shoelace)."""
    q = np.asarray(quads, np.float64)
    x, y = q[..., 0], q[..., 1]
    return np.abs((x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y).sum(axis=1)) / 2


def _clipped_edges(p: np.ndarray, q: np.ndarray, eps: float) -> np.ndarray:
    """[N] the sum of x0 y1 - x1 y0 over the parts of p's edges within q (both [N, K, 2], counterclockwise and
    convex): q's half-planes grown by `eps` when eps > 0, shrunk when eps < 0 (Cyrus-Beck clipping). Worked with
    the polygons last ([K, N] coordinates), so that every reduction runs over whole rows of N."""
    sx, sy = np.ascontiguousarray(p[..., 0].T), np.ascontiguousarray(p[..., 1].T)  # [Ki, N] starts of p's edges
    dx, dy = np.roll(sx, -1, axis=0) - sx, np.roll(sy, -1, axis=0) - sy
    qx, qy = np.ascontiguousarray(q[..., 0].T), np.ascontiguousarray(q[..., 1].T)  # [Kj, N]
    ex, ey = np.roll(qx, -1, axis=0) - qx, np.roll(qy, -1, axis=0) - qy  # q's edges; inside is to their left
    length = np.hypot(ex, ey)[None]  # [1, Kj, N]
    ex, ey, qx, qy = ex[None], ey[None], qx[None], qy[None]
    sx, sy, dx, dy = sx[:, None], sy[:, None], dx[:, None], dy[:, None]  # [Ki, 1, N]
    # For p's edge i and q's edge j: f(t) = cross(e_j, s_i + t d_i - q_j) + eps |e_j| >= 0, [Ki, Kj, N].
    num = ex * (sy - qy) - ey * (sx - qx) + eps * length
    den = ex * dy - ey * dx
    parallel = np.abs(den) <= 1e-9 * length * np.hypot(dx, dy)
    den = np.where(parallel, 0.0, den)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = -num / den
    lower = np.where(den > 0, bound, -np.inf).max(axis=1, initial=-np.inf)  # [Ki, N]
    upper = np.where(den < 0, bound, np.inf).min(axis=1, initial=np.inf)
    # Parallel to an edge of q and beyond it; or, grown, on that edge running the other way (the edge two
    # neighbouring tiles share bounds no common area).
    against = (eps > 0) & (ex * dx + ey * dy < 0) & (num <= 2 * eps * length)
    outside = (parallel & ((num < 0) | against)).any(axis=1)
    t0, t1 = np.maximum(lower, 0.0), np.minimum(upper, 1.0)
    keep = (t1 > t0) & ~outside
    sx, sy, dx, dy = sx[:, 0], sy[:, 0], dx[:, 0], dy[:, 0]
    ax, ay, bx, by = sx + t0 * dx, sy + t0 * dy, sx + t1 * dx, sy + t1 * dy
    return np.where(keep, ax * by - bx * ay, 0.0).sum(axis=0)


def intersection_area(p: np.ndarray, q: np.ndarray, eps: float = EDGE_EPS) -> np.ndarray:
    """[N] area common to the convex polygons p[i] and q[i] ([N, K, 2], any orientation), by Green's theorem over
    the boundary of the intersection: p's edges within q (closed) and q's edges strictly within p, so that an edge
    the two share is counted once."""
    p, q = ccw(p), ccw(q)
    origin = p[:, :1, :]  # near the polygons: the open ends of a degenerate overlap then add next to nothing
    p, q = p - origin, q - origin
    return np.maximum((_clipped_edges(p, q, eps) + _clipped_edges(q, p, -eps)) / 2, 0.0)


def iou(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """[N] intersection over union of convex polygons p[i], q[i]."""
    inter = intersection_area(p, q)
    union = polygon_area(p) + polygon_area(q) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, np.minimum(inter / union, 1.0), 0.0)


def local_plane(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lon/lat polygons a[i], b[i] ([N, K, 2]) in metres on the plane at a[i]'s first corner (longitudes wrapped
    across the antimeridian): where IoU is measured."""
    lon0, lat0 = a[:, :1, 0:1], a[:, :1, 1:2]
    scale = np.cos(np.radians(lat0)) * METRES_PER_DEGREE

    def plane(x):
        dlon = (x[..., 0:1] - lon0 + 180.0) % 360.0 - 180.0
        return np.concatenate([dlon * scale, (x[..., 1:2] - lat0) * METRES_PER_DEGREE], axis=-1)

    return plane(a), plane(b)


def candidates(bounds_a: np.ndarray, bounds_b: np.ndarray, wrap: bool) -> tuple[np.ndarray, np.ndarray]:
    """(rows of a, rows of b) of every two footprints whose bounds ([N, 4] min x, min y, max x, max y) fall in a
    common cell of a grid about one footprint a side (each pair once). `wrap`: x is a longitude, whose cells go
    round the antimeridian."""
    both = np.concatenate([bounds_a, bounds_b])
    if not len(bounds_a) or not len(bounds_b):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    sizes = both[:, 2:] - both[:, :2]
    # A cell about a median footprint, and never so small that the largest footprint spans more than 8 of them.
    cell = np.maximum(np.median(sizes, axis=0), sizes.max(axis=0) / 8)
    cell = np.where(cell > 0, cell, 1.0)
    columns = int(np.ceil(360.0 / cell[0])) if wrap else 0
    if wrap:  # a whole number of columns round the globe, so that cells meet across the antimeridian
        cell[0] = 360.0 / columns

    def cells(bounds):
        lo = np.floor(bounds[:, :2] / cell).astype(np.int64)
        hi = np.floor(bounds[:, 2:] / cell).astype(np.int64)
        span = hi - lo + 1
        count = span[:, 0] * span[:, 1]
        rows = np.repeat(np.arange(len(bounds)), count)
        k = np.arange(len(rows)) - np.repeat(np.cumsum(count) - count, count)
        cx = lo[rows, 0] + k % span[rows, 0]
        cy = lo[rows, 1] + k // span[rows, 0]
        if wrap:
            cx %= columns
        return rows, (cx << 32) + cy  # one int64 a cell: |cy| < 2^31 cells

    rows_a, keys_a = cells(bounds_a)
    rows_b, keys_b = cells(bounds_b)
    order = np.argsort(keys_b, kind="stable")
    keys_b, rows_b = keys_b[order], rows_b[order]
    first = np.searchsorted(keys_b, keys_a, side="left")
    count = np.searchsorted(keys_b, keys_a, side="right") - first
    a = np.repeat(rows_a, count)
    b = rows_b[np.repeat(first - np.cumsum(count) + count, count) + np.arange(count.sum())]
    if not len(a):
        return a, b
    pair = distinct(a * (len(bounds_b) + 1) + b)  # a pair seen in several common cells, once
    return pair // (len(bounds_b) + 1), pair % (len(bounds_b) + 1)


def distinct(values: np.ndarray) -> np.ndarray:
    """The distinct values, ascending (by a sort: numpy's hashed unique is far slower on millions of ints)."""
    values = np.sort(values)
    return values[np.concatenate([[True], values[1:] != values[:-1]])] if len(values) else values


def firsts(keys: np.ndarray) -> np.ndarray:
    """Where each run of equal values of an ascending array begins."""
    return np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]])) if len(keys) else np.zeros(0, np.int64)


def one_to_one(a: np.ndarray, b: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Indices into (a, b, score) of the pairs chosen, largest score first, each a and each b in at most one: in
    rounds, every a's best b and every b's best a (equal scores: the lower row); pairs best for both are taken,
    then their rows leave. (The largest score of the lowest rows is best for both: every round takes one.)"""
    chosen = []
    live = np.arange(len(a))
    taken_a = np.zeros(int(a.max()) + 1 if len(a) else 0, bool)
    taken_b = np.zeros(int(b.max()) + 1 if len(b) else 0, bool)
    while len(live):
        by_a = live[np.lexsort((b[live], -score[live], a[live]))]
        by_b = live[np.lexsort((a[live], -score[live], b[live]))]
        best = np.zeros(len(a), np.int8)
        best[by_a[firsts(a[by_a])]] += 1
        best[by_b[firsts(b[by_b])]] += 1
        both = np.flatnonzero(best == 2)
        chosen.append(both)
        taken_a[a[both]], taken_b[b[both]] = True, True
        live = live[~taken_a[a[live]] & ~taken_b[b[live]]]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def exact_pairs(quads_a: np.ndarray, quads_b: np.ndarray, decimals: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows of a, rows of b) of footprints with the same corners (to `decimals`), one to one: the same grid, found
    by a hash join, with no geometry (IoU 1)."""
    if not len(quads_a) or not len(quads_b):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ints_a, ints_b = (np.round(q.reshape(len(q), -1) * 10.0 ** decimals).astype(np.int64) for q in (quads_a, quads_b))
    primes = np.array([1000003, 998244353, 1000000007, 1000000009, 754974721, 167772161, 469762049, 1004535809],
                      np.int64)[:ints_a.shape[1]]
    key_a, key_b = (ints_a * primes).sum(axis=1), (ints_b * primes).sum(axis=1)  # wraps round: a hash
    order = np.argsort(key_b, kind="stable")
    at = np.minimum(np.searchsorted(key_b[order], key_a), len(order) - 1)
    b = order[at]
    same = (key_b[b] == key_a) & (ints_b[b] == ints_a).all(axis=1)  # a hash collision is no match
    a, b = np.flatnonzero(same), b[same]
    order = np.argsort(b, kind="stable")  # a footprint twice on the first date: its first tile
    keep = np.sort(order[firsts(b[order])])
    return a[keep], b[keep]


def pair_footprints(quads_a: np.ndarray, quads_b: np.ndarray, geographic: bool,
                    min_iou: float = MIN_IOU) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows of a, rows of b, IoU) of the pairs of footprints ([N, 4, 2], lon/lat when `geographic`, else planar
    coordinates) by largest IoU, one to one, IoU at least `min_iou`; in the order of a's rows. Footprints with the
    same corners (the same grid) pair first, by a hash join; the others by overlap."""
    quads_a, quads_b = np.asarray(quads_a, np.float64), np.asarray(quads_b, np.float64)
    if geographic:  # corners unwrapped about each footprint's first, so a tile across 180 degrees has small bounds
        quads_a, quads_b = (np.concatenate([q[:, :, :1] - ((q[:, :, :1] - q[:, :1, :1] + 180.0) // 360.0) * 360.0,
                                            q[:, :, 1:]], axis=2) for q in (quads_a, quads_b))
    same_a, same_b = exact_pairs(quads_a, quads_b, 9 if geographic else 4)  # 0.1 mm in degrees; 1e-4 units
    rest_a, rest_b = np.ones(len(quads_a), bool), np.ones(len(quads_b), bool)
    rest_a[same_a], rest_b[same_b] = False, False
    rest_a, rest_b = np.flatnonzero(rest_a), np.flatnonzero(rest_b)
    a, b, overlap = overlap_pairs(quads_a[rest_a], quads_b[rest_b], geographic, min_iou)
    a = np.concatenate([same_a, rest_a[a]])
    b = np.concatenate([same_b, rest_b[b]])
    overlap = np.concatenate([np.ones(len(same_a)), overlap])
    order = np.argsort(a, kind="stable")
    return a[order], b[order], overlap[order]


def overlap_pairs(quads_a: np.ndarray, quads_b: np.ndarray, geographic: bool,
                  min_iou: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pair_footprints by overlap alone: candidates by the grid of cells, those whose bounds cannot reach `min_iou`
    left out (IoU is at most the bounds' common area over the larger footprint), then the exact IoU."""
    bounds_a, bounds_b = (np.concatenate([q.min(axis=1), q.max(axis=1)], axis=1) for q in (quads_a, quads_b))
    a, b = candidates(bounds_a, bounds_b, wrap=geographic)
    if not len(a):
        return a, b, np.zeros(0)
    ba, bb = bounds_a[a], bounds_b[b].copy()
    if geographic:  # b's bounds moved by whole turns next to a's, across the antimeridian
        turn = np.round((bb[:, 0] - ba[:, 0]) / 360.0) * 360.0
        bb[:, 0] -= turn
        bb[:, 2] -= turn
    common = (np.clip(np.minimum(ba[:, 2], bb[:, 2]) - np.maximum(ba[:, 0], bb[:, 0]), 0, None) *
              np.clip(np.minimum(ba[:, 3], bb[:, 3]) - np.maximum(ba[:, 1], bb[:, 1]), 0, None))
    larger = np.maximum(polygon_area(quads_a)[a], polygon_area(quads_b)[b])
    with np.errstate(divide="ignore", invalid="ignore"):
        reach = np.where(larger > 0, common / larger, 0.0) >= min_iou * (1 - 1e-6)
    a, b = a[reach], b[reach]
    if not len(a):
        return a, b, np.zeros(0)
    p, q = (local_plane(quads_a[a], quads_b[b]) if geographic else (quads_a[a], quads_b[b]))
    overlap = iou(p, q)
    ok = overlap >= min_iou
    a, b, overlap = a[ok], b[ok], overlap[ok]
    chosen = one_to_one(a, b, overlap)
    return a[chosen], b[chosen], overlap[chosen]
