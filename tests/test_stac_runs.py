"""STAC catalogs through the stages: extract over a real HTTP server (tests/httpkit.py) that stops mid-run and comes
back (the rerun makes only the failed items), and a coded archive of STAC tiles whose hits and thumbnails show
their items."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from duch.cli import main
from duch.data.scenes import load_tile
from duch.data.stac_scenes import read_catalog
from duch.pipeline.config import EncodeConfig, ExtractConfig
from duch.pipeline.retrieval.render import render
from duch.pipeline.retrieval.search import Index
from duch.stages.encode_archive import encode_archive
from duch.stages.extract import extract

from .httpkit import FileServer
from .stackit import item_collection, stac_item, write_json
from .test_stac import band_files


def noise_items(root, names, size=256, seed=0):
    """Items of three 8-bit band COGs each, of noise (no block compresses away: reads go to the server)."""
    rng = np.random.default_rng(seed)
    items = []
    for k, name in enumerate(names):
        bands = rng.integers(0, 256, (3, size, size), dtype=np.uint8)
        items.append(stac_item(name, band_files(root, name, bands), collection="demo", platform=f"sat-{k}",
                               **{"eo:cloud_cover": 10.0 * k}))
    write_json(root / "items.json", item_collection(items))


def config(data, run, spec, **kw):
    return ExtractConfig(data=data, run=str(run), image_encoder=spec, text_encoder=None, tile=128, image_views=0,
                         workers=0, device="cpu", **kw)


@pytest.fixture
def fast_failing(monkeypatch):
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "2")
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "1")


def test_a_server_gone_mid_run_rejects_its_items_and_the_rerun_makes_only_those(tmp_path, tiny_clip_spec,
                                                                                fast_failing):
    root, run = tmp_path / "www", tmp_path / "run"
    noise_items(root, ["a", "b", "c", "d"])
    said = []
    with FileServer(root) as server:
        server.stop_at["c/B0.tif"] = 16384  # c's first block past the header: the server goes
        cfg = config(f"{server.url}/items.json", run, tiny_clip_spec)
        first = extract(cfg, progress=False, echo=said.append).manifest
        assert first["counts"]["images"] == 8 and first["counts"]["rejects"] == 8
        assert {r["id"].split("/")[1] for r in first["rejects"]} == {"c", "d"}
        assert all(r["reason"].startswith("unreachable: cannot read the scene window") for r in first["rejects"])
        shards = sorted((run / "extract").glob("image-*.h5"))
        assert [p.name for p in shards] == [f"image-0000{k}.h5" for k in range(4)]  # one shard per item
        kept = {p.name: p.stat().st_mtime_ns for p in shards[:2]}
        server.start()
        said.clear()
        again = extract(cfg, progress=False, echo=said.append)
        # then up to date: nothing is left to try again
        assert not extract(cfg, progress=False, echo=lambda _: None).did_work
    assert again.did_work and "trying again 8 items or tiles the server failed to serve" in said[0]
    assert again.manifest["counts"]["images"] == 16 and again.manifest["rejects"] == []
    assert {p: (run / "extract" / p).stat().st_mtime_ns for p in kept} == kept  # a and b were not made again
    assert again.manifest["fingerprint"] == first["fingerprint"]


def test_a_stac_archive_s_hits_and_thumbnails_show_their_items(tmp_path, scenes, tiny_clip_spec, fast_failing,
                                                               monkeypatch):
    root, archive = tmp_path / "www", tmp_path / "archive"
    noise_items(root, ["p", "q"])
    monkeypatch.setenv("GDAL_HTTP_HEADERS", "Authorization: Bearer s3cret")
    with FileServer(root) as server:
        out = CliRunner().invoke(main, [
            "extract", "--data", f"{server.url}/items.json", "--run", str(archive), "--tile", "128", "--assets",
            "red,green,blue", "--max-cloud", "5", "--image-encoder", tiny_clip_spec, "--text-encoder", "none",
            "--image-views", "0", "--workers", "0", "--device", "cpu", "--no-progress"])
        assert out.exit_code == 0, out.output
        assert "4 tiles from 1 scenes" in out.output  # q (10 % cloud) left out
        encode_archive(EncodeConfig(run=str(scenes["model"]), archive=str(archive), device="cpu"), progress=False,
                       echo=lambda _: None)
        found = CliRunner().invoke(main, ["search", "--run", str(archive), "--id", "demo/p/0_1", "-k", "2",
                                          "--json"])
        assert found.exit_code == 0, found.output
        hits = json.loads(found.output)
        assert hits[0]["id"] == "demo/p/0_1" and hits[0]["place"]["date"] == "2021-06-03"
        stac = hits[0]["place"]["stac"]
        assert (stac["id"], stac["collection"], stac["properties"]) == ("p", "demo", {"platform": "sat-0",
                                                                                      "eo:cloud_cover": 0.0})
        assert stac["assets"]["B0"] == f"{server.url}/p/B0.tif" and "source" not in hits[0]["place"]
        # The thumbnail is the tile's window of the three files, as extract read it
        hit = Index.load(archive, bits=64, device="cpu").search(id="demo/p/1_0", k=1)[0]
        tile = next(i for i in read_catalog(f"{server.url}/items.json", config("", "", "").tile_options()).items
                    if i.id == "demo/p/1_0")
        assert np.array_equal(np.asarray(render(hit.path, hit.place)), np.asarray(load_tile("/", tile, 0)))
        # `duch add` takes a catalog too, with the run's recorded options (here --max-cloud 5: r kept, s left out)
        noise_items(root / "more", ["r", "s"], seed=1)
        added = CliRunner().invoke(main, ["add", "--run", str(archive), "--data", f"{server.url}/more/items.json",
                                          "--workers", "0", "--device", "cpu", "--no-progress"])
        assert added.exit_code == 0, added.output
        assert "add: 4 new and 0 replaced items" in added.output
        assert Index.load(archive, bits=64, device="cpu").search(id="demo/r/1_1", k=1)[0].id == "demo/r/1_1"
    manifest = (archive / "extract" / "manifest.json").read_text()
    assert "s3cret" not in manifest and json.loads(manifest)["dataset"]["kind"] == "stac"
