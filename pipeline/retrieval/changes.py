"""Change between two dates of a scene archive: the tiles acquired on `from_date` paired with those acquired on
`to_date` by footprint (retrieval/overlap.py: the same window of a scene on the same grid, else the partner of
largest intersection over union, at least `min_iou`), and the pairs ranked by the Hamming distance of their codes,
most changed first.

    index = Index.load("runs/scenes", bits=64)
    found = find_changes(index, "2021-06-03", "2022-06-03", k=20, places=PlaceFilter.parse(bbox="..."))
    found.pairs[0].before.id, found.pairs[0].after.id, found.pairs[0].distance
    found.unpaired["from"]          # ids of the tiles of the first date that have no partner on the second

- Equal distances are ordered by the cosine of the two tiles' continuous outputs (lowest first: the more changed)
  where the archive stores them (encode-archive `continuous`), then by the first date's tile order. `rerank`:
  order every pair by that cosine instead (the Hamming distance still reported).
- Tiles removed from the archive (`duch remove`) are left out before pairing; their partners are then unpaired.
- `places` (a PlaceFilter's box): a pair is kept when either of its tiles passes the box test (overlaps it, or lies
  inside it with `inside`); unpaired tiles are reported where they pass it. Its dates are not used: the two dates
  are `from_date` and `to_date`.
- Two equal dates are an error (a tile paired with itself is no change), and so is a date on which the archive has
  no tile (the message lists the dates it has).
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from duch.data.geo import ccw_ring, inside_box, overlaps_box
from duch.data.scene_dates import parse_date
from duch.pipeline import DuchError
from duch.pipeline.retrieval.filters import PlaceFilter
from duch.pipeline.retrieval.hamming import as_words
from duch.pipeline.retrieval.hits import Hit, make_hit
from duch.pipeline.retrieval.overlap import MIN_IOU, pair_footprints
from duch.pipeline.retrieval.places import NO_PLACES, has_places

SIDES = ("from", "to")
MOST_DATES_SHOWN = 12  # in the message for a date with no tile


class Remembered:
    """Values worked out once per live object (an archive's pairs of two dates, a table's dates as text), the
    `most` recently used kept; the object is held weakly and checked, so a reused id never returns another's."""

    def __init__(self, most: int):
        self.most, self.lock = most, threading.Lock()
        self.items: OrderedDict[tuple, tuple] = OrderedDict()

    def get(self, owner, key: tuple, make):
        full = (id(owner), *key)
        with self.lock:
            found = self.items.get(full)
            if found is not None and found[0]() is owner:
                self.items.move_to_end(full)
                return found[1]
        value = make()  # outside the lock: two threads may both work it out, and agree
        with self.lock:
            self.items[full] = (weakref.ref(owner), value)
            while len(self.items) > self.most:
                self.items.popitem(last=False)
        return value


PAIRS = Remembered(8)  # (archive, from, to, min_iou) -> the pairs of the whole archive: paging costs no pairing
DATES = Remembered(8)  # table -> its dates as text


@dataclass
class ChangePair:
    """Two tiles of one place, one on each date, and how far apart their codes are."""

    rank: int
    distance: int  # Hamming distance between the two tiles' codes
    score: float | None  # cosine of their continuous outputs (None where the archive has none)
    iou: float  # intersection over union of their footprints (1 on the same grid)
    before: Hit  # the tile of `from_date`
    after: Hit  # the tile of `to_date`

    def to_dict(self) -> dict:
        return {"rank": self.rank, "distance": self.distance, "score": self.score, "iou": self.iou,
                "from": self.before.to_dict(), "to": self.after.to_dict()}


@dataclass
class Changes:
    """The pairs of two dates ranked (`pairs`: the top k after `offset`), how many pairs the filter let through
    (`matched`), the tiles of each date it let through (`tiles`), and the ids of those without a partner."""

    from_date: str
    to_date: str
    pairs: list[ChangePair]
    matched: int
    tiles: dict[str, int]
    unpaired: dict[str, list[str]] = field(default_factory=dict)
    reranked: bool = False

    def to_dict(self, most_ids: int | None = None) -> dict:
        """The answer as JSON; `most_ids`: at most that many unpaired ids a date (their count is always whole)."""
        return {"from": self.from_date, "to": self.to_date, "matched": self.matched, "tiles": self.tiles,
                "unpaired": {side: {"count": len(ids), "ids": ids[:most_ids] if most_ids is not None else ids}
                             for side, ids in self.unpaired.items()},
                "reranked": self.reranked, "pairs": [p.to_dict() for p in self.pairs]}


def _date(name: str, text) -> str:
    date = parse_date(text) if isinstance(text, str) else None
    if date is None:
        raise DuchError(f"`{name}` {text!r}: give a date as YYYY-MM-DD")
    return date


