"""`duch serve` over a scene archive (the 8 x 8 Merced mosaic of real UCM tiles, conftest's `scenes`), with a plain
archive of the same model beside it: place filters in the API before the top k, hits' places, GeoJSON, scene
outlines, the archive's extent, and tile thumbnails rendered from the scene window."""
import asyncio
import io
import shutil
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from duch.cli import main
from duch.data.geo import to_lonlat
from duch.pipeline import DuchError
from duch.pipeline.config import EncodeConfig, ServeConfig
from duch.pipeline.retrieval.filters import PlaceFilter, search_places
from duch.pipeline.retrieval.geojson import geojson
from duch.pipeline.retrieval.search import Index
from duch.pipeline.serve.app import create_app
from duch.pipeline.serve.thumbs import Thumbnails, thumbnail_jpeg
from duch.stages.encode_archive import encode_archive

from .scenekit import AIRPLANE_AT, FOOT, MERCED, UTM11
from .serving import running
from .test_scene_search import AIRPLANE, corner_box

CORNER = {"merced/0_0", "merced/0_1", "merced/1_0", "merced/1_1"}


@pytest.fixture(scope="module")
def served(scenes, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("served-scenes")
    archive, plain = root / "scenes", root / "plain"
    shutil.copytree(scenes["archive"], archive)  # the service caches thumbnails in the archive's run
    shutil.copytree(scenes["model"], root / "model")  # where the archive's codes say their model is
    shutil.copytree(scenes["model"], plain)
    encode_archive(EncodeConfig(run=str(plain), device="cpu"), progress=False, echo=lambda _: None)
    return {"archive": archive, "plain": plain}


@pytest.fixture(scope="module")
def base(served):
    app = create_app(ServeConfig(run=str(served["archive"]), bits=64, device="cpu", archives=(str(served["plain"]),)))
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def index(served) -> Index:
    return Index.load(served["archive"], bits=64, device="cpu")


def post(base, **fields) -> httpx.Response:
    return httpx.post(f"{base}/api/search", json=fields, timeout=30)


def box_text(box) -> str:
    return ",".join(repr(v) for v in box)


def test_a_box_and_dates_filter_before_the_top_k_as_the_library_does(base, index):
    box = corner_box()
    for kind in (box_text(box), list(box)):  # "MINLON,MINLAT,MAXLON,MAXLAT" or four numbers
        answer = post(base, text="many planes", k=3, bbox=kind, inside=True).json()
        expected, matched = search_places(index, PlaceFilter.parse(bbox=box_text(box), inside=True),
                                          text="many planes", k=3)
        assert answer["matched"] == matched == 4 and len(answer["hits"]) == 3
        assert [(h["id"], h["distance"]) for h in answer["hits"]] == [(h.id, h.distance) for h in expected]
        assert answer["filter"] == {"label": None, "bbox": list(box), "inside": True, "date_from": None,
                                    "date_to": None, "near": None}
    every = post(base, text="many planes", k=64, bbox=box_text(box), inside=True).json()
    assert {h["id"] for h in every["hits"]} == CORNER  # all it lets through, never fewer
    overlapping = post(base, text="many planes", k=64, bbox=box_text(box)).json()
    _, matched = search_places(index, PlaceFilter.parse(bbox=box_text(box)), text="many planes", k=64)
    assert overlapping["matched"] == matched == len(overlapping["hits"]) and CORNER < {
        h["id"] for h in overlapping["hits"]}
    paged = post(base, text="many planes", k=2, offset=2, bbox=box_text(box)).json()
    assert [h["id"] for h in paged["hits"]] == [h["id"] for h in overlapping["hits"][2:4]]
    dated = post(base, id=AIRPLANE, k=10, date_from="2021-06-03", date_to="2021-06-03").json()
    assert dated["matched"] == 64 and len(dated["hits"]) == 10 and dated["modality"] == "image"
    for dates in ({"date_from": "2021-06-04"}, {"date_to": "2021-06-02"}):
        none = post(base, id=AIRPLANE, k=10, **dates).json()
        assert (none["matched"], none["hits"]) == (0, [])


def test_each_hit_and_item_of_a_scene_archive_carries_its_place(base, index):
    answer = post(base, id=AIRPLANE, k=5, rerank=64).json()
    expected = index.search(id=AIRPLANE, k=5, rerank_top=64)
    assert [h["place"] for h in answer["hits"]] == [h.place.to_dict() for h in expected]
    first = answer["hits"][0]["place"]
    assert (answer["hits"][0]["id"], first["scene"], first["window"], first["crs"], first["date"]) == (
        AIRPLANE, "merced", [512, 1280, 256, 256], UTM11, "2021-06-03")
    x0, y0 = MERCED[0] + 512 * FOOT, MERCED[1] - 1280 * FOOT
    np.testing.assert_allclose(first["footprint"][0], [x0, y0], atol=1e-6)
    np.testing.assert_allclose(first["lonlat"][0], to_lonlat(UTM11, np.array([x0, y0])), atol=1e-9)
    item = httpx.get(f"{base}/api/items/{quote(AIRPLANE, safe='')}").json()
    assert item["place"] == first and item["file"] == "merced.tif"
    plain = post(base, text="a harbor", k=2, archive="plain").json()
    assert [h["place"] for h in plain["hits"]] == [None, None]


def test_bad_filters_get_one_json_line_naming_the_field(base):
    cases = [
        (dict(bbox="1,2,3"), "bbox '1,2,3': give four numbers MINLON,MINLAT,MAXLON,MAXLAT in degrees"),
        (dict(bbox=[-120.4, 37.2, -120.5, 37.4]), "bbox '-120.4,37.2,-120.5,37.4': MINLON -120.4 is not below "
                                                  "MAXLON -120.5"),
        (dict(bbox="0,-91,1,1"), "latitudes within -90..90"),
        (dict(bbox=[1, 2, "east", 4]), "bbox.list[float].2: Input should be a valid number"),
        (dict(inside=True), "inside says how tiles meet a bbox; give the bbox too"),
        (dict(date_from="soon"), "date_from 'soon': give a date as YYYY-MM-DD"),
        (dict(date_from="2022-01-01", date_to="2021-01-01"), "date_from 2022-01-01 is after date_to 2021-01-01"),
        (dict(bbox="0,0,1,1", archive="plain"), "bbox, inside, date_from, date_to and near filter scene tiles, and "
                                                "this archive's images have no place"),
        (dict(date_to="2021-01-01", archive="plain", modality="text"), "modality: bbox, inside, date_from, date_to "
                                                                       "and near find scene tiles, which are images"),
        (dict(label="airplane"), "label 'airplane' is not in archive 'scenes' (its labels: none)"),
        (dict(modality="text"), "modality: archive 'scenes' holds no text codes"),
    ]
    for fields, words in cases:
        response = post(base, text="many planes", **fields)
        assert (response.status_code, response.headers["content-type"]) == (422, "application/json"), fields
        assert words in response.json()["error"] and "\n" not in response.json()["error"], response.json()
    form = httpx.post(f"{base}/api/search", files={"image": ("tile.jpg", _jpeg(np.zeros((32, 32, 3), np.uint8)))},
                      data={"bbox": "1,1,0,0"}, timeout=30)  # a form's fields are checked the same way
    assert form.status_code == 422 and "MINLON 1 is not below MAXLON 0" in form.json()["error"]


def _jpeg(pixels) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


def test_a_tile_s_thumbnail_is_rendered_from_its_scene_window(base, scenes, served, index):
    tile = scenes["tiles"][AIRPLANE_AT]
    got = httpx.get(f"{base}/thumbs/{quote(AIRPLANE, safe='')}")
    assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
    assert got.content == thumbnail_jpeg(Image.fromarray(tile), 256)  # the tile's pixels, not the scene's
    decoded = np.asarray(Image.open(io.BytesIO(got.content)), np.float64)
    assert decoded.shape == tile.shape and np.abs(decoded - tile).mean() < 6
    assert httpx.get(f"{base}/thumbs/{quote(AIRPLANE, safe='')}").content == got.content
    cached = list((served["archive"] / "serve" / "thumbs").rglob("*.jpg"))
    assert got.content in [p.read_bytes() for p in cached]
    place = index.search(id=AIRPLANE, k=1, rerank_top=64)[0].place
    small = Thumbnails(served["archive"] / "small", size=64).get(scenes["scene"], place)
    assert small == thumbnail_jpeg(Image.fromarray(tile), 64) and Image.open(io.BytesIO(small)).size == (64, 64)
    neighbour = httpx.get(f"{base}/thumbs/merced%2F5_3").content  # same file, another window: its own thumbnail
    assert neighbour == thumbnail_jpeg(Image.fromarray(scenes["tiles"][(5, 3)]), 256)


def test_tiles_of_one_scene_asked_for_at_once_are_each_rendered_from_their_window(base, scenes):
    """The thumbnail threads read one scene file together (each thread opens its own GDAL dataset)."""
    wanted = [(i, j) for i in range(8) for j in range(8) if i in (6, 7) or j == 7]  # none asked for before

    async def fetch_all():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[client.get(f"{base}/thumbs/merced%2F{i}_{j}") for i, j in wanted])

    for (i, j), got in zip(wanted, asyncio.run(fetch_all())):
        assert got.status_code == 200, got.text
        assert got.content == thumbnail_jpeg(Image.fromarray(scenes["tiles"][(i, j)]), 256), (i, j)


