"""Reading scene windows: the bands of one file, or bands from separate files (a STAC item's assets, local or over
HTTP), stacked per window as R, G, B, with which pixels are valid.

- A channel is (file or URL, 1-based band). Channels of one file are read in one call. A file on another grid
  than the scene's (the first asset's: CRS, transform, size) is read through a WarpedVRT onto it (bilinear, the
  fill left out of the kernel), so a 20 m band lines up with a 10 m one.
- Valid pixels: those GDAL's masks call valid (nodata tag, alpha band, internal mask) in every channel, finite,
  and, in a band without a nodata tag, not the declared fill (`nodata`). Invalid pixels render black and never
  enter a stretch.
- URLs are read by GDAL's /vsicurl/ with HTTP range requests: a window costs the bytes of its blocks. GDAL's
  retry and timeout settings default to HTTP_DEFAULTS unless the environment sets them (GDAL_HTTP_MAX_RETRY, ...);
  credentials too come from the environment (GDAL_HTTP_HEADERS, GDAL_HTTP_USERPWD, AWS_*), never from duch.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from duch.data.images import ImageLoadError, apply_stretch
from duch.data.stac import UNREACHABLE, is_url, shown

GDAL_CACHE_MB = 64  # GDAL's default block cache is 5% of the RAM: it would grow with the scene read
# Over HTTP: 5xx, resets and timeouts retried with backoff (GDAL doubles the delay), a request given up after
# GDAL_HTTP_TIMEOUT seconds; the first 16 KiB of a COG hold its header. The environment's values win.
HTTP_DEFAULTS = {"GDAL_HTTP_MAX_RETRY": "3", "GDAL_HTTP_RETRY_DELAY": "0.5", "GDAL_HTTP_TIMEOUT": "30",
                 "GDAL_HTTP_CONNECTTIMEOUT": "10", "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
                 "GDAL_INGESTED_BYTES_AT_OPEN": "16384", "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
                 "VSI_CACHE": "FALSE", "CPL_VSIL_CURL_NON_CACHED": "/vsicurl/"}


class Grid(NamedTuple):
    """The pixel grid a scene's windows are counted on: its first asset's."""

    crs: str
    transform: tuple[float, ...]
    width: int
    height: int


class _Redacted(logging.Filter):
    """GDAL's warnings (logged by rasterio) with URLs as `shown` words them: no user:password, no query."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _URL.sub(lambda m: shown(m.group(0)), record.getMessage())
        record.args = ()
        return True


_URL = re.compile(r"https?://[^\s'\"]+")


def gdal_env():
    import rasterio

    for name in ("rasterio._env", "rasterio._err", "rasterio._io", "rasterio._base"):  # where GDAL's words go
        log = logging.getLogger(name)
        if not any(isinstance(f, _Redacted) for f in log.filters):
            log.addFilter(_Redacted())

    http = {k: v for k, v in HTTP_DEFAULTS.items() if k not in os.environ}
    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB, **http)


def open_error(href: str, e: Exception) -> ImageLoadError:
    """Why a file or URL could not be read, as a reject says it: HTTP failures (after GDAL's retries) marked
    UNREACHABLE so a rerun tries the item again; the URL without credentials."""
    text = str(e)
    for secret in {href, href.removeprefix("/vsicurl/")} - {shown(href)}:
        text = text.replace(secret, shown(href))
    code = re.search(r"HTTP response code: (\d+)", text)
    if is_url(href) and not (code and 400 <= int(code.group(1)) < 500):  # a 4xx is the file's answer
        return ImageLoadError(f"{UNREACHABLE}{shown(href)}: {text}")
    return ImageLoadError(f"{shown(href)}: {text}")


# Open files, per process (a forked loader worker opens its own) and per thread (a GDAL dataset must not be read
# from two threads at once: the service renders thumbnails on several), the most recently used last.
_OPEN: dict[tuple[int, int], OrderedDict] = {}
_OPEN_LOCK = threading.Lock()
_MOST_OPEN = 8  # per thread


