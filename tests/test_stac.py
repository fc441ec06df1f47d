"""STAC catalogs of COGs as scene archives: items, ItemCollections and nested catalogs (local, file://, and over
a real HTTP server on 127.0.0.1 that honours Range requests, tests/httpkit.py), bands from separate files, assets on
another grid, the filters, and the faults (5xx, 404, a stall, a server gone mid-run, bad items)."""
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from duch.data import DatasetError
from duch.data.scenes import TileOptions, load_tile, read_scenes
from duch.data.stac_scenes import read_catalog

from .httpkit import FileServer
from .scenekit import MERCED, north_up
from .stackit import catalog, item_collection, smooth_bands, stac_item, write_cog, write_json, write_stac_parquet

RGB = ("red", "green", "blue")


def band_files(root, name, bands, **cog):
    """One COG per band under root/name/, as a Landsat or Sentinel-2 item has them: {key: (href, [common])}."""
    assets = {}
    for k, common in enumerate(RGB):
        write_cog(root / name / f"B{k}.tif", bands[k:k + 1], **cog)
        assets[f"B{k}"] = (f"{name}/B{k}.tif", [common])
    return assets


def pixels(dataset):
    return {i.id: np.asarray(load_tile(dataset.images_dir, i, 0.0)) for i in dataset.items}


@pytest.fixture
def served(tmp_path):
    with FileServer(tmp_path / "www") as server:
        yield tmp_path / "www", server


def test_separate_band_assets_over_http_give_the_pixels_of_one_local_file(served, tmp_path):
    root, server = served
    bands = smooth_bands(3, 384, 512)
    write_cog(tmp_path / "local" / "one.tif", bands)
    assets = band_files(root, "scene", bands)
    write_json(root / "item.json", stac_item("scene", assets, collection="c", platform="testsat",
                                             **{"eo:cloud_cover": 12.5}))
    remote = read_catalog(f"{server.url}/item.json", TileOptions(tile=128))
    local = read_scenes(tmp_path / "local" / "one.tif", TileOptions(tile=128))
    assert not remote.rejects and remote.kind == "stac" and len(remote.items) == len(local.items) == 12
    assert remote.scenes[0].stretch == local.scenes[0].stretch  # from the overviews, the same in both
    scene = remote.scenes[0]
    assert (scene.name, scene.date, scene.crs, scene.transform) == ("c/scene", "2021-06-03", local.scenes[0].crs,
                                                                   local.scenes[0].transform)
    assert json.loads(scene.stac)["properties"] == {"platform": "testsat", "eo:cloud_cover": 12.5}
    server.reset_counts()
    got, want = pixels(remote), pixels(local)
    assert [i.id for i in remote.items] == [i.id.replace("one/", "c/scene/") for i in local.items]
    for tile_id, rgb in want.items():
        assert np.array_equal(got[tile_id.replace("one/", "c/scene/")], rgb), tile_id
    files = sum((root / "scene" / f"B{k}.tif").stat().st_size for k in range(3))
    assert server.sent <= 1.1 * files  # every block once (and the headers)
    server.reset_counts()
    with ThreadPoolExecutor(1) as fresh:  # a thread of its own opens the files again: one window's blocks
        fresh.submit(load_tile, remote.images_dir, remote.items[5], 0.0).result()
    assert 0 < server.sent < files / 4