def test_info_gives_each_archive_s_places_extent_and_dates_and_scenes_their_outlines(base, index):
    info = httpx.get(f"{base}/api/info").json()
    scenes, plain = info["archives"]
    bounds = np.asarray(index.tables["image"].meta["bounds"], np.float64)
    assert scenes["places"] and scenes["scenes"] == 1 and scenes["dates"] == ["2021-06-03", "2021-06-03"]
    assert scenes["extent"] == [bounds[:, 0].min(), bounds[:, 1].min(), bounds[:, 2].max(), bounds[:, 3].max()]
    assert (plain["places"], plain["extent"], plain["dates"], plain["scenes"]) == (False, None, None, 0)
    assert info["basemap"] is None
    outlines = httpx.get(f"{base}/api/scenes").json()
    assert [f["properties"] for f in outlines["features"]] == [
        {"scene": "merced", "tiles": 64, "date": "2021-06-03", "dates": ["2021-06-03"]}]
    ring = np.array(outlines["features"][0]["geometry"]["coordinates"][0])
    x0, y0, side = MERCED[0], MERCED[1], 2048 * FOOT
    mosaic = to_lonlat(UTM11, np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 - side], [x0, y0 - side]]))
    # The mosaic's four corners, and between them tile corners on its edges (in lon/lat a UTM edge bends by
    # millimetres, enough to keep them on the hull).
    assert all(np.abs(ring - corner).sum(axis=1).min() < 1e-12 for corner in mosaic)
    distance = [min(_off_segment(p, mosaic[i], mosaic[(i + 1) % 4]) for i in range(4)) for p in ring]
    assert (ring[0] == ring[-1]).all() and max(distance) < 1e-7  # degrees: about a centimetre