def check_changes(from_date, to_date, k: int, min_iou: float, offset: int = 0) -> tuple[str, str]:
    """The two dates as YYYY-MM-DD, or the DuchError naming what is wrong (made before an archive is opened)."""
    start, end = _date("from_date", from_date), _date("to_date", to_date)
    if start == end:
        raise DuchError(f"`from_date` and `to_date` are both {start}: changes compare two acquisitions; give two "
                        "different dates")
    if not isinstance(k, int) or k < 1:
        raise DuchError(f"`k` must be at least 1, got {k!r}")
    if offset < 0:
        raise DuchError(f"offset must be 0 or more, got {offset!r}")
    if not 0 < min_iou <= 1:
        raise DuchError(f"`min_iou` must be above 0 and at most 1, got {min_iou!r}")
    return start, end


def date_rows(dates: np.ndarray, kept: np.ndarray, date: str, name: str) -> np.ndarray:
    """The rows of the tiles acquired on `date` (not removed), or a DuchError listing the dates there are."""
    rows = np.flatnonzero((dates == date) & kept)
    if not len(rows):
        seen, counts = np.unique(dates[kept & (dates != "")], return_counts=True)
        shown = ", ".join(f"{d} ({c} tiles)" for d, c in zip(seen[:MOST_DATES_SHOWN], counts))
        more = f" and {len(seen) - MOST_DATES_SHOWN} more" if len(seen) > MOST_DATES_SHOWN else ""
        raise DuchError(f"`{name}` {date}: no tile of the archive was acquired that day; its dates are "
                        f"{shown + more if len(seen) else 'none (no tile has a date)'}")
    return rows


def pair_rows(meta: dict, rows_a: np.ndarray, rows_b: np.ndarray,
              min_iou: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows of the first date, rows of the second, IoU) of the pairs: tiles with lon/lat by their lon/lat
    footprints, the others (no CRS, or one without lon/lat) by their own footprints, with tiles of the same CRS."""
    lonlat = np.asarray(meta["lonlat"], np.float64)
    geo_a, geo_b = np.isfinite(lonlat[rows_a]).all(axis=(1, 2)), np.isfinite(lonlat[rows_b]).all(axis=(1, 2))
    groups = [(rows_a[geo_a], rows_b[geo_b], lonlat, True)]
    if not geo_a.all():
        footprint = np.asarray(meta["footprint"], np.float64)
        other_a, other_b = rows_a[~geo_a], rows_b[~geo_b]
        crs_a, crs_b = (np.asarray(meta["crs"][rows]).astype(str) for rows in (other_a, other_b))
        for name in np.unique(crs_a):
            groups.append((other_a[crs_a == name], other_b[crs_b == name], footprint, False))
    found = []
    for a, b, corners, geographic in groups:
        i, j, overlap = pair_footprints(corners[a], corners[b], geographic, min_iou)
        found.append((a[i], b[j], overlap))
    a, b, overlap = (np.concatenate(parts) for parts in zip(*found))
    order = np.argsort(a, kind="stable")
    return a[order], b[order], overlap[order]


def code_distances(codes, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[P] Hamming distances between the codes of rows a[i] and b[i]."""
    if not len(a):
        return np.zeros(0, np.int64)
    x, y = as_words(np.asarray(codes[a])), as_words(np.asarray(codes[b]))
    return np.bitwise_count(x ^ y).sum(axis=1, dtype=np.int64)


