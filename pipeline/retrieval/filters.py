"""Filters by place: a lon/lat box and a date range over scene tiles, turned into the bool mask
`Index.search(where=...)` applies before the top k.

    index = Index.load("runs/scenes", bits=64)
    places = PlaceFilter.parse(bbox="-120.6,37.2,-120.4,37.4", date_from="2021-01-01")
    mask = places.mask(index.tables["image"])            # [N] bool; mask.sum() items match
    hits = index.search(text="many airplanes parked at the airport", k=10, where=mask)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from duch.data.geo import inside_box, overlaps_box
from duch.data.scene_dates import parse_date
from duch.pipeline import DuchError
from duch.pipeline.formats.codes import CodeTable
from duch.pipeline.retrieval.near import finite_numbers, near_mask, parse_near
from duch.pipeline.retrieval.places import NO_PLACES, has_places

BBOX_FORM = "MINLON,MINLAT,MAXLON,MAXLAT"


def parse_bbox(text, name: str = "bbox") -> tuple[float, float, float, float]:
    """"MINLON,MINLAT,MAXLON,MAXLAT" (or four numbers) -> a lon/lat box, or the one-line error, naming the
    parameter `name`, saying what is wrong with it."""
    text, values = finite_numbers(text)
    if len(values) != 4:
        raise DuchError(f"`{name}` {text!r}: give four numbers {BBOX_FORM} in degrees, e.g. -120.6,37.2,-120.4,37.4")
    x0, y0, x1, y1 = values
    if not (-180 <= x0 <= 180 and -180 <= x1 <= 180 and -90 <= y0 <= 90 and -90 <= y1 <= 90):
        raise DuchError(f"`{name}` {text!r}: longitudes lie within -180..180 and latitudes within -90..90 "
                        f"({BBOX_FORM}, lon first)")
    if x0 >= x1:
        raise DuchError(f"`{name}` {text!r}: MINLON {x0:g} is not below MAXLON {x1:g}; give {BBOX_FORM} (for a box "
                        "across the antimeridian, search each side of it apart)")
    if y0 >= y1:
        raise DuchError(f"`{name}` {text!r}: MINLAT {y0:g} is not below MAXLAT {y1:g}; give {BBOX_FORM}")
    return values


def _date(name: str, text: str | None) -> str | None:
    if text is None:
        return None
    date = parse_date(text)
    if date is None:
        raise DuchError(f"`{name}` {text!r}: give a date as YYYY-MM-DD")
    return date


@dataclass(frozen=True)
class PlaceFilter:
    """Scene tiles whose footprint overlaps the lon/lat box (or lies inside it, `inside`) and whose date is
    within [date_from, date_to] (inclusive; a tile without a date never matches a date filter)."""

    bbox: tuple[float, float, float, float] | None = None
    date_from: str | None = None
    date_to: str | None = None
    inside: bool = False
    near: tuple[float, float, float] | None = None  # lon, lat, radius in metres (retrieval/near.py)

    @classmethod
    def parse(cls, bbox=None, date_from: str | None = None, date_to: str | None = None,
              inside: bool = False, near=None) -> PlaceFilter:
        """From the CLI's (or a web form's) text, `bbox` also as four numbers; each mistake is one DuchError naming
        the parameter (pipeline/errors.py spells it for each front end)."""
        if inside and bbox is None:
            raise DuchError("`inside` says how tiles meet a `bbox`; give the `bbox` too")
        start, end = _date("date_from", date_from), _date("date_to", date_to)
        if start and end and start > end:
            raise DuchError(f"`date_from` {start} is after `date_to` {end}; give the earlier date first")
        return cls(parse_bbox(bbox) if bbox is not None else None, start, end, inside,
                   parse_near(near) if near is not None else None)

    @property
    def active(self) -> bool:
        return (self.bbox is not None or self.date_from is not None or self.date_to is not None
                or self.near is not None)

    def mask(self, table: CodeTable) -> np.ndarray | None:
        """[N] bool over the table's rows (None when the filter is empty): what `Index.search(where=)` takes."""
        if not self.active:
            return None
        if not has_places(table):
            raise DuchError(f"`bbox`, `date_from`, `date_to` and `near` filter scene tiles, and {NO_PLACES}")
        ok = np.ones(len(table), bool)
        if self.bbox is not None:
            test = inside_box if self.inside else overlaps_box
            ok &= test(np.asarray(table.meta["lonlat"], np.float64), self.bbox)
        if self.near is not None:
            ok &= near_mask(np.asarray(table.meta["lonlat"], np.float64), self.near)
        if self.date_from or self.date_to:
            dates = np.asarray(table.meta["date"]).astype(str)
            ok &= dates != ""
            if self.date_from:
                ok &= dates >= self.date_from
            if self.date_to:
                ok &= dates <= self.date_to
        return ok

    def describe(self) -> str:
        parts = []
        if self.bbox is not None:
            parts.append(f"{'inside' if self.inside else 'overlapping'} {','.join(f'{v:.10g}' for v in self.bbox)}")
        if self.date_from or self.date_to:
            parts.append(f"dated {self.date_from or '...'} to {self.date_to or '...'}")
        if self.near is not None:
            parts.append(f"within {self.near[2]:g} m of {self.near[0]:.10g},{self.near[1]:.10g}")
        return ", ".join(parts)


def search_places(index, places: PlaceFilter, need_places: bool = False, **query) -> tuple[list, int | None]:
    """(hits, how many tiles the filter lets through) of `index.search(**query)` among the scene tiles `places`
    lets through, the filter applied before the top k (None for the count when there is no filter). A filter, or
    `need_places` (for a map), asks for an archive of scene tiles and searches its images."""
    if places.active or need_places:
        if query.get("modality") == "text" or "image" not in index.tables:
            raise DuchError("`bbox`, `date_from`, `date_to`, `near` and `need_places` find scene tiles, which are "
                            "images: leave out `modality` text")
        if not has_places(index.tables["image"]):
            raise DuchError(f"`bbox`, `date_from`, `date_to`, `near` and `need_places` find scene tiles, and "
                            f"{NO_PLACES}")
        query["modality"] = "image"
    mask = places.mask(index.tables["image"]) if places.active else None
    hits = index.search(**query, where=mask)
    return hits, None if mask is None else int(mask.sum())
