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

import math
import os
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from duch.data.geo import bounds_of, tile_windows, to_lonlat, window_corners
from duch.data.images import ImageLoadError, apply_stretch, max_values, stretch_limits
from duch.data.readers import ImagesFolder
from duch.data.records import Dataset, DatasetError, Item, Reject, SceneInfo, Tile
from duch.data.scene_dates import read_dates_csv, scene_date

SCENE_SUFFIXES = (".tif", ".tiff")
GDAL_CACHE_MB = 64  # GDAL's default block cache is 5% of the RAM: it would grow with the scene read
STRETCH_SAMPLE = 1024  # the once-per-scene stretch samples at most this many pixels a side of the scene
SAMPLE_WINDOW = 1024  # pixels a side of the windows that sample is read by
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class TileOptions:
    tile: int  # pixels a side
    stride: int = 0  # pixels between tile origins; 0: the tile size
    bands: tuple[int, ...] = ()  # 1-based, 1 or 3 of them; (): 1, 2, 3 (band 1 as grey for fewer bands)
    min_valid: float = 0.9  # share of valid pixels a tile needs
    date: str | None = None  # YYYY-MM-DD for scenes with no date of their own
    allow_ungeoreferenced: bool = False  # scenes without a CRS get footprints in pixels instead of an error


class TileSkipped(ImageLoadError):
    """A tile with too few valid pixels: skipped and counted, not an error in the input."""


def _env():
    import rasterio

    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)


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
        scenes.append(scene)
        items += [Item(f"{name}/{i}_{j}", file, tile=Tile(scene, window, options.tile))
                  for i, j, window in tile_windows(scene.width, scene.height, options.tile,
                                                   options.stride or options.tile)]
    return Dataset("scenes", folder, folder, items, rejects, scenes=scenes)


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
                stretch = None if dtypes == {"uint8"} else _scene_stretch(src, bands)
                return SceneInfo(os.path.splitext(file)[0], file, src.width, src.height, src.count,
                                 ",".join(sorted(dtypes)), crs, transform, bands, stretch, date, source, lonlat)
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


def _valid(src, bands: list[int], window) -> np.ndarray:
    """[h, w] bool: pixels GDAL's masks call valid in every band (nodata, alpha, internal masks); no mask is read
    for bands that have none (most 8-bit scenes)."""
    from rasterio.enums import MaskFlags

    if all(MaskFlags.all_valid in src.mask_flag_enums[b - 1] for b in bands):
        return np.ones((int(window.height), int(window.width)), bool)
    return (src.read_masks(bands, window=window) > 0).all(axis=0)


def _scene_stretch(src, bands: tuple[int, int, int]) -> tuple[float, float]:
    """The >8-bit rule's limits over the scene's valid pixels in the chosen bands, from every f-th row and column
    (f making the sample at most STRETCH_SAMPLE pixels a side: the whole scene for smaller ones), read window by
    window: one pass over the scene in flat memory. (GDAL's own decimated read is far slower on a file without
    overviews.)"""
    from rasterio.windows import Window

    f = max(1, math.ceil(max(src.width, src.height) / STRETCH_SAMPLE))
    unique = sorted(set(bands))
    picked = [unique.index(b) for b in bands]
    samples = []
    for r in range(0, src.height, SAMPLE_WINDOW):
        for c in range(0, src.width, SAMPLE_WINDOW):
            window = Window(c, r, min(SAMPLE_WINDOW, src.width - c), min(SAMPLE_WINDOW, src.height - r))
            every = (slice(None), slice((-r) % f, None, f), slice((-c) % f, None, f))  # rows and columns 0, f, 2f...
            data = src.read(unique, window=window)[every]
            valid = _valid(src, unique, window)[every[1:]]
            if data.dtype.kind == "f":
                valid &= np.isfinite(data).all(axis=0)
            samples.append(data[picked][:, valid])
    values = np.concatenate(samples, axis=1)
    if not values.size:
        raise ImageLoadError("the scene holds no valid pixels in the chosen bands (all nodata)")
    return stretch_limits(values.astype(np.float64).ravel())


# Open scenes, per process (a forked loader worker opens its own) and per thread (a GDAL dataset must not be read
# from two threads at once: the service renders thumbnails on several), the most recently used last.
_OPEN: dict[tuple[int, int], OrderedDict] = {}
_OPEN_LOCK = threading.Lock()
_MOST_OPEN = 8  # per thread


def _dataset(path: Path):
    import rasterio

    with _OPEN_LOCK:
        mine = _OPEN.setdefault((os.getpid(), threading.get_ident()), OrderedDict())
    key = str(path)
    if key in mine:
        mine.move_to_end(key)
        return mine[key]
    while len(mine) >= _MOST_OPEN:
        _, old = mine.popitem(last=False)
        old.close()
    src = mine[key] = rasterio.open(path)
    return src


def read_window(path: str | os.PathLike, window: tuple[int, int, int, int], bands: tuple[int, ...],
                stretch: tuple[float, float] | None, size: int | None = None) -> tuple[np.ndarray, float]:
    """(RGB uint8 [size, size, 3], share of valid pixels) of one scene window (col_off, row_off, width,
    height): the bands as R, G, B, stretched with the scene's limits, invalid pixels black, padded black (and
    not valid) to `size` a side where the window is smaller. The pixels every tile item and thumbnail gets."""
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
    from rasterio.windows import Window

    c, r, w, h = (int(v) for v in window)
    size_h, size_w = (size, size) if size else (h, w)
    unique = sorted(set(bands))
    try:
        with _env(), warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = _dataset(Path(path))
            data = src.read(unique, window=Window(c, r, w, h))
            valid = _valid(src, unique, Window(c, r, w, h))
    except RasterioIOError as e:
        raise ImageLoadError(f"cannot read the scene window {c},{r},{w},{h}: {e}") from None
    picked = [unique.index(b) for b in bands]
    if data.dtype.kind == "f":
        valid &= np.isfinite(data).all(axis=0)
    rgb = data[picked] if stretch is None else apply_stretch(data[picked], *stretch)
    rgb = np.where(valid, rgb, 0).astype(np.uint8).transpose(1, 2, 0)
    out = np.zeros((size_h, size_w, 3), np.uint8)
    out[:h, :w] = rgb
    return out, float(valid.sum()) / (size_h * size_w)


def load_tile(images_dir: Path, item: Item, min_valid: float) -> Image.Image:
    """A tile item's pixels as an RGB image; TileSkipped when fewer than `min_valid` of them are valid."""
    tile = item.tile
    rgb, valid = read_window(Path(images_dir) / item.image, tile.window, tile.scene.bands, tile.scene.stretch,
                             tile.size)
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
    }