def _open(href: str, grid: Grid | None = None, nodata: float | None = None):
    """The cached dataset of `href`, through a WarpedVRT onto `grid` where its own grid differs."""
    import rasterio

    with _OPEN_LOCK:
        mine = _OPEN.setdefault((os.getpid(), threading.get_ident()), OrderedDict())
    key = (href, grid)
    if key in mine:
        mine.move_to_end(key)
        return mine[key][-1]
    while len(mine) >= _MOST_OPEN:
        _, opened = mine.popitem(last=False)
        for src in reversed(opened):
            src.close()
    path = href.removeprefix("file://")
    src = rasterio.open(path)
    opened = [src]
    if grid is not None and on_other_grid(src, grid):
        from rasterio.crs import CRS
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT

        fill = src.nodata if src.nodata is not None else nodata
        opened.append(WarpedVRT(src, crs=CRS.from_string(grid.crs), transform=rasterio.Affine(*grid.transform),
                                width=grid.width, height=grid.height, resampling=Resampling.bilinear,
                                **({"src_nodata": fill, "nodata": fill} if fill is not None else {})))
    mine[key] = opened
    return opened[-1]


def on_other_grid(src, grid: Grid) -> bool:
    here = tuple(float(v) for v in tuple(src.transform)[:6])
    return ((src.crs.to_string() if src.crs else "") != grid.crs or (src.width, src.height) != grid[2:]
            or not np.allclose(here, grid.transform, rtol=0, atol=1e-9 * max(1.0, *map(abs, here))))


def validity(src, bands: list[int], data: np.ndarray, window, nodata: float | None) -> np.ndarray:
    """[h, w] bool: valid in every band of `bands` (read as `data` [B, h, w] from `window`): GDAL's masks (not
    read for bands that have none), finite, and not the declared fill in a band without a nodata tag."""
    from rasterio.enums import MaskFlags

    valid = np.ones(data.shape[1:], bool)
    if not all(MaskFlags.all_valid in src.mask_flag_enums[b - 1] for b in bands):
        valid &= (src.read_masks(bands, window=window, out_shape=data.shape) > 0).all(axis=0)
    if data.dtype.kind == "f":
        valid &= np.isfinite(data).all(axis=0)
    if nodata is not None:
        untagged = [k for k, b in enumerate(bands) if src.nodatavals[b - 1] is None]
        if untagged:
            valid &= (data[untagged] != nodata).all(axis=0)
    return valid