def test_catalogs_collections_and_item_collections_are_walked_locally_and_over_http(served):
    root, server = served
    bands = smooth_bands(3, 128, 128, dtype=np.uint8, high=255)
    write_cog(root / "vis" / "visual.tif", bands)  # one 3-band asset named by its eo:bands
    write_cog(root / "vis" / "nir.tif", bands[:1])
    visual = {"visual": ("../../vis/visual.tif", list(RGB)), "nir": ("../../vis/nir.tif", ["nir"])}
    for name, when in (("x", "2020-01-02T00:00:00Z"), ("y", "2021-05-06T00:00:00Z")):
        write_json(root / "coll" / name / f"{name}.json", stac_item(name, visual, datetime=when, collection="coll"))
    write_json(root / "coll" / "collection.json", catalog("coll", [("item", "x/x.json"), ("item", "y/y.json"),
                                                                   ("self", "collection.json")], "Collection"))
    write_json(root / "catalog.json", catalog("root", [("child", "coll/collection.json"), ("root", "catalog.json"),
                                                       ("child", "coll/collection.json")]))
    for where in (f"{server.url}/catalog.json", str(root / "catalog.json"), f"file://{root / 'catalog.json'}"):
        ds = read_catalog(where, TileOptions(tile=64))
        assert [s.name for s in ds.scenes] == ["coll/x", "coll/y"] and not ds.rejects, where
        assert [s.date for s in ds.scenes] == ["2020-01-02", "2021-05-06"]
        assert ds.scenes[0].channels == tuple((str(root / "vis" / "visual.tif") if "://" not in where or
                                               where.startswith("file") else f"{server.url}/vis/visual.tif", b)
                                              for b in (1, 2, 3))
    tiles = pixels(read_catalog(str(root / "catalog.json"), TileOptions(tile=64)))
    assert np.array_equal(tiles["coll/x/0_1"], bands[:, :64, 64:].transpose(1, 2, 0))
    grey = pixels(read_catalog(str(root / "catalog.json"), TileOptions(tile=64, assets=("nir",))))
    assert np.array_equal(grey["coll/y/1_0"], np.repeat(bands[0, 64:, :64, None], 3, axis=2))
    # An ItemCollection of the same items, assets by key
    items = [json.loads((root / "coll" / n / f"{n}.json").read_text()) for n in ("x", "y")]
    write_json(root / "coll" / "x" / "items.json", item_collection(items))
    ds = read_catalog(str(root / "coll" / "x" / "items.json"), TileOptions(tile=64, assets=("nir",)))
    assert [s.name for s in ds.scenes] == ["coll/x", "coll/y"]
    with pytest.raises(DatasetError, match="cannot read the STAC catalog"):
        read_catalog(f"{server.url}/nothing.json", TileOptions(tile=64))


def test_assets_on_another_grid_are_read_onto_the_first_asset_s_grid(served):
    root, server = served
    fine = smooth_bands(3, 256, 256, dtype=np.uint8, high=255)
    write_cog(root / "g" / "red.tif", fine[:1])
    write_cog(root / "g" / "blue.tif", fine[2:3])
    coarse = fine[1:2].reshape(1, 128, 2, 128, 2).mean(axis=(2, 4)).round().astype(np.uint8)  # 2 m pixels
    write_cog(root / "g" / "green20.tif", coarse, transform=north_up(*MERCED, 2.0, 2.0))
    assets = {"r": ("g/red.tif", ["red"]), "g": ("g/green20.tif", ["green"]), "b": ("g/blue.tif", ["blue"])}
    write_json(root / "g.json", stac_item("g", assets))
    ds = read_catalog(f"{server.url}/g.json", TileOptions(tile=128))
    assert (ds.scenes[0].width, ds.scenes[0].height, len(ds.items)) == (256, 256, 4)
    rgb = pixels(ds)["g/1_1"].astype(float)
    assert np.array_equal(rgb[..., 0], fine[0, 128:, 128:]) and np.array_equal(rgb[..., 2], fine[2, 128:, 128:])
    # green warped (bilinear) from 2 m onto 1 m: within a few grey levels of the 1 m band it was averaged from
    assert np.abs(rgb[..., 1] - fine[1, 128:, 128:]).mean() < 6


