"""Georeferenced scenes (GeoTIFF, Cloud-Optimized GeoTIFF) as archive items: each scene cut into tiles.

- `--data`: a folder of scenes (every .tif/.tiff under it), one scene file, or a .txt list of scene paths (one a
  line, relative to the list's folder). Paths stay inside that folder, as images do.
- Tiles every `stride` pixels, `tile` a side; the last row and column are shifted back to end at the scene's edge
  (data/geo.py, tile_offsets). A tile is the item `SCENE/ROW_COL`, SCENE the file's path without suffix.
- Only windows are read (rasterio), with GDAL's block cache bounded: memory stays flat in scene size.
- Three bands as R, G, B (`bands`, 1-based; default 1, 2, 3, or band 1 as grey). Scenes of more than 8 bits get
  the rule of data/images.py (one linear stretch, 2nd to 98th percentile of the three bands), computed once per
  scene from its valid pixels (every f-th row and column, at most STRETCH_SAMPLE a side), so neighbouring tiles
  agree.
- Valid pixels: those GDAL's masks call valid (nodata, alpha, internal masks) in all three bands, and finite.
  A tile with fewer than `min_valid` of its pixels valid is skipped and counted. Invalid pixels render black.
- A scene without a CRS stops the listing with the fix, unless `allow_ungeoreferenced` (footprints in pixels);
  a band out of range too. A scene that cannot be read (corrupt, truncated) is rejected by name; the rest goes on.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from duch.data.geo import bounds_of, overlaps_box, tile_windows, to_lonlat, window_corners
from duch.data.images import ImageLoadError, max_values
from duch.data.readers import ImagesFolder
from duch.data.records import Dataset, DatasetError, Item, Reject, SceneInfo, Tile
from duch.data.scene_dates import read_dates_csv, scene_date
from duch.data.windows import GDAL_CACHE_MB, Grid, gdal_env, read_window, scene_stretch

__all__ = ["GDAL_CACHE_MB", "read_window"]  # read here by the service's thumbnails and the tests

SCENE_SUFFIXES = (".tif", ".tiff")
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class TileOptions:
    tile: int  # pixels a side
    stride: int = 0  # pixels between tile origins; 0: the tile size
    bands: tuple[int, ...] = ()  # 1-based, 1 or 3 of them; (): 1, 2, 3 (band 1 as grey for fewer bands)
    min_valid: float = 0.9  # share of valid pixels a tile needs
    date: str | None = None  # YYYY-MM-DD for scenes with no date of their own
    allow_ungeoreferenced: bool = False  # scenes without a CRS get footprints in pixels instead of an error
    nodata: float | None = None  # the fill value of bands without a nodata tag: not valid, never stretched
    bbox: tuple[float, ...] = ()  # lon/lat (min lon, min lat, max lon, max lat): only tiles overlapping it
    date_from: str | None = None  # only scenes (items) dated within these, inclusive
    date_to: str | None = None
    assets: tuple[str, ...] = ()  # a STAC item's assets read as R, G, B (or one, grey): keys or common names
    max_cloud: float | None = None  # STAC items with eo:cloud_cover above it are skipped


class TileSkipped(ImageLoadError):
    """A tile with too few valid pixels: skipped and counted, not an error in the input."""


_env = gdal_env


def scene_files(path: Path) -> tuple[Path, list[str]]:
    """(the scenes folder, the scene files in it to read) of a folder, a scene file or a .txt list of them."""
    if path.is_dir():
        folder, found = path, []
        for root, dirs, files in os.walk(path):  # symlinked folders are not descended into, as for images
            dirs.sort()
            found += [os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/") for f in sorted(files)
                      if os.path.splitext(f)[1].lower() in SCENE_SUFFIXES]
        if not found:
            raise DatasetError(f"{path}: no scenes found (looked for {', '.join(SCENE_SUFFIXES)} files)")
        return folder, sorted(found)
    if path.suffix.lower() in SCENE_SUFFIXES:
        return path.parent, [path.name]
    if path.suffix.lower() == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise DatasetError(f"{path}: not UTF-8 text; save the list as UTF-8") from None
        names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        folder = ImagesFolder(path.parent)
        return path.parent, [folder.relative(n, f"{path}: {n}") for n in names]
    raise DatasetError(f"{path}: give a folder of GeoTIFF scenes, a .tif file or a .txt list of them")


def read_scenes(path: str | os.PathLike, options: TileOptions) -> Dataset:
    """Every scene of `path` listed (header, date, stretch: no tile is read) and cut into tile items."""
    folder, files = scene_files(Path(path))
    csv_dates = read_dates_csv(folder)
    scenes, items, rejects, names = [], [], [], {}
    for file in files:
        name = os.path.splitext(file)[0]
        if name in names:
            raise DatasetError(f"{folder}: {names[name]} and {file} would both be scene {name!r}; rename one")
        names[name] = file
        try:
            scene = open_scene(folder, file, options, csv_dates)
        except ImageLoadError as e:
            rejects.append(Reject(name, str(e)))
            continue
        if in_period(scene.date, options):
            scenes.append(scene)
            items += scene_tiles(scene, name, file, options)
    return Dataset("scenes", folder, folder, items, rejects, scenes=scenes)


def in_period(date: str | None, options: TileOptions) -> bool:
    """Whether a scene's date is within `date_from` and `date_to` (an undated scene is not, when either is given)."""
    if not (options.date_from or options.date_to):
        return True
    return bool(date) and (options.date_from or "") <= date <= (options.date_to or "9999")


