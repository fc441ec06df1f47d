"""Scene tiles as places in search: each hit's footprint and date, filters by a lon/lat box and a date range
turned into the bool mask `Index.search(where=...)` applies before the top k, the hits as a GeoJSON
FeatureCollection, and a tile's thumbnail rendered from its scene window on demand.

    index = Index.load("runs/scenes", bits=64)
    places = PlaceFilter.parse(bbox="-120.6,37.2,-120.4,37.4", date_from="2021-01-01")
    mask = places.mask(index.tables["image"])            # [N] bool; mask.sum() items match
    hits = index.search(text="many airplanes parked at the airport", k=10, where=mask)
    collection = geojson(hits, matched=int(mask.sum()))
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from duch.data.geo import ccw_ring, inside_box, overlaps_box
from duch.data.scene_dates import parse_date
from duch.pipeline import DuchError
from duch.pipeline.formats.codes import PLACES, CodeTable

BBOX_FORM = "MINLON,MINLAT,MAXLON,MAXLAT"
# What the errors call each filter: the CLI's options, or the JSON API's fields (duch serve).
CLI_NAMES = {"bbox": "--bbox", "inside": "--inside", "date_from": "--date-from", "date_to": "--date-to"}
API_NAMES = {name: name for name in CLI_NAMES}
NO_PLACES = "this archive's images have no place (it was not extracted from GeoTIFF scenes with --tile)"


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
    return Place(str(m["scene"][row]), [int(v) for v in m["window"][row]], str(m["crs"][row]),
                 np.asarray(m["footprint"][row], np.float64).tolist(), lonlat.tolist() if georeferenced else None,
                 [float(v) for v in m["bounds"][row]] if georeferenced else None, str(m["date"][row]) or None,
                 [int(v) for v in m["bands"][row]], stretch.tolist() if np.isfinite(stretch).all() else None)


def parse_bbox(text, name: str = "--bbox") -> tuple[float, float, float, float]:
    """"MINLON,MINLAT,MAXLON,MAXLAT" (or four numbers) -> a lon/lat box, or the one-line error, naming the option
    `name`, saying what is wrong with it."""
    if isinstance(text, (list, tuple)):
        text = ",".join(str(v) for v in text)
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(np.isfinite(values)):
        raise DuchError(f"{name} {text!r}: give four numbers {BBOX_FORM} in degrees, e.g. -120.6,37.2,-120.4,37.4")
    x0, y0, x1, y1 = values
    if not (-180 <= x0 <= 180 and -180 <= x1 <= 180 and -90 <= y0 <= 90 and -90 <= y1 <= 90):
        raise DuchError(f"{name} {text!r}: longitudes lie within -180..180 and latitudes within -90..90 "
                        f"({BBOX_FORM}, lon first)")
    if x0 >= x1:
        raise DuchError(f"{name} {text!r}: MINLON {x0:g} is not below MAXLON {x1:g}; give {BBOX_FORM} (for a box "
                        "across the antimeridian, search each side of it apart)")
    if y0 >= y1:
        raise DuchError(f"{name} {text!r}: MINLAT {y0:g} is not below MAXLAT {y1:g}; give {BBOX_FORM}")
    return values


def _date(option: str, text: str | None) -> str | None:
    if text is None:
        return None
    date = parse_date(text)
    if date is None:
        raise DuchError(f"{option} {text!r}: give a date as YYYY-MM-DD")
    return date


@dataclass(frozen=True)
class PlaceFilter:
    """Scene tiles whose footprint overlaps the lon/lat box (or lies inside it, `inside`) and whose date is
    within [date_from, date_to] (inclusive; a tile without a date never matches a date filter)."""

    bbox: tuple[float, float, float, float] | None = None
    date_from: str | None = None
    date_to: str | None = None
    inside: bool = False

    @classmethod
    def parse(cls, bbox=None, date_from: str | None = None, date_to: str | None = None, inside: bool = False,
              names: dict[str, str] = CLI_NAMES) -> PlaceFilter:
        """From the CLI's (or a web form's) text, `bbox` also as four numbers; each mistake is one DuchError naming
        the option as `names` calls it."""
        if inside and bbox is None:
            raise DuchError(f"{names['inside']} says how tiles meet a {names['bbox']}; give the {names['bbox']} too")
        start, end = _date(names["date_from"], date_from), _date(names["date_to"], date_to)
        if start and end and start > end:
            raise DuchError(f"{names['date_from']} {start} is after {names['date_to']} {end}; give the earlier date "
                            "first")
        return cls(parse_bbox(bbox, names["bbox"]) if bbox is not None else None, start, end, inside)

    @property
    def active(self) -> bool:
        return self.bbox is not None or self.date_from is not None or self.date_to is not None

    def mask(self, table: CodeTable) -> np.ndarray | None:
        """[N] bool over the table's rows (None when the filter is empty): what `Index.search(where=)` takes."""
        if not self.active:
            return None
        if not has_places(table):
            raise DuchError(f"--bbox, --date-from and --date-to filter scene tiles, and {NO_PLACES}")
        ok = np.ones(len(table), bool)
        if self.bbox is not None:
            test = inside_box if self.inside else overlaps_box
            ok &= test(np.asarray(table.meta["lonlat"], np.float64), self.bbox)
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
        return ", ".join(parts)


def search_places(index, places: PlaceFilter, need_places: bool = False, **query) -> tuple[list, int | None]:
    """(hits, how many tiles the filter lets through) of `index.search(**query)` among the scene tiles `places`
    lets through, the filter applied before the top k (None for the count when there is no filter). A filter, or
    `need_places` (for a map), asks for an archive of scene tiles and searches its images."""
    if places.active or need_places:
        if query.get("modality") == "text" or "image" not in index.tables:
            raise DuchError("--bbox, --date-from, --date-to and --geojson find scene tiles, which are images: leave "
                            "out --modality text")
        if not has_places(index.tables["image"]):
            raise DuchError(f"--bbox, --date-from, --date-to and --geojson find scene tiles, and {NO_PLACES}")
        query["modality"] = "image"
    mask = places.mask(index.tables["image"]) if places.active else None
    hits = index.search(**query, where=mask)
    return hits, None if mask is None else int(mask.sum())


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
    out = {"type": "FeatureCollection", "features": features}
    if query is not None:
        out["query"] = query
    if matched is not None:
        out["matched"] = matched
    return out


def render(source: str | Path, place: Place | None = None) -> Image.Image:
    """The picture of an archive image: a scene tile rendered from its scene window (never the whole scene; bands
    and stretch as extract read it, so it shows what was encoded), any other image loaded as extract loads it."""
    from duch.data.images import load_image
    from duch.data.scenes import read_window

    if place is None:
        return load_image(source)
    rgb, _ = read_window(source, tuple(place.window), tuple(place.bands),
                         tuple(place.stretch) if place.stretch else None)
    return Image.fromarray(rgb)


def thumbnail(hit, size: int = 256) -> Image.Image:
    """A hit's picture (render), at most `size` pixels a side."""
    from duch.data.images import ImageLoadError

    try:
        img = render(hit.path, getattr(hit, "place", None))
    except ImageLoadError as e:
        raise DuchError(f"{hit.id}: cannot render {hit.path}: {e}") from None
    img.thumbnail((size, size))
    return img