def test_items_outside_the_dates_the_clouds_or_the_box_are_never_opened(served):
    root, server = served
    bands = smooth_bands(3, 256, 256, dtype=np.uint8, high=255)
    west, north = -120.48, 37.3  # the scenes' upper-left corner (MERCED in lon/lat)
    items = []
    for name, when, cloud, box in (("old", "2019-06-01T00:00:00Z", 5, None), ("cloudy", "2021-06-01T00:00:00Z", 80,
                                   None), ("far", "2021-06-01T00:00:00Z", 5, (10.0, 10.0, 10.1, 10.1)),
                                   ("kept", "2021-06-02T00:00:00Z", 5, None)):
        assets = band_files(root, name, bands)
        items.append(stac_item(name, assets, datetime=when, **{"eo:cloud_cover": cloud},
                               **({"bbox": box} if box else {})))
    write_json(root / "items.json", item_collection(items))
    box = (west - 0.001, north - 0.0003, west + 0.0004, north + 0.001)  # 35 x 33 m of the first tile
    ds = read_catalog(f"{server.url}/items.json", TileOptions(tile=64, max_cloud=50, date_from="2020-01-01",
                                                               date_to="2021-12-31", bbox=box))
    assert [s.name for s in ds.scenes] == ["kept"] and [i.id for i in ds.items] == ["kept/0_0"]
    assert all(server.requests[f"{n}/B{k}.tif"] == 0 for n in ("old", "cloudy", "far") for k in range(3))
    assert all(server.requests[f"kept/B{k}.tif"] > 0 for k in range(3))


def test_a_stac_geoparquet_file_lists_the_items_its_json_does(served, tmp_path):
    root, server = served
    bands = smooth_bands(3, 128, 128, dtype=np.uint8, high=255)
    items = [stac_item(n, band_files(root, n, bands), collection="pq", datetime=f"2021-06-0{k + 1}T10:00:00Z",
                       platform="testsat", **{"eo:cloud_cover": 20.0 * k}) for k, n in enumerate(("a", "b", "c"))]
    items[2]["assets"].pop("B1")  # an asset absent from one row: null in the assets struct
    write_json(root / "items.json", item_collection(items))
    write_stac_parquet(root / "items.parquet", items)
    options = TileOptions(tile=64, max_cloud=30)
    from_json = read_catalog(str(root / "items.json"), options)
    from_parquet = read_catalog(str(root / "items.parquet"), options)
    assert [s.name for s in from_parquet.scenes] == [s.name for s in from_json.scenes] == ["pq/a", "pq/b"]
    assert [(s.date, s.channels, json.loads(s.stac)) for s in from_parquet.scenes] == [
        (s.date, s.channels, json.loads(s.stac)) for s in from_json.scenes]
    assert json.loads(from_parquet.scenes[1].stac)["properties"] == {"platform": "testsat", "eo:cloud_cover": 20.0}
    got, want = pixels(from_parquet), pixels(from_json)
    assert len(got) == 8 and all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(DatasetError, match="not a stac-geoparquet file"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
        read_catalog(str(tmp_path / "other.parquet"), options)


@pytest.fixture
def faults(served, monkeypatch):
    root, server = served
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "1")
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "1")
    monkeypatch.setenv("GDAL_HTTP_HEADERS", "Authorization: Bearer s3cret-token")
    bands = smooth_bands(3, 128, 128, dtype=np.uint8, high=255)
    items = [stac_item(n, band_files(root, n, bands)) for n in ("flaky", "gone", "stalled", "fine")]
    port = server.url.rsplit(":", 1)[1]
    items[1]["assets"]["B1"]["href"] = f"http://user:pa55@127.0.0.1:{port}/gone/missing.tif?sig=s3cret-sig"
    items[0]["assets"]["B0"]["href"] = f"http://user:pa55@127.0.0.1:{port}/flaky/B0.tif?sig=s3cret-sig"
    items.append(stac_item("other", {"B8": ("fine/B0.tif", ["nir"]), "QA": ("fine/B1.tif", [])}))
    items.append({"type": "Feature", "id": "broken", "properties": {}})  # no assets
    write_json(root / "items.json", item_collection(items))
    server.faults["flaky/B0.tif"] = [500, 500]
    server.stalls["stalled/B2.tif"] = 2.5
    return root, server


