"""A mosaic of real UC Merced tiles as one GeoTIFF in UTM 11N near Merced, extracted as tiles, coded by a model
trained on a captioned archive (the tiny open_clip model), and searched by place and date: the geo metadata
through every stage, the filters before the top k, the GeoJSON output and thumbnails."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from duch.cli import main
from duch.data.geo import to_lonlat
from duch.pipeline import DuchError
from duch.pipeline.config import EncodeConfig
from duch.pipeline.formats.codes import PLACES, open_codes
from duch.pipeline.retrieval.filters import PlaceFilter, search_places
from duch.pipeline.retrieval.geojson import geojson
from duch.pipeline.retrieval.render import thumbnail
from duch.pipeline.retrieval.search import Index
from duch.stages.encode_archive import encode_archive

from .scenekit import AIRPLANE_AT, FOOT, MERCED, UTM11

ROOT = Path(__file__).resolve().parents[1]
AIRPLANE = f"merced/{AIRPLANE_AT[0]}_{AIRPLANE_AT[1]}"


def quiet(_):
    pass


def expected_corners(i: int, j: int) -> np.ndarray:
    x0, y0 = MERCED
    return np.array([[x0 + j * 256 * FOOT, y0 - i * 256 * FOOT], [x0 + (j + 1) * 256 * FOOT, y0 - i * 256 * FOOT],
                     [x0 + (j + 1) * 256 * FOOT, y0 - (i + 1) * 256 * FOOT],
                     [x0 + j * 256 * FOOT, y0 - (i + 1) * 256 * FOOT]])


def test_code_files_keep_every_tile_s_place(scenes):
    _, tables = open_codes(scenes["archive"] / "encode-archive" / "codes-64.h5")
    meta = tables["image"].meta
    assert set(PLACES) <= set(meta) and len(tables["image"]) == 64 and "text" not in tables
    row = list(meta["ids"]).index(AIRPLANE)
    np.testing.assert_allclose(meta["footprint"][row], expected_corners(*AIRPLANE_AT), atol=1e-6)
    np.testing.assert_allclose(meta["lonlat"][row], to_lonlat(UTM11, expected_corners(*AIRPLANE_AT)), atol=1e-9)
    assert (meta["path"][row], meta["scene"][row], meta["crs"][row], meta["date"][row]) == (
        "merced.tif", "merced", UTM11, "2021-06-03")
    assert list(meta["window"][row]) == [512, 1280, 256, 256]


def test_the_airplane_tile_searched_by_its_id_comes_first_with_its_footprint(scenes):
    """By its stored code, re-ranked by its continuous outputs: the tiny random model gives a few of the tile's
    turned and flipped copies the same 64 bits, and the cosine then puts the tile itself (cosine 1) first."""
    index = Index.load(scenes["archive"], bits=64, device="cpu")
    hits = index.search(id=AIRPLANE, k=5, rerank_top=64)
    top = hits[0]
    assert (top.id, top.distance, top.modality, top.score) == (AIRPLANE, 0, "image", pytest.approx(1.0))
    assert AIRPLANE in [h.id for h in index.search(id=AIRPLANE, k=64) if h.distance == 0]
    assert top.path == str(scenes["scene"]) and top.place.scene == "merced" and top.place.date == "2021-06-03"
    np.testing.assert_allclose(top.place.footprint, expected_corners(*AIRPLANE_AT), atol=1e-6)
    lonlat = np.array(top.place.lonlat)
    assert top.place.bounds == [lonlat[:, 0].min(), lonlat[:, 1].min(), lonlat[:, 0].max(), lonlat[:, 1].max()]
    assert -120.48 < top.place.bounds[0] < top.place.bounds[2] < -120.47  # near Merced, east of the origin
    assert all(h.score < top.score for h in hits[1:])
    assert np.array_equal(np.asarray(thumbnail(top, size=256)), scenes["tiles"][AIRPLANE_AT])
    assert thumbnail(top, size=64).size == (64, 64)


def corner_box(margin=1e-7):
    """The lon/lat box around the mosaic's upper-left 2 x 2 tiles (a hair wider)."""
    corners = to_lonlat(UTM11, np.concatenate([expected_corners(i, j) for i in (0, 1) for j in (0, 1)]))
    return (float(corners[:, 0].min()) - margin, float(corners[:, 1].min()) - margin,
            float(corners[:, 0].max()) + margin, float(corners[:, 1].max()) + margin)


def test_a_bbox_around_one_corner_returns_only_the_tiles_there(scenes):
    index = Index.load(scenes["archive"], bits=64, device="cpu")
    box = ",".join(repr(v) for v in corner_box())
    inside, matched = search_places(index, PlaceFilter.parse(bbox=box, inside=True), text="many planes", k=64)
    assert matched == 4 and {h.id for h in inside} == {"merced/0_0", "merced/0_1", "merced/1_0", "merced/1_1"}
    # Overlapping: the UTM grid is turned about 2 degrees from north here, so the box also cuts the neighbours.
    overlapping, matched = search_places(index, PlaceFilter.parse(bbox=box), text="many planes", k=64)
    ids = {h.id for h in overlapping}
    assert matched == len(ids) and {h.id for h in inside} < ids
    assert all(int(i) <= 2 and int(j) <= 2 for i, j in (x.split("/")[1].split("_") for x in ids))
    # The filter comes before the top k: k = 3 gives the 3 nearest of the 4, not those of the 64 that are there.
    everything = index.search(text="many planes", k=64)
    nearest = [h.id for h in everything if h.id in {x.id for x in inside}][:3]
    assert [h.id for h in search_places(index, PlaceFilter.parse(bbox=box, inside=True), text="many planes",
                                        k=3)[0]] == nearest