def scene_tiles(scene: SceneInfo, name: str, image: str, options: TileOptions) -> list[Item]:
    """The scene's tile items `name`/ROW_COL, but those outside `bbox` (lon/lat; from the transform: nothing is
    read), so that only the windows of an area of interest are ever read."""
    windows = tile_windows(scene.width, scene.height, options.tile, options.stride or options.tile)
    if options.bbox and windows:
        if not (scene.crs and scene.lonlat):
            return []
        lonlat = to_lonlat(scene.crs, window_corners(scene.transform, [w for _, _, w in windows]))
        windows = [w for w, keep in zip(windows, overlaps_box(lonlat, options.bbox)) if keep]
    return [Item(f"{name}/{i}_{j}", image, tile=Tile(scene, window, options.tile)) for i, j, window in windows]


def truncation(path: Path) -> str | None:
    """Why a TIFF's pixel data runs past the end of its file, or None; from the offsets in its header (tifffile)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
    except Exception:  # not parsed by tifffile: rasterio has the last word
        return None
    size = path.stat().st_size
    if len(ends) and ends.max() > size:
        return f"truncated file: its pixel data ends at byte {int(ends.max())}, the file has {size}"
    return None


def open_scene(folder: Path, file: str, options: TileOptions, csv_dates: dict[str, str]) -> SceneInfo:
    """The scene's header, date and stretch. Raises ImageLoadError (a rejected scene) for a file that cannot be
    read, DatasetError (stops the listing) for a scene without a CRS or a band out of range."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    path = folder / file
    if not ImagesFolder(folder).inside(file):
        raise DatasetError(f"{path}: resolves outside the scenes folder {folder}")
    if not path.is_file():
        raise ImageLoadError("missing file")
    if path.stat().st_size == 0:
        raise ImageLoadError("empty file (0 bytes)")
    problem = truncation(path)
    if problem:
        raise ImageLoadError(problem)
    try:
        with _env(), warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                _check_blocks(src)
                crs, transform = _georeference(src, path, options)
                lonlat = bool(crs) and _converts(crs, transform, src, path, options)
                bands = _bands(src, path, options)
                date, source = scene_date(folder, file, src.tags(), csv_dates, options.date)
                dtypes = {src.dtypes[b - 1] for b in bands}
                channels = [(os.fspath(path), b) for b in bands]
                stretch = None if dtypes == {"uint8"} else scene_stretch(channels, src.width, src.height, None,
                                                                         options.nodata)
                return SceneInfo(os.path.splitext(file)[0], file, src.width, src.height, src.count,
                                 ",".join(sorted(dtypes)), crs, transform, bands, stretch, date, source, lonlat,
                                 nodata=options.nodata)
    except RasterioIOError as e:
        raise ImageLoadError(f"not a readable GeoTIFF ({e})") from None


def _check_blocks(src) -> None:
    """The decoded-size rule of data/images.py for a scene: a scene is read window by window, so its own size is
    free, but GDAL decodes a tile whole (all bands of it, where they are interleaved by pixel); strips it reads row
    by row. Only the first page is read (GDAL's dataset); later ones are overviews or other datasets."""
    from rasterio.enums import Interleaving

    height, width = max(src.block_shapes, key=lambda shape: shape[0] * shape[1])
    samples = src.count if src.interleaving == Interleaving.pixel else 1
    values = height * width * samples
    if (limit := max_values()) and values > limit:
        raise ImageLoadError(f"scene blocks too large ({width} x {height} pixels x {samples} samples = {values} "
                             f"values a block; the limit against decompression bombs is {limit} values); write "
                             "the scene in smaller tiles (e.g. gdal_translate -co TILED=YES)")


def _georeference(src, path: Path, options: TileOptions) -> tuple[str, tuple[float, ...]]:
    if src.crs is None:
        if not options.allow_ungeoreferenced:
            raise DatasetError(f"{path}: the scene has no coordinate reference system (CRS), so its tiles have no "
                               "place; georeference it (e.g. gdal_edit.py -a_srs EPSG:XXXX), or pass "
                               "`allow_ungeoreferenced` for footprints in pixels")
        return "", IDENTITY
    return src.crs.to_string(), tuple(float(v) for v in tuple(src.transform)[:6])