def cosines(continuous, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[P] cosine of the continuous outputs of rows a[i] and b[i] (0 where one is all zeros)."""
    x, y = np.asarray(continuous[a], np.float32), np.asarray(continuous[b], np.float32)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return np.where(norms > 0, (x * y).sum(axis=1) / np.maximum(norms, 1e-30), 0.0)


def near_box(bounds: np.ndarray, rows: np.ndarray, box, reach: float) -> np.ndarray:
    """The rows whose lon/lat bounds come within `reach` degrees of the box: every tile that can pair with a tile
    in the box, and the tiles those could pair with instead."""
    b = bounds[rows]
    x0, y0, x1, y1 = box
    return rows[(b[:, 2] >= x0 - reach) & (b[:, 0] <= x1 + reach) & (b[:, 3] >= y0 - reach) & (b[:, 1] <= y1 + reach)]


def find_changes(index, from_date, to_date, k: int = 20, places: PlaceFilter | None = None, rerank: bool = False,
                 min_iou: float = MIN_IOU, offset: int = 0) -> Changes:
    """The pairs of tiles of `from_date` and `to_date` in an Index's archive, most changed first (module doc). The
    whole archive's pairs are remembered for the archive's generation; with a box, the tiles within two tile
    sizes of it are paired (a pair in the box never needs a tile farther away)."""
    start, end = check_changes(from_date, to_date, k, min_iou, offset)
    table = index.tables.get("image")
    if table is None or not has_places(table):
        raise DuchError(f"changes pair scene tiles by footprint, and {NO_PLACES}")
    if rerank and table.continuous is None:
        raise DuchError("`rerank` orders the pairs by the continuous outputs; encode the archive again with "
                        "`continuous` and `force`")
    kept = ~index.archive.removed["image"]
    dates = DATES.get(table, (), lambda: np.asarray(table.meta["date"]).astype(str))
    rows_a, rows_b = date_rows(dates, kept, start, "from_date"), date_rows(dates, kept, end, "to_date")
    box = places.bbox if places is not None else None
    if box is None:
        a, b, overlap = PAIRS.get(index.archive, (start, end, min_iou),
                                  lambda: pair_rows(table.meta, rows_a, rows_b, min_iou))
        passes = np.ones(len(table), bool)
    else:
        bounds = np.asarray(table.meta["bounds"], np.float64)
        both = np.concatenate([rows_a, rows_b])
        sizes = bounds[both, 2:] - bounds[both, :2]
        reach = 2 * float(np.nanmax(sizes)) if np.isfinite(sizes).any() else 0.0
        rows_a, rows_b = near_box(bounds, rows_a, box, reach), near_box(bounds, rows_b, box, reach)
        a, b, overlap = pair_rows(table.meta, rows_a, rows_b, min_iou)
        near = np.concatenate([rows_a, rows_b])
        passes = np.zeros(len(table), bool)
        test = inside_box if places is not None and places.inside else overlaps_box
        passes[near] = test(np.asarray(table.meta["lonlat"], np.float64)[near], box)
        keep = passes[a] | passes[b]
        a, b, overlap = a[keep], b[keep], overlap[keep]
    paired = np.zeros(len(table), bool)
    paired[a], paired[b] = True, True
    unpaired = {"from": rows_a[~paired[rows_a] & passes[rows_a]], "to": rows_b[~paired[rows_b] & passes[rows_b]]}
    tiles = {"from": int(passes[rows_a].sum()), "to": int(passes[rows_b].sum())}
    distance = code_distances(table.codes, a, b)
    score = cosines(table.continuous, a, b) if table.continuous is not None else None
    if score is None:
        order = np.lexsort((a, -distance))
    else:
        order = np.lexsort((a, -distance, score) if rerank else (a, score, -distance))
    order = order[offset:offset + k]
    pairs = []
    for n, i in enumerate(order):
        s = None if score is None else float(score[i])
        d = int(distance[i])
        pairs.append(ChangePair(offset + n + 1, d, s, float(overlap[i]),
                                make_hit(index.archive, offset + n, "image", int(a[i]), d, s),
                                make_hit(index.archive, offset + n, "image", int(b[i]), d, s)))
    ids = table.meta["ids"]
    return Changes(start, end, pairs, len(a), tiles, {side: [str(ids[r]) for r in rows]
                                                      for side, rows in unpaired.items()}, rerank)


def changes_geojson(found: Changes, most_ids: int | None = None) -> dict:
    """The pairs as a GeoJSON FeatureCollection (RFC 7946): each pair a Feature whose geometry is the footprint of
    its `from_date` tile (a Polygon in lon/lat, counterclockwise and closed; null without lon/lat), with properties
    rank, distance, score, iou, from_id, to_id, from_date, to_date, scene, to_scene, window, to_window and
    to_lonlat (the other tile's corners); the dates, counts and unpaired ids as members of the collection."""
    features = []
    for p in found.pairs:
        before, after = p.before.place, p.after.place
        feature: dict = {"type": "Feature", "id": f"{p.before.id}|{p.after.id}", "geometry": None}
        if before is not None and before.lonlat is not None:
            feature["bbox"] = before.bounds
            feature["geometry"] = {"type": "Polygon", "coordinates": [ccw_ring(before.lonlat)]}
        feature["properties"] = {
            "rank": p.rank, "distance": p.distance, "score": p.score, "iou": p.iou, "from_id": p.before.id,
            "to_id": p.after.id, "from_date": before.date if before else None,
            "to_date": after.date if after else None, "scene": before.scene if before else None,
            "to_scene": after.scene if after else None, "window": before.window if before else None,
            "to_window": after.window if after else None, "to_lonlat": after.lonlat if after else None}
        features.append(feature)
    doc = found.to_dict(most_ids)
    return {"type": "FeatureCollection", "features": features, "from": doc["from"], "to": doc["to"],
            "matched": doc["matched"], "tiles": doc["tiles"], "unpaired": doc["unpaired"]}