def read_channels(channels: Sequence[tuple[str, int]], window: tuple[int, int, int, int], grid: Grid | None = None,
                  nodata: float | None = None, out_shape: tuple[int, int] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """([C, h, w] values, [h, w] valid) of a window (col_off, row_off, width, height) of the channels, each file's
    bands read in one call; `out_shape` (h, w): the window decimated (GDAL takes an overview where there is one)."""
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
    from rasterio.windows import Window

    c, r, w, h = (int(v) for v in window)
    shape = out_shape or (h, w)
    win = Window(c, r, w, h)
    by_file: dict[str, list[int]] = {}
    for href, band in channels:
        by_file.setdefault(href, [])
        if band not in by_file[href]:
            by_file[href].append(band)
    planes: dict[tuple[str, int], np.ndarray] = {}
    valid = np.ones(shape, bool)
    with gdal_env(), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        for href, bands in by_file.items():
            try:
                src = _open(href, grid, nodata)
                data = src.read(bands, window=win, out_shape=(len(bands), *shape))
                valid &= validity(src, bands, data, win, nodata)
            except RasterioIOError as e:
                raise open_error(href, e) from None
            planes.update({(href, b): data[k] for k, b in enumerate(bands)})
    return np.stack([planes[ch] for ch in channels]), valid


def read_window(path, window: tuple[int, int, int, int], bands: tuple[int, ...], stretch: tuple[float, float] | None,
                size: int | None = None, nodata: float | None = None, channels: Sequence[tuple[str, int]] = (),
                grid: Grid | None = None) -> tuple[np.ndarray, float]:
    """(RGB uint8 [size, size, 3], share of valid pixels) of one scene window (col_off, row_off, width, height):
    the bands of `path` (or the `channels`, of several files) as R, G, B, stretched with the scene's limits,
    invalid pixels black, padded black (and not valid) to `size` a side where the window is smaller. The pixels
    every tile item and thumbnail gets."""
    c, r, w, h = (int(v) for v in window)
    size_h, size_w = (size, size) if size else (h, w)
    channels = tuple(channels) or tuple((os.fspath(path), int(b)) for b in bands)
    try:
        data, valid = read_channels(channels, (c, r, w, h), grid, nodata)
    except ImageLoadError as e:
        why = str(e)
        marker = UNREACHABLE if why.startswith(UNREACHABLE) else ""
        raise ImageLoadError(f"{marker}cannot read the scene window {c},{r},{w},{h}: {why.removeprefix(marker)}"
                             ) from None
    rgb = data if stretch is None else apply_stretch(data, *stretch)
    rgb = np.where(valid, rgb, 0).astype(np.uint8).transpose(1, 2, 0)
    out = np.zeros((size_h, size_w, 3), np.uint8)
    out[:h, :w] = rgb
    return out, float(valid.sum()) / (size_h * size_w)


STRETCH_SAMPLE = 1024  # without overviews the once-per-scene stretch samples at most this many pixels a side
SAMPLE_WINDOW = 1024  # pixels a side of the windows that sample is read by
STRETCH_OVERVIEW = 256  # with overviews (a COG), it is read from the smallest at least this many pixels a side


def scene_stretch(channels: Sequence[tuple[str, int]], width: int, height: int, grid: Grid | None = None,
                  nodata: float | None = None) -> tuple[float, float]:
    """The >8-bit rule's limits over the scene's valid pixels in the channels. A scene whose first file has
    overviews (a COG) is sampled from its smallest overview at least STRETCH_OVERVIEW pixels a side, a few
    blocks even over HTTP; else from every f-th row and column (f making the sample at most STRETCH_SAMPLE
    pixels a side: the whole scene for smaller ones), read window by window: one pass over the scene in flat
    memory. (GDAL's own decimated read is far slower on a file without overviews.)"""
    from rasterio.errors import RasterioIOError

    href = channels[0][0]
    try:
        with gdal_env():
            factors = _open(href, grid, nodata).overviews(channels[0][1])
    except RasterioIOError as e:
        raise open_error(href, e) from None
    usable = [f for f in factors if max(width, height) / f >= STRETCH_OVERVIEW]
    samples = []
    if usable:
        f = max(usable)
        data, valid = read_channels(channels, (0, 0, width, height), grid, nodata,
                                    out_shape=(-(-height // f), -(-width // f)))
        samples.append(data[:, valid])
    else:
        f = max(1, -(-max(width, height) // STRETCH_SAMPLE))
        for r in range(0, height, SAMPLE_WINDOW):
            for c in range(0, width, SAMPLE_WINDOW):
                window = (c, r, min(SAMPLE_WINDOW, width - c), min(SAMPLE_WINDOW, height - r))
                data, valid = read_channels(channels, window, grid, nodata)
                every = (slice((-r) % f, None, f), slice((-c) % f, None, f))  # rows and columns 0, f, 2f...
                samples.append(data[(slice(None), *every)][:, valid[every]])
    values = np.concatenate(samples, axis=1)
    if not values.size:
        raise ImageLoadError("the scene holds no valid pixels in the chosen bands (all nodata)")
    from duch.data.images import stretch_limits

    return stretch_limits(values.astype(np.float64).ravel())