def test_each_bad_item_is_one_reject_naming_it_and_the_rest_goes_on(faults, caplog):
    root, server = faults
    ds = read_catalog(f"{server.url}/items.json", TileOptions(tile=64))
    assert [s.name for s in ds.scenes] == ["flaky", "fine"]  # flaky: two 500s, then served
    reasons = {r.id: r.reason for r in ds.rejects}
    assert set(reasons) == {"gone", "stalled", "other", "broken"}
    assert all("\n" not in r for r in reasons.values())
    assert reasons["gone"] == f"{server.url}/gone/missing.tif: HTTP response code: 404"
    assert reasons["stalled"].startswith(f"unreachable: {server.url}/stalled/B2.tif: ")
    assert "timed out" in reasons["stalled"]
    assert reasons["other"] == ("no asset 'red' by key or band common name; its assets: B8 (nir), QA; choose them "
                                "with `assets`")
    assert reasons["broken"] == "malformed STAC item: `assets` and `properties` must be objects"
    assert server.requests["flaky/B0.tif"] >= 3
    assert any(h.get("Authorization") == "Bearer s3cret-token" for h in server.headers_seen)
    shown = repr(ds.rejects) + "".join(s.stac for s in ds.scenes)  # what manifests, hits and the page show
    assert "s3cret" not in shown and "pa55" not in shown and f"{server.url}/flaky/B0.tif" in shown
    assert f"{server.url}/flaky/B0.tif Retrying" in caplog.text
    assert "s3cret" not in caplog.text and "pa55" not in caplog.text


def test_stac_items_makes_a_catalog_of_one_s_own_cogs_that_extract_reads(tmp_path):
    from click.testing import CliRunner

    from duch import cli

    bands = smooth_bands(3, 128, 192, dtype=np.uint8, high=255)
    write_cog(tmp_path / "cogs" / "one.tif", bands)
    write_cog(tmp_path / "cogs" / "two.tif", bands[::-1].copy())
    (tmp_path / "cogs" / "two.json").write_text('{"date": "2022-02-02"}')
    cogs = [str(tmp_path / "cogs" / "one.tif"), str(tmp_path / "cogs" / "two.tif")]
    out = CliRunner().invoke(cli.main, ["stac-items", *cogs, "--out", str(tmp_path / "cat" / "items.json"),
                                        "--date", "2021-01-01", "--common-names", "red,green,blue"])
    assert out.exit_code == 0, out.output
    doc = json.loads((tmp_path / "cat" / "items.json").read_text())
    assert [f["assets"]["image"]["href"] for f in doc["features"]] == ["../cogs/one.tif", "../cogs/two.tif"]
    assert [f["properties"]["datetime"] for f in doc["features"]] == ["2021-01-01T00:00:00Z", "2022-02-02T00:00:00Z"]
    ds = read_catalog(str(tmp_path / "cat" / "items.json"), TileOptions(tile=64, date_from="2022-01-01"))
    local = read_scenes(tmp_path / "cogs" / "two.tif", TileOptions(tile=64))
    got, want = pixels(ds), pixels(local)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    bad = CliRunner().invoke(cli.main, ["stac-items", str(tmp_path / "cogs" / "one.tif"), "--out",
                                        str(tmp_path / "x.json")])
    assert bad.exit_code == 2 and "one.tif: no acquisition date in a sidecar, dates.csv or its metadata; give --date" \
        in bad.output
    bad = CliRunner().invoke(cli.main, ["stac-items", str(tmp_path / "cogs" / "two.tif"), "--out",
                                        str(tmp_path / "x.json"), "--common-names", "red,green"])
    assert bad.exit_code == 2 and "3 bands, but 2 common names given" in bad.output


def test_catalog_options_are_checked_before_anything_is_read(tmp_path):
    from duch.pipeline import DuchError
    from duch.pipeline.config import ExtractConfig

    for settings, said in ((dict(data="https://x/c.json"), "give `tile`"),
                           (dict(data="c.json", tile=256, bands=(1, 2, 3)), "chosen by `assets`"),
                           (dict(data="c.json", tile=256, assets=("red", "green")), "give three asset keys"),
                           (dict(data="scenes/", tile=256, assets=("red",)), "`data` is not one"),
                           (dict(data="c.json", tile=256, max_cloud=120), "`max_cloud` is a percentage"),
                           (dict(data="c.json", tile=256, bbox=(1, 2, 0, 3)), "`bbox` 1,2,0,3: give min lon"),
                           (dict(data="c.json", tile=256, date_from="2021-02-01", date_to="2021-01-01"),
                            "is after `date_to`")):
        with pytest.raises(DuchError, match=said):
            ExtractConfig(run=str(tmp_path), **settings).validate()
