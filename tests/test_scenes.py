"""GeoTIFF scenes cut into tile items: windows, pixels, stretch, nodata, dates, footprints, and bad scenes;
scenes written with rasterio in each test."""
import json

import numpy as np
import pytest
import rasterio
import tifffile
from click.testing import CliRunner

from duch import cli
from duch.data import DatasetError
from duch.data.geo import to_lonlat
from duch.data.images import raster_to_rgb8
from duch.data.scenes import TileOptions, TileSkipped, load_tile, place_columns, read_scenes, read_window
from duch.pipeline import DuchError
from duch.pipeline.config import ExtractConfig
from duch.pipeline.formats.shards import read_shard
from duch.stages.extract import extract

from .conftest import TINY_CLIP
from .scenekit import MERCED, UTM11, north_up, write_mosaic, write_scene


def quiet(_):
    pass


def smooth(count, height, width, dtype, seed=0, high=255):
    """A scene with structure and every value of its range, so that stretches and windows are checked in full."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, high, (count, height, width), endpoint=True).astype(dtype)


def tiles_of(dataset):
    return {item.id: item for item in dataset.items}


def tiny(tmp_path):
    """The tiny open_clip config with random weights (tests/conftest.py), as an encoder spec."""
    path = tmp_path / "tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return f"open_clip:{path}:none"


def test_a_mosaic_of_real_tiles_is_cut_back_into_the_same_pixels(tmp_path):
    path, tiles = write_mosaic(tmp_path / "scenes" / "merced.tif")
    dataset = read_scenes(tmp_path / "scenes", TileOptions(tile=256))
    assert dataset.kind == "scenes" and len(dataset.items) == 64 and not dataset.rejects
    items = tiles_of(dataset)
    for (i, j), pixels in tiles.items():
        item = items[f"merced/{i}_{j}"]
        assert item.image == "merced.tif" and item.tile.window == (j * 256, i * 256, 256, 256)
        assert np.array_equal(np.asarray(load_tile(tmp_path / "scenes", item, 0.9)), pixels), (i, j)
    scene = dataset.scenes[0]
    assert (scene.crs, scene.bands, scene.stretch, scene.date) == (UTM11, (1, 2, 3), None, "2021-06-03")
    assert scene.date_source == "metadata ACQUISITIONDATETIME"


def test_a_scene_not_a_multiple_of_the_tile_ends_with_shifted_tiles(tmp_path):
    bands = smooth(3, 520, 600, np.uint8)
    write_scene(tmp_path / "s" / "odd.tif", bands)
    dataset = read_scenes(tmp_path / "s" / "odd.tif", TileOptions(tile=256))
    items = tiles_of(dataset)
    assert sorted(items) == [f"odd/{i}_{j}" for i in range(3) for j in range(3)]
    last = items["odd/2_2"]
    assert last.tile.window == (344, 264, 256, 256)
    rgb = np.asarray(load_tile(tmp_path / "s", last, 0.9))
    assert np.array_equal(rgb, bands[:, 264:520, 344:600].transpose(1, 2, 0))
    strided = read_scenes(tmp_path / "s" / "odd.tif", TileOptions(tile=256, stride=128))
    assert [i.tile.window[:2] for i in strided.items][:4] == [(0, 0), (128, 0), (256, 0), (344, 0)]


def test_a_scene_smaller_than_the_tile_is_padded_and_the_padding_is_not_valid(tmp_path):
    bands = smooth(3, 300, 200, np.uint8)
    write_scene(tmp_path / "small.tif", bands)
    dataset = read_scenes(tmp_path / "small.tif", TileOptions(tile=256))
    assert [i.tile.window for i in dataset.items] == [(0, 0, 200, 256), (0, 44, 200, 256)]
    rgb, valid = read_window(tmp_path / "small.tif", (0, 0, 200, 256), (1, 2, 3), None, 256)
    assert rgb.shape == (256, 256, 3) and valid == pytest.approx(200 / 256)
    assert np.array_equal(rgb[:, :200], bands[:, :256].transpose(1, 2, 0)) and not rgb[:, 200:].any()
    with pytest.raises(TileSkipped, match="78.1% of its pixels are valid, below `min_valid` 0.9"):
        load_tile(tmp_path, dataset.items[0], 0.9)
    assert load_tile(tmp_path, dataset.items[0], 0.75).size == (256, 256)


def test_a_16_bit_4_band_scene_is_stretched_once_so_neighbouring_tiles_agree(tmp_path):
    """Bands 4,3,2 of a 16-bit scene: every tile is the whole scene's 8-bit rendering (data/images.py's rule
    over the scene, not over the tile) cut at its window, so the tiles join up without seams."""
    bands = smooth(4, 520, 600, np.uint16, high=4000)
    bands[3, :100] += 20000  # one band much brighter in one corner: a per-tile stretch would differ between tiles
    write_scene(tmp_path / "s2.tif", bands)
    dataset = read_scenes(tmp_path / "s2.tif", TileOptions(tile=256, bands=(4, 3, 2)))
    whole = raster_to_rgb8(bands[[3, 2, 1]])
    scene = dataset.scenes[0]
    assert scene.bands == (4, 3, 2) and scene.dtype == "uint16" and scene.stretch is not None
    for item in dataset.items:
        c, r, w, h = item.tile.window
        assert np.array_equal(np.asarray(load_tile(tmp_path, item, 0.9)), whole[r:r + h, c:c + w]), item.id
    grey = read_scenes(tmp_path / "s2.tif", TileOptions(tile=256, bands=(2,)))
    rgb = np.asarray(load_tile(tmp_path, grey.items[0], 0.9))
    assert np.array_equal(rgb[..., 0], rgb[..., 2]) and np.array_equal(rgb, raster_to_rgb8(bands[1])[:256, :256])


def test_a_large_scene_s_stretch_comes_from_every_f_th_row_and_column(tmp_path):
    """2100 pixels wide: f = 3, so the sample is rows and columns 0, 3, 6..., across the 1024-pixel windows it is
    read by."""
    bands = smooth(3, 700, 2100, np.uint16, seed=3, high=60000)
    write_scene(tmp_path / "wide.tif", bands, block=256)
    scene = read_scenes(tmp_path / "wide.tif", TileOptions(tile=256)).scenes[0]
    assert scene.stretch == tuple(np.percentile(bands[:, ::3, ::3].astype(float), [2, 98]))
    assert scene.stretch != tuple(np.percentile(bands.astype(float), [2, 98]))


def test_nodata_borders_skip_tiles_and_render_black(tmp_path):
    bands = smooth(3, 512, 768, np.uint16, high=3000) + 1
    bands[:, :, :300] = 0  # a scene edge: nodata over the first 300 columns
    write_scene(tmp_path / "edge.tif", bands, nodata=0)
    dataset = read_scenes(tmp_path / "edge.tif", TileOptions(tile=256))
    items = tiles_of(dataset)
    with pytest.raises(TileSkipped):
        load_tile(tmp_path, items["edge/0_0"], 0.9)  # no valid pixel
    with pytest.raises(TileSkipped, match="82.8% of its pixels"):
        load_tile(tmp_path, items["edge/0_1"], 0.9)  # columns 256..299 nodata: 212 of 256 valid
    rgb = np.asarray(load_tile(tmp_path, items["edge/0_1"], 0.8))
    assert not rgb[:, :44].any() and rgb[:, 44:].any()
    low, high = dataset.scenes[0].stretch
    valid = bands[:, :, 300:].astype(float)
    assert (low, high) == tuple(np.percentile(valid, [2, 98]))  # the stretch sees the valid pixels only
    result = extract(ExtractConfig(data=str(tmp_path / "edge.tif"), run=str(tmp_path / "run"), image_views=0,
                                   image_encoder=tiny(tmp_path), tile=256, workers=0, device="cpu"), progress=False,
                     echo=quiet)
    assert result.manifest["counts"]["tiles_skipped"] == 4 and result.manifest["counts"]["rejects"] == 0
    assert result.manifest["scenes"][0]["tiles"] == 6 and result.manifest["scenes"][0]["tiles_skipped"] == 4
    shard = read_shard(tmp_path / "run" / "extract" / "image-00000.h5")
    assert list(shard["skipped_id"]) == ["edge/0_0", "edge/0_1", "edge/1_0", "edge/1_1"]
    assert list(shard["ids"]) == ["edge/0_2", "edge/1_2"]


def test_an_epsg_4326_scene_has_footprints_in_degrees(tmp_path):
    transform = north_up(-120.5, 37.35, 0.0001, 0.0001)
    write_scene(tmp_path / "geo" / "wgs84.tif", smooth(3, 512, 512, np.uint8), crs="EPSG:4326", transform=transform)
    run = tmp_path / "run"
    extract(ExtractConfig(data=str(tmp_path / "geo"), run=str(run), image_encoder=tiny(tmp_path), text_encoder=None,
                          tile=256, workers=0, device="cpu", image_views=0), progress=False, echo=quiet)
    shard = read_shard(run / "extract" / "image-00000.h5")
    assert list(shard["ids"]) == ["wgs84/0_0", "wgs84/0_1", "wgs84/1_0", "wgs84/1_1"]
    np.testing.assert_allclose(shard["footprint"][3], [[-120.4744, 37.3244], [-120.4488, 37.3244],
                                                       [-120.4488, 37.2988], [-120.4744, 37.2988]], atol=1e-9)
    np.testing.assert_allclose(shard["lonlat"], shard["footprint"], atol=1e-9)
    np.testing.assert_allclose(shard["bounds"][3], [-120.4744, 37.2988, -120.4488, 37.3244], atol=1e-9)
    assert set(shard["crs"]) == {"EPSG:4326"} and set(shard["date"]) == {""}


def test_a_utm_scene_has_footprints_in_metres_and_in_lon_lat(tmp_path):
    write_scene(tmp_path / "utm" / "a.tif", smooth(3, 256, 512, np.uint8),
                tags={"TIFFTAG_DATETIME": "2020:01:02 03:04:05"})
    run = tmp_path / "run"
    # One loader process: a forked worker opens the scene for itself.
    result = extract(ExtractConfig(data=str(tmp_path / "utm"), run=str(run), image_encoder=tiny(tmp_path), tile=256,
                                   workers=1, device="cpu", image_views=1), progress=False, echo=quiet)
    shard = read_shard(run / "extract" / "image-00000.h5")
    x0, y0 = MERCED
    corners = [[x0 + 256, y0], [x0 + 512, y0], [x0 + 512, y0 - 256], [x0 + 256, y0 - 256]]
    np.testing.assert_allclose(shard["footprint"][1], corners)
    np.testing.assert_allclose(shard["lonlat"][1], to_lonlat(UTM11, np.array(corners)))
    assert abs(shard["lonlat"][0, 0] - [-120.48, 37.30]).max() < 1e-6
    assert list(shard["window"][1]) == [256, 0, 256, 256] and list(shard["bands"][0]) == [1, 2, 3]
    assert np.isnan(shard["stretch"]).all() and set(shard["date"]) == {"2020-01-02"}
    assert shard["views"].shape[:2] == (2, 1)
    scene = result.manifest["scenes"][0]
    assert (scene["tiles"], scene["tiles_skipped"], scene["date_source"]) == (2, 0, "metadata TIFFTAG_DATETIME")
    assert result.manifest["counts"]["tiles_skipped"] == 0


def test_dates_come_from_the_most_specific_source(tmp_path):
    folder = tmp_path / "dated"
    tags = {"a": {"TIFFTAG_DATETIME": "2001:01:01 00:00:00"}, "b": {"SENSING_TIME": "2002-02-02T10:00:00Z"},
            "c": {"DATE_ACQUIRED": "2003-03-03"}, "d": {}, "e": {"TIFFTAG_DATETIME": "2005:05:05 00:00:00"}}
    for name, t in tags.items():
        write_scene(folder / f"{name}.tif", smooth(3, 64, 64, np.uint8), tags=t)
    (folder / "a.json").write_text(json.dumps({"date": "2011-11-11"}))
    (folder / "dates.csv").write_text("scene,date\nb.tif,2012-12-12\nc,2013-01-13\n")
    found = {s.name: (s.date, s.date_source) for s in read_scenes(folder, TileOptions(64, date="2020-02-20")).scenes}
    assert found == {"a": ("2011-11-11", "sidecar a.json"), "b": ("2012-12-12", "sidecar dates.csv"),
                     "c": ("2013-01-13", "sidecar dates.csv"), "d": ("2020-02-20", "--date"),
                     "e": ("2020-02-20", "--date")}  # --date goes before the file's own creation time
    found = {s.name: s.date for s in read_scenes(folder, TileOptions(64)).scenes}
    assert (found["d"], found["e"]) == (None, "2005-05-05")
    (folder / "a.json").write_text(json.dumps({"date": "yesterday"}))
    with pytest.raises(DatasetError, match=r"a.json: 'yesterday' is not a date"):
        read_scenes(folder, TileOptions(64))


def test_dates_csv_is_read_by_the_rules_of_every_csv(tmp_path):
    """dates.csv follows the CSV rules of docs/stages.md: UTF-8 with or without a byte-order mark (as a spreadsheet
    saves it), any other encoding refused by name."""
    folder = tmp_path / "dated"
    write_scene(folder / "b.tif", smooth(3, 64, 64, np.uint8))
    (folder / "dates.csv").write_bytes(b"\xef\xbb\xbfscene,date\r\nb.tif,2012-12-12\r\n")
    assert read_scenes(folder, TileOptions(64)).scenes[0].date == "2012-12-12"
    (folder / "dates.csv").write_text("scene,date\nb.tif,2012-12-12\n", encoding="utf-16")
    with pytest.raises(DatasetError, match=r"dates.csv: .*UTF-16.*save the file as UTF-8"):
        read_scenes(folder, TileOptions(64))


def test_a_scene_without_a_crs_is_refused_with_its_fix_or_gets_pixel_footprints(tmp_path):
    write_scene(tmp_path / "plain" / "nocrs.tif", smooth(3, 256, 256, np.uint8), crs=None)
    out = CliRunner().invoke(cli.main, ["extract", "--data", str(tmp_path / "plain"), "--run", str(tmp_path / "r"),
                                        "--tile", "256"])
    assert out.exit_code == 2
    assert "nocrs.tif: the scene has no coordinate reference system (CRS)" in out.output
    assert "--allow-ungeoreferenced" in out.output and out.output.count("\n") == 1
    dataset = read_scenes(tmp_path / "plain", TileOptions(256, allow_ungeoreferenced=True))
    assert dataset.scenes[0].crs == "" and len(dataset.items) == 1
    places = place_columns([i.tile for i in dataset.items])
    assert places["footprint"][0].tolist() == [[0, 0], [256, 0], [256, 256], [0, 256]]  # pixels
    assert np.isnan(places["lonlat"]).all() and np.isnan(places["bounds"]).all()


def test_a_local_grid_that_does_not_convert_to_lon_lat_is_refused_or_kept_in_its_own_crs(tmp_path):
    local = 'LOCAL_CS["Site grid",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
    write_scene(tmp_path / "site" / "grid.tif", smooth(3, 64, 64, np.uint8), crs=local,
                transform=north_up(1000, 2000, 0.5, 0.5))
    with pytest.raises(DatasetError, match=r"grid.tif: the scene's CRS \(Site grid\) does not convert to lon/lat"):
        read_scenes(tmp_path / "site", TileOptions(64))
    dataset = read_scenes(tmp_path / "site", TileOptions(64, allow_ungeoreferenced=True))
    places = place_columns([i.tile for i in dataset.items])
    assert places["footprint"][0].tolist() == [[1000, 2000], [1032, 2000], [1032, 1968], [1000, 1968]]
    assert "Site grid" in places["crs"][0] and np.isnan(places["lonlat"]).all()


def test_corrupt_and_truncated_scenes_are_rejected_by_name_and_the_run_goes_on(tmp_path):
    folder = tmp_path / "mixed"
    write_scene(folder / "good.tif", smooth(3, 256, 512, np.uint8))
    whole = write_scene(tmp_path / "whole.tif", smooth(3, 512, 512, np.uint8), block=256)
    (folder / "cut.tif").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (folder / "junk.tif").write_bytes(b"II*\x00" + b"\x07" * 500)
    (folder / "empty.tif").write_bytes(b"")
    damaged = write_scene(folder / "damaged.tif", smooth(3, 512, 512, np.uint8, seed=1), block=256)
    with tifffile.TiffFile(damaged) as tif:  # the last of its four blocks overwritten: one tile cannot be read
        start, length = tif.pages[0].dataoffsets[3], tif.pages[0].databytecounts[3]
    data = bytearray(damaged.read_bytes())
    data[start:start + length] = b"\x55" * length
    damaged.write_bytes(bytes(data))
    run = tmp_path / "run"
    said = []
    result = extract(ExtractConfig(data=str(folder), run=str(run), image_encoder=tiny(tmp_path), tile=256, workers=0,
                                   device="cpu", image_views=0), progress=False, echo=said.append)
    rejects = {r["id"]: r["reason"] for r in result.manifest["rejects"]}
    assert set(rejects) == {"cut", "junk", "empty", "damaged/1_1"}
    assert rejects["cut"].startswith("truncated file") and "not a readable GeoTIFF" in rejects["junk"]
    assert rejects["damaged/1_1"].startswith("cannot read the scene window 256,256,256,256")
    assert result.manifest["counts"]["images"] == 5
    assert [s["scene"] for s in result.manifest["scenes"]] == ["damaged", "good"]
    assert any("4 items skipped" in s for s in said)


def test_a_band_out_of_range_is_one_error_naming_the_scene(tmp_path):
    write_scene(tmp_path / "rgb" / "three.tif", smooth(3, 64, 64, np.uint8))
    out = CliRunner().invoke(cli.main, ["extract", "--data", str(tmp_path / "rgb"), "--run", str(tmp_path / "r"),
                                        "--tile", "64", "--bands", "4,3,2"])
    assert out.exit_code == 2 and out.output.count("\n") == 1
    assert "three.tif: --bands 4,3,2 names band 4, but the scene has 3 bands (1-3)" in out.output


def test_the_cli_extracts_scenes_with_every_scene_option(tmp_path):
    bands = smooth(4, 300, 384, np.uint16, high=5000)
    write_scene(tmp_path / "cli" / "s2.tif", bands)
    out = CliRunner().invoke(cli.main, [
        "extract", "--data", str(tmp_path / "cli"), "--run", str(tmp_path / "run"), "--tile", "256", "--stride",
        "128", "--bands", "4,3,2", "--min-valid", "0.5", "--date", "2021-06-03", "--image-encoder", tiny(tmp_path),
        "--text-encoder", "none", "--image-views", "0", "--workers", "0", "--device", "cpu", "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "4 tiles from 1 scenes; 0 tiles skipped" in out.output
    manifest = json.loads((tmp_path / "run" / "extract" / "manifest.json").read_text())
    settings = manifest["basis"]["settings"]
    assert (settings["tile"], settings["stride"], settings["bands"], settings["min_valid"], settings["date"]) == (
        256, 128, [4, 3, 2], 0.5, "2021-06-03")
    scene = manifest["scenes"][0]
    assert (scene["bands"], scene["date"], scene["date_source"], scene["band_count"]) == ([4, 3, 2], "2021-06-03",
                                                                                      "--date", 4)
    shard = read_shard(tmp_path / "run" / "extract" / "image-00000.h5")
    assert [list(w) for w in shard["window"]] == [[0, 0, 256, 256], [128, 0, 256, 256], [0, 44, 256, 256],
                                                  [128, 44, 256, 256]]


@pytest.mark.parametrize("settings, said", [
    (dict(bands=(4, 3)), "give three band numbers"), (dict(bands=(0, 1, 2)), "counted from 1"),
    (dict(min_valid=1.5), "`min_valid` must be between 0 and 1"), (dict(date="03/06/2021"), "YYYY-MM-DD"),
    (dict(stride=-1), "`tile` and `stride` must be 0 or more"), (dict(images="x"), "`images` names"),
])
def test_scene_options_are_checked_before_anything_is_read(tmp_path, settings, said):
    with pytest.raises(DuchError, match=said):
        ExtractConfig(data="x", run=str(tmp_path), tile=256, **settings).validate()


def test_scene_options_need_tile(tmp_path):
    with pytest.raises(DuchError, match="`bands`, `min_valid` tile scenes; give `tile`"):
        ExtractConfig(data="x", run=str(tmp_path), bands=(1, 2, 3), min_valid=0.5).validate()


def test_scene_options_stay_out_of_the_fingerprint_at_their_defaults(tmp_path):
    plain = ExtractConfig(data="x", run="r").output_settings()
    assert not {"tile", "stride", "bands", "min_valid", "date", "allow_ungeoreferenced"} & set(plain)
    tiled = ExtractConfig(data="x", run="r", tile=256, bands=[4, 3, 2]).output_settings()
    assert (tiled["tile"], tiled["bands"]) == (256, (4, 3, 2)) and "min_valid" not in tiled


def test_a_scene_run_is_up_to_date_until_a_date_sidecar_changes(tmp_path):
    folder = tmp_path / "scenes"
    write_scene(folder / "a.tif", smooth(3, 256, 256, np.uint8))
    cfg = ExtractConfig(data=str(folder), run=str(tmp_path / "run"), image_encoder=tiny(tmp_path), tile=256,
                        workers=0, device="cpu", image_views=0)
    assert extract(cfg, progress=False, echo=quiet).did_work
    assert not extract(cfg, progress=False, echo=quiet).did_work
    (folder / "a.json").write_text('{"date": "2021-06-03"}')
    with pytest.raises(DuchError, match="made from other settings or inputs"):
        extract(cfg, progress=False, echo=quiet)


def test_a_text_list_of_scenes_stays_inside_its_folder(tmp_path):
    write_scene(tmp_path / "d" / "x.tif", smooth(3, 64, 64, np.uint8))
    (tmp_path / "d" / "list.txt").write_text("# scenes\nx.tif\n\n")
    assert [i.id for i in read_scenes(tmp_path / "d" / "list.txt", TileOptions(64)).items] == ["x/0_0"]
    (tmp_path / "d" / "list.txt").write_text("../elsewhere.tif\n")
    with pytest.raises(DatasetError, match="leaves the images folder"):
        read_scenes(tmp_path / "d" / "list.txt", TileOptions(64))
    (tmp_path / "none").mkdir()
    with pytest.raises(DatasetError, match="no scenes found"):
        read_scenes(tmp_path / "none", TileOptions(64))


def test_windows_read_with_gdal_s_cache_bounded(tmp_path):
    """GDAL's block cache would otherwise hold up to 5% of the RAM of an earlier scene's blocks."""
    from duch.data import scenes

    path = write_scene(tmp_path / "c.tif", smooth(3, 64, 64, np.uint8))
    with scenes._env():
        assert rasterio.env.getenv()["GDAL_CACHEMAX"] == scenes.GDAL_CACHE_MB
    assert read_window(path, (0, 0, 64, 64), (1, 2, 3), None)[1] == 1.0


def test_windows_read_from_several_threads_at_once_are_the_windows(tmp_path):
    """The service renders tile thumbnails on a pool of threads: each thread reads through its own GDAL dataset
    (one shared by two threads at once fails reads, and can crash the process)."""
    from concurrent.futures import ThreadPoolExecutor

    path, tiles = write_mosaic(tmp_path / "mosaic.tif")
    windows = [((j * 256, i * 256, 256, 256), tiles[(i, j)]) for i in range(8) for j in range(8)] * 4
    with ThreadPoolExecutor(8) as pool:
        read = list(pool.map(lambda w: read_window(path, w[0], (1, 2, 3), None)[0], windows))
    assert all(np.array_equal(got, want) for got, (_, want) in zip(read, windows))