def _converts(crs: str, transform: tuple, src, path: Path, options: TileOptions) -> bool:
    """Whether the scene's corners convert to lon/lat; a CRS that does not (a local engineering grid) is the
    same error as no CRS, or with `allow_ungeoreferenced` footprints in its own CRS only."""
    try:
        if np.isfinite(to_lonlat(crs, window_corners(transform, [(0, 0, src.width, src.height)]))).all():
            return True
    except Exception:  # PROJ finds no conversion (its message is the CRS's whole definition): named below
        pass
    if not options.allow_ungeoreferenced:
        name = re.search(r'^\w+\["([^"]*)"', src.crs.to_wkt())
        raise DatasetError(f"{path}: the scene's CRS{f' ({name.group(1)})' if name else ''} does not convert to "
                           "lon/lat (a local grid?); reproject it (e.g. gdalwarp -t_srs EPSG:4326), or pass "
                           "`allow_ungeoreferenced` for footprints in its own CRS only")
    return False


def _bands(src, path: Path, options: TileOptions) -> tuple[int, int, int]:
    bands = tuple(options.bands) or ((1, 2, 3) if src.count >= 3 else (1,))
    for b in bands:
        if not 1 <= b <= src.count:
            raise DatasetError(f"{path}: `bands` {','.join(map(str, bands))} names band {b}, but the scene has "
                               f"{src.count} band{'s' if src.count > 1 else ''} (1-{src.count}); choose bands "
                               "within them")
    return bands * 3 if len(bands) == 1 else bands


def scene_grid(scene: SceneInfo) -> Grid | None:
    """The grid a scene's other files are warped onto: its first asset's (None for one file, read as it is)."""
    return Grid(scene.crs, scene.transform, scene.width, scene.height) if scene.channels else None


def load_tile(images_dir: Path, item: Item, min_valid: float) -> Image.Image:
    """A tile item's pixels as an RGB image; TileSkipped when fewer than `min_valid` of them are valid."""
    tile, scene = item.tile, item.tile.scene
    rgb, valid = read_window(Path(images_dir) / item.image, tile.window, scene.bands, scene.stretch, tile.size,
                             scene.nodata, scene.channels, scene_grid(scene))
    if valid < min_valid:
        raise TileSkipped(f"{valid:.1%} of its pixels are valid, below `min_valid` {min_valid:g}")
    return Image.fromarray(rgb)


def place_columns(tiles: list[Tile]) -> dict[str, np.ndarray | list]:
    """Per tile: scene, window, CRS, footprint in the CRS [4, 2] (pixels for an ungeoreferenced scene), the same
    corners in lon/lat [4, 2] and their bounds [4] (NaN without a CRS), date ('' when unknown), the bands read
    and the scene's stretch (NaN for 8-bit): what code files keep and search hits report."""
    n = len(tiles)
    windows = np.array([t.window for t in tiles], np.int64).reshape(n, 4)
    footprint, lonlat = np.zeros((n, 4, 2)), np.full((n, 4, 2), np.nan)
    by_scene: dict[str, list[int]] = {}
    for i, t in enumerate(tiles):
        by_scene.setdefault(t.scene.name, []).append(i)
    for rows in by_scene.values():
        scene = tiles[rows[0]].scene
        footprint[rows] = window_corners(scene.transform, windows[rows])
        if scene.crs and scene.lonlat:
            lonlat[rows] = to_lonlat(scene.crs, footprint[rows])
    return {
        "scene": [t.scene.name for t in tiles], "window": windows, "crs": [t.scene.crs for t in tiles],
        "footprint": footprint, "lonlat": lonlat, "bounds": bounds_of(lonlat).reshape(n, 4),
        "date": [t.scene.date or "" for t in tiles],
        "bands": np.array([t.scene.bands for t in tiles], np.int32).reshape(n, 3),
        "stretch": np.array([t.scene.stretch or (np.nan, np.nan) for t in tiles], np.float64).reshape(n, 2),
        **(source_columns(tiles) if any(t.scene.channels or t.scene.nodata is not None for t in tiles) else {}),
    }


def source_columns(tiles: list[Tile]) -> dict[str, list[str]]:
    """What a tile's pixels need beyond its scene file and bands, as JSON (formats/codes.py PLACE_EXTRAS): the
    declared fill and a STAC item's channels and grid ("source", read back to render it), and the item as hits
    show it ("stac"). Written only by runs that have them, so archives made before keep their columns."""
    import json

    sources: dict[str, str] = {}
    for t in tiles:
        s = t.scene
        if s.name not in sources:
            sources[s.name] = json.dumps({"nodata": s.nodata, "channels": [list(c) for c in s.channels],
                                          "grid": list(scene_grid(s) or ()) or None})
    return {"source": [sources[t.scene.name] for t in tiles], "stac": [t.scene.stac for t in tiles]}
