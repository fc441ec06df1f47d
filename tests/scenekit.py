"""GeoTIFF scenes written with rasterio for the tests: synthetic ones, and a mosaic of real UC Merced tiles laid
out as one georeferenced scene in UTM zone 11N near Merced, California."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from PIL import Image

from .conftest import ASSETS

UTM11 = "EPSG:32611"
MERCED = (191533.216453, 4133833.923858)  # lon -120.48, lat 37.30 in UTM 11N
FOOT = 0.3048  # UC Merced's pixel: one foot
MOSAIC_SOURCES = ["102.jpg", "1003.jpg", "2001.jpg", "1.tif"]  # airplane, harbor, tennis court, agricultural
AIRPLANE_AT = (5, 2)  # the untouched airplane tile's row and column in the mosaic


def north_up(west: float, north: float, xsize: float, ysize: float) -> Affine:
    """The transform of a north-up scene whose upper-left corner is (west, north), pixels xsize x ysize."""
    return Affine(xsize, 0.0, west, 0.0, -ysize, north)


def write_scene(path: Path, bands: np.ndarray, crs: str | None = UTM11, transform=None, nodata=None,
                tags: dict | None = None, block: int | None = None) -> Path:
    """[C, H, W] bands as a GeoTIFF; north-up 1 m pixels at MERCED unless `transform` is given."""
    count, height, width = bands.shape
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=bands.dtype.name)
    if crs is not None:
        profile.update(crs=crs, transform=transform or north_up(*MERCED, 1.0, 1.0))
    if nodata is not None:
        profile["nodata"] = nodata
    if block:
        profile.update(tiled=True, blockxsize=block, blockysize=block, compress="deflate")
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # crs=None is the point
        dst = rasterio.open(path, "w", **profile)
    with dst:
        dst.write(bands)
        if tags:
            dst.update_tags(**tags)
    return path


def variant(pixels: np.ndarray, k: int) -> np.ndarray:
    """One of 16 distinct versions of an RGB tile: the 8 rotations and flips, each with its colours as they are
    or as B, G, R (k = 0 is the tile itself)."""
    out = np.rot90(pixels, k % 4)
    if k % 8 >= 4:
        out = out[:, ::-1]
    if k >= 8:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)


def mosaic_tiles() -> dict[tuple[int, int], np.ndarray]:
    """8 x 8 distinct 256-pixel tiles (4 real UCM tiles x 16 variants); the airplane as it is at AIRPLANE_AT."""
    sources = [np.asarray(Image.open(ASSETS / name).convert("RGB")) for name in MOSAIC_SOURCES]
    pairs = [(s, k) for s in range(len(sources)) for k in range(16) if (s, k) != (0, 0)]
    tiles, n = {}, 0
    for i in range(8):
        for j in range(8):
            s, k = (0, 0) if (i, j) == AIRPLANE_AT else pairs[n]
            n += (i, j) != AIRPLANE_AT
            tiles[(i, j)] = variant(sources[s], k)
    return tiles


def write_mosaic(path: Path, date: str = "2021:06:03 11:00:00") -> tuple[Path, dict]:
    """The 8 x 8 mosaic as one 2048 x 2048 GeoTIFF (UTM 11N, 1-foot pixels, tiled 256, deflate) whose metadata
    dates it; returns (path, {(row, col): tile pixels})."""
    tiles = mosaic_tiles()
    pixels = np.zeros((2048, 2048, 3), np.uint8)
    for (i, j), tile in tiles.items():
        pixels[i * 256:(i + 1) * 256, j * 256:(j + 1) * 256] = tile
    write_scene(path, pixels.transpose(2, 0, 1), transform=north_up(*MERCED, FOOT, FOOT),
                tags={"ACQUISITIONDATETIME": date}, block=256)
    return path, tiles
