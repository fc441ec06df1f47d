"""The in-memory form every dataset reader produces."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class DatasetError(ValueError):
    """A dataset file that cannot be read at all; the message names the file and the line or key."""


@dataclass(frozen=True)
class SceneInfo:
    """A georeferenced scene as its tiles need it (data/scenes.py): read once, when the scenes are listed."""

    name: str  # the file's path under the scenes folder without its suffix: the tiles' id prefix
    file: str  # relative to the scenes folder
    width: int
    height: int
    count: int  # bands in the file
    dtype: str
    crs: str  # "EPSG:32611", or WKT where the CRS has no code; "" for pixel footprints (--allow-ungeoreferenced)
    transform: tuple[float, ...]  # affine (a, b, c, d, e, f): x = a col + b row + c, y = d col + e row + f
    bands: tuple[int, int, int]  # 1-based bands read as R, G, B
    stretch: tuple[float, float] | None  # the >8-bit rule's limits, computed once for the scene; None for 8-bit
    date: str | None  # acquisition date, YYYY-MM-DD
    date_source: str | None  # where the date came from: "sidecar FILE", "metadata KEY", "--date"
    lonlat: bool = True  # whether the CRS converts to lon/lat (not a local engineering grid, not "")
    nodata: float | None = None  # the declared fill (`nodata`) of bands without a nodata tag
    # A STAC item's scene (data/stac_scenes.py): (file or URL, 1-based band) read as R, G, B, on the first one's
    # grid; the item as hits show it (JSON: id, collection, datetime, properties, assets); its place in the catalog
    channels: tuple[tuple[str, int], ...] = ()
    stac: str = ""
    slot: int = -1


@dataclass(frozen=True)
class Tile:
    """Where a tile item's pixels are: a window of its scene, read padded to `size` where the scene is smaller."""

    scene: SceneInfo
    window: tuple[int, int, int, int]  # col_off, row_off, width, height (clipped to the scene)
    size: int


@dataclass(frozen=True)
class Item:
    """One archive image and its captions. `image` is relative to the dataset's images folder (for a scene tile,
    the scene file, with the window in `tile`)."""

    id: str
    image: str
    captions: tuple[str, ...] = ()
    split: str | None = None
    label: str | None = None
    tile: Tile | None = None


@dataclass(frozen=True)
class Reject:
    """An item (or caption, `id#k`, or input row) left out of the run, and why."""

    id: str
    reason: str


@dataclass
class Dataset:
    kind: str  # "caption-json", "pairs-jsonl", "pairs-csv", "image-folder", "scenes"
    source: Path  # the annotation file, or the folder for an image folder
    images_dir: Path
    items: list[Item]
    rejects: list[Reject] = field(default_factory=list)
    scenes: list[SceneInfo] = field(default_factory=list)  # of a "scenes" dataset, whose items are their tiles
    # What the caption rules (data/text.py) changed: {"cleaned_captions": n, "capped_captions": m}
    caption_counts: dict[str, int] = field(default_factory=dict)
    # A STAC catalog's digest (its items' ids, assets and properties): what its fingerprint knows of it, so that an
    # item the server failed to serve and a rerun reaches is no change of input
    catalog: str | None = None

    @property
    def n_captions(self) -> int:
        return sum(len(item.captions) for item in self.items)

    @property
    def has_captions(self) -> bool:
        return any(item.captions for item in self.items)
