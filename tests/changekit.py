"""A scene archive acquired on three dates, for the change tests: the real-UCM mosaic of tests/scenekit.py

    2021-06-03  as it is (scene 2021/merced)
    2022-06-03  the same grid, with the tiles CHANGED replaced by noise (scene 2022/merced)
    2023-06-03  another grid: the mosaic's first 6 columns shifted 64 pixels east (scene 2023/shifted): each tile
                overlaps one of 2021 at IoU 0.6 (192 of 320 pixels a row); 2021's columns 6 and 7 have no partner

extracted as tiles with the tiny open_clip model and coded by the `scenes` fixture's 64-bit heads, with their
continuous outputs. Copy it before changing it (`duch remove`, a service's thumbnails)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .scenekit import FOOT, MERCED, north_up, write_mosaic, write_scene

CHANGED = [(1, 1), (3, 6), (6, 4)]
SHIFT = 64  # pixels east of the 2023 grid


def write_dates(root: Path) -> dict:
    _, tiles = write_mosaic(root / "2021" / "merced.tif", "2021:06:03 10:00:00")
    rng = np.random.default_rng(0)
    pixels = np.zeros((2048, 2048, 3), np.uint8)
    for (i, j), tile in tiles.items():
        pixels[i * 256:(i + 1) * 256, j * 256:(j + 1) * 256] = tile
    later = pixels.copy()
    for i, j in CHANGED:
        later[i * 256:(i + 1) * 256, j * 256:(j + 1) * 256] = rng.integers(0, 256, (256, 256, 3), np.uint8)
    write_scene(root / "2022" / "merced.tif", later.transpose(2, 0, 1), transform=north_up(*MERCED, FOOT, FOOT),
                tags={"ACQUISITIONDATETIME": "2022:06:03 10:00:00"}, block=256)
    shifted = pixels[:, SHIFT:SHIFT + 6 * 256]
    west = MERCED[0] + SHIFT * FOOT
    write_scene(root / "2023" / "shifted.tif", np.ascontiguousarray(shifted.transpose(2, 0, 1)),
                transform=north_up(west, MERCED[1], FOOT, FOOT),
                tags={"ACQUISITIONDATETIME": "2023:06:03 10:00:00"}, block=256)
    return tiles


def build_dated(root: Path, scenes: dict, tiny_clip_spec: str) -> dict:
    """{"archive": the encoded three-date archive, "model": its model (beside it as `model`), "root", "tiles"},
    built in `root` with the `scenes` fixture's model."""
    from duch.pipeline.config import EncodeConfig, ExtractConfig
    from duch.stages.encode_archive import encode_archive
    from duch.stages.extract import extract

    quiet = lambda _: None  # noqa: E731
    shutil.copytree(scenes["model"], root / "model")
    tiles = write_dates(root / "data")
    archive = root / "archive"
    extract(ExtractConfig(data=str(root / "data"), run=str(archive), image_encoder=tiny_clip_spec,
                          text_encoder=tiny_clip_spec, tile=256, image_views=0, workers=0, device="cpu"),
            progress=False, echo=quiet)
    encode_archive(EncodeConfig(run=str(root / "model"), archive=str(archive), continuous=True, device="cpu"),
                   progress=False, echo=quiet)
    return {"archive": archive, "model": root / "model", "root": root, "tiles": tiles}