def test_dates_filter_before_the_top_k(scenes):
    index = Index.load(scenes["archive"], bits=64, device="cpu")
    hits, matched = search_places(index, PlaceFilter.parse(date_from="2021-06-03", date_to="2021-06-03"),
                                  id=AIRPLANE, k=10)
    assert matched == 64 and len(hits) == 10
    assert search_places(index, PlaceFilter.parse(date_from="2022-01-01"), id=AIRPLANE, k=10) == ([], 0)
    assert search_places(index, PlaceFilter.parse(date_to="2021-06-02"), id=AIRPLANE, k=10) == ([], 0)


def test_geojson_is_a_feature_collection_of_footprints(scenes):
    index = Index.load(scenes["archive"], bits=64, device="cpu")
    hits = index.search(id=AIRPLANE, k=3, rerank_top=64)
    doc = json.loads(json.dumps(geojson(hits, matched=64, query=f"item {AIRPLANE}")))
    assert doc["type"] == "FeatureCollection" and doc["matched"] == 64 and len(doc["features"]) == 3
    first = doc["features"][0]
    assert first["id"] == AIRPLANE and first["geometry"]["type"] == "Polygon"
    ring = np.array(first["geometry"]["coordinates"][0])
    assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
    assert np.sum(ring[:-1, 0] * ring[1:, 1] - ring[1:, 0] * ring[:-1, 1]) > 0  # counterclockwise
    assert sorted(map(tuple, ring[:4])) == sorted(map(tuple, np.array(hits[0].place.lonlat)))
    props = first["properties"]
    assert (props["rank"], props["distance"], props["scene"], props["date"]) == (1, 0, "merced", "2021-06-03")
    assert props["window"] == [512, 1280, 256, 256] and first["bbox"] == hits[0].place.bounds


def test_places_need_an_archive_of_scene_tiles(scenes, tiny_extract_run, tmp_path):
    index = Index.load(scenes["archive"], bits=64, device="cpu")
    with pytest.raises(DuchError, match="which are images: leave out `modality` text"):
        search_places(index, PlaceFilter.parse(date_from="2021-01-01"), id=AIRPLANE, k=3, modality="text")
    run = tmp_path / "plain"
    shutil.copytree(scenes["model"], run)
    encode_archive(EncodeConfig(run=str(run), device="cpu"), progress=False, echo=quiet)
    plain = Index.load(run, bits=64, device="cpu")
    hit = plain.search(id="0", k=2, modality="image")[0]
    assert hit.place is None and "place" not in hit.to_dict()
    assert thumbnail(hit, size=100).size == (100, 100)  # an image that is no scene tile: loaded as extract does
    with pytest.raises(DuchError, match="not extracted from GeoTIFF scenes with `tile`"):
        search_places(plain, PlaceFilter.parse(bbox="0,0,1,1"), id="0", k=3, modality="image")


def test_cli_search_by_place_counts_the_matches_and_says_what_is_wrong_with_a_bbox(scenes):
    runner = CliRunner()
    table = runner.invoke(main, ["search", "--run", str(scenes["archive"]), "--id", AIRPLANE, "-k", "3",
                                 "--rerank", "64", "--date-from", "2021-01-01", "--device", "cpu"])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0] == "filter: 64 of 64 tiles match dated 2021-01-01 to ..."
    assert AIRPLANE in lines[2] and "2021-06-03" in lines[2] and "-120.47" in lines[2]
    bad = runner.invoke(main, ["search", "--run", str(scenes["archive"]), "--id", AIRPLANE, "--bbox",
                               "-120.4,37.2,-120.5,37.4"])
    assert bad.exit_code == 2 and bad.stderr == ("error: --bbox '-120.4,37.2,-120.5,37.4': MINLON -120.4 is not below "
                                                 "MAXLON -120.5; give MINLON,MINLAT,MAXLON,MAXLAT (for a box across "
                                                 "the antimeridian, search each side of it apart)\n")


@pytest.mark.slow  # a process of its own (torch's import alone takes seconds)
def test_cli_geojson_goes_to_stdout_and_the_count_to_stderr(scenes):
    box = ",".join(repr(v) for v in corner_box())
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "search", "--run", str(scenes["archive"]), "--id",
                          AIRPLANE, "-k", "10", "--bbox", box, "--inside", "--geojson", "--device", "cpu"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["matched"] == 4 and len(doc["features"]) == 4 and doc["query"] == f"item {AIRPLANE}"
    assert "filter: 4 of 64 tiles match inside" in out.stderr
