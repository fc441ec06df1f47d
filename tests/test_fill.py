"""A declared fill (`--nodata`) for scenes without a nodata tag: a Landsat-like scene whose corners are 0-fill
without the tag, stretched and tiled before and after the fill is declared (the numbers pinned)."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from duch import cli
from duch.data.scenes import TileOptions, TileSkipped, load_tile, read_scenes
from duch.pipeline import DuchError
from duch.pipeline.config import ExtractConfig
from duch.pipeline.formats.shards import read_shard

from .scenekit import write_scene
from .test_scenes import tiny


def landsat_like(size=512, seed=0):
    """16-bit land (7000-12000, with structure) in a diamond: a scene rotated in its grid, 0 in its corners and no
    nodata tag, as a Landsat 8 L1 GeoTIFF comes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    land = 7000 + 2500 * (np.sin(x / 23.0) * np.cos(y / 31.0) + 1) + rng.normal(0, 300, (size, size))
    bands = np.stack([land, land * 0.9 + 400, land * 1.1 - 300]).clip(1, 65535).astype(np.uint16)
    bands[:, (np.abs(x - size / 2) + np.abs(y - size / 2)) > size * 0.62] = 0
    return bands


def grey_std(dataset, tile_id, min_valid=0.0):
    item = next(i for i in dataset.items if i.id == tile_id)
    return float(np.asarray(load_tile(dataset.images_dir, item, min_valid)).astype(float).std())


def test_a_declared_fill_leaves_the_stretch_and_the_tiles_it_would_wash_out(tmp_path):
    write_scene(tmp_path / "s" / "l8.tif", landsat_like())
    before = read_scenes(tmp_path / "s", TileOptions(tile=128, min_valid=0.5))
    after = read_scenes(tmp_path / "s", TileOptions(tile=128, min_valid=0.5, nodata=0))
    # The fill is 2 % and more of the scene: without the declaration the stretch starts at it.
    assert before.scenes[0].stretch == (0.0, 12258.0)
    assert after.scenes[0].stretch == (6950.0, 12430.0)
    # An all-land tile: washed out (grey levels bunched at the top) before, spread after.
    assert round(grey_std(before, "l8/1_1"), 2) == 25.04 and round(grey_std(after, "l8/1_1"), 2) == 56.13
    # A corner tile is 11 % land: valid as a whole before, skipped after.
    assert round(grey_std(before, "l8/0_0", 0.5), 2) == 73.87
    with pytest.raises(TileSkipped, match="11.2% of its pixels are valid"):
        grey_std(after, "l8/0_0", 0.5)


def test_a_nodata_tag_wins_over_the_declared_fill(tmp_path):
    bands = landsat_like(128)
    bands[:, :8] = 65535  # the tagged fill; the zeros of the corners are values for this file
    write_scene(tmp_path / "t" / "tagged.tif", bands, nodata=65535)
    scene = read_scenes(tmp_path / "t", TileOptions(tile=128, nodata=0)).scenes[0]
    item = read_scenes(tmp_path / "t", TileOptions(tile=128, nodata=0)).items[0]
    assert scene.stretch[0] == 0.0  # the zeros are in the stretch: the file says 65535 is its fill
    from duch.data.scenes import read_window
    _, valid = read_window(tmp_path / "t" / "tagged.tif", item.tile.window, (1, 2, 3), scene.stretch, nodata=0)
    assert valid == pytest.approx(1 - 8 / 128)


def test_the_cli_declares_the_fill_and_counts_fill_tiles_as_skipped(tmp_path):
    write_scene(tmp_path / "s" / "l8.tif", landsat_like())
    run = tmp_path / "run"
    out = CliRunner().invoke(cli.main, [
        "extract", "--data", str(tmp_path / "s"), "--run", str(run), "--tile", "128", "--nodata", "0",
        "--min-valid", "0.5", "--image-encoder", tiny(tmp_path), "--text-encoder", "none", "--image-views", "0",
        "--workers", "0", "--device", "cpu", "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "12 tiles from 1 scenes; 4 tiles skipped" in out.output
    manifest = json.loads((run / "extract" / "manifest.json").read_text())
    assert manifest["basis"]["settings"]["nodata"] == 0 and manifest["scenes"][0]["stretch"] == [6950.0, 12430.0]
    shard = read_shard(run / "extract" / "image-00000.h5")
    assert sorted(shard["skipped_id"]) == ["l8/0_0", "l8/0_3", "l8/3_0", "l8/3_3"]
    assert json.loads(shard["source"][0]) == {"nodata": 0.0, "channels": [], "grid": None}


def test_nodata_is_a_finite_number_and_tiles_scenes(tmp_path):
    with pytest.raises(DuchError, match="`nodata` must be a number"):
        ExtractConfig(data="x", run=str(tmp_path), tile=256, nodata=float("nan")).validate()
    with pytest.raises(DuchError, match="`nodata` tiles scenes"):
        ExtractConfig(data="x", run=str(tmp_path), nodata=0).validate()
    assert "nodata" not in ExtractConfig(data="x", run="r", tile=256).output_settings()