def _off_segment(p, a, b) -> float:
    t = np.clip(np.dot(p - a, b - a) / np.dot(b - a, b - a), 0, 1)
    return float(np.linalg.norm(p - (a + t * (b - a))))
    assert httpx.get(f"{base}/api/scenes?archive=plain").json() == {"type": "FeatureCollection", "features": []}


def test_geojson_of_a_search_is_the_library_s_feature_collection(base, index):
    got = httpx.get(f"{base}/api/search.geojson", params={"id": AIRPLANE, "k": 3, "rerank": 64})
    assert got.status_code == 200 and got.headers["content-type"] == "application/geo+json"
    doc = got.json()
    expected = geojson(index.search(id=AIRPLANE, k=3, rerank_top=64), 64, f"item {AIRPLANE}")
    for feature in expected["features"]:
        feature["properties"].update(path="merced.tif", thumbnail=f"/thumbs/{quote(feature['id'], safe='')}")
    assert doc == expected
    box = box_text(corner_box())
    boxed = httpx.get(f"{base}/api/search.geojson", params={"text": "many planes", "bbox": box, "inside": "true",
                                                            "k": 10}).json()
    assert boxed["matched"] == 4 and {f["id"] for f in boxed["features"]} == CORNER
    for params, status, words in [({"text": "a harbor", "archive": "plain"}, 422, "GeoJSON draws scene tiles' "
                                                                                  "footprints, and this archive"),
                                  ({"k": 3}, 422, "no query: give exactly one of text"),
                                  ({"text": "a", "bbox": "x"}, 422, "bbox 'x': give four numbers"),
                                  ({"id": "merced/9_9"}, 404, "id 'merced/9_9' is not in the archive")]:
        bad = httpx.get(f"{base}/api/search.geojson", params=params)
        assert bad.status_code == status and words in bad.json()["error"], bad.json()


def test_removed_tiles_are_neither_matched_nor_outlined(served, tmp_path):
    from duch.pipeline.config.archive import RemoveConfig
    from duch.stages.remove import remove

    shutil.copytree(served["archive"].parent / "model", tmp_path / "model")
    shutil.copytree(served["archive"], tmp_path / "scenes")
    remove(RemoveConfig(run=str(tmp_path / "scenes"), ids=("merced/0_0",)), force=False, progress=False,
           echo=lambda _: None)
    with running(create_app(ServeConfig(run=str(tmp_path / "scenes"), bits=64, device="cpu", verify=False))) as url:
        answer = post(url, text="many planes", k=10, bbox=box_text(corner_box()), inside=True).json()
        assert answer["matched"] == 3 and {h["id"] for h in answer["hits"]} == CORNER - {"merced/0_0"}
        scene = httpx.get(f"{url}/api/scenes").json()["features"][0]
        assert scene["properties"]["tiles"] == 63


def test_a_basemap_is_a_tile_url_template_given_to_the_page(served):
    for url, words in [("tiles/{z}/{x}/{y}.png", "give an XYZ tile URL template"),
                       ("https://tiles.example/{z}/{x}.png", "{y} missing")]:
        with pytest.raises(DuchError, match=words):
            create_app(ServeConfig(run=str(served["archive"]), bits=64, device="cpu", basemap=url))
    bad = CliRunner().invoke(main, ["serve", "--run", str(served["archive"]), "--basemap", "tiles/{z}/{x}/{y}"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --basemap 'tiles/{z}/{x}/{y}': give an XYZ tile URL")
    template = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
    app = create_app(ServeConfig(run=str(served["archive"]), bits=64, device="cpu", basemap=template,
                                 basemap_attribution="© OpenStreetMap contributors"))
    with running(app) as url:
        assert httpx.get(f"{url}/api/info").json()["basemap"] == {"url": template,
                                                                  "attribution": "© OpenStreetMap contributors"}
