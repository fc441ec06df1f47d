"""The picture of an archive image: a scene tile rendered from its scene window on demand, any other image loaded
as extract loads it."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from duch.pipeline import DuchError
from duch.pipeline.retrieval.places import Place


def render(source: str | Path, place: Place | None = None) -> Image.Image:
    """The picture of an archive image: a scene tile rendered from its scene window (never the whole scene; bands
    and stretch as extract read it, so it shows what was encoded), any other image loaded as extract loads it."""
    from duch.data.images import load_image
    from duch.data.scenes import read_window
    from duch.data.windows import Grid

    if place is None:
        return load_image(source)
    col_off, row_off, width, height = place.window
    stretch = (place.stretch[0], place.stretch[1]) if place.stretch else None
    how = place.source or {}
    grid = Grid(how["grid"][0], tuple(how["grid"][1]), *how["grid"][2:]) if how.get("grid") else None
    rgb, _ = read_window(source, (col_off, row_off, width, height), tuple(place.bands), stretch, None,
                         how.get("nodata"), [(h, int(b)) for h, b in how.get("channels", [])], grid)
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
