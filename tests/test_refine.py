"""Refine with examples (retrieval/refine.py) and `near` (retrieval/near.py): Rocchio and the majority vote on
hand-computed vectors, the distance rule at radius 0, huge, the antimeridian and a pole, and both through the
library, the CLI and the service over the scene archive (conftest's `scenes`: the 8 x 8 Merced mosaic) with a
plain archive of the same model beside it, encoded without continuous outputs."""
import io
import shutil

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from duch.cli import main
from duch.pipeline import DuchError
from duch.pipeline.config import EncodeConfig, ServeConfig
from duch.pipeline.model.coding import pack_codes, unpack_codes
from duch.pipeline.retrieval.filters import PlaceFilter, search_places
from duch.pipeline.retrieval.near import EARTH_RADIUS_M, footprint_distance, near_mask, parse_near
from duch.pipeline.retrieval.refine import Feedback, refined_query, rocchio
from duch.pipeline.retrieval.search import Index, UnknownItem
from duch.pipeline.serve.app import create_app
from duch.stages.encode_archive import encode_archive

from .scenekit import FOOT
from .serving import running


def test_rocchio_on_hand_computed_vectors():
    q = np.array([3.0, 4.0, 0.0])  # unit: (0.6, 0.8, 0)
    pos = np.array([[0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])  # units (0, 0, 1), (1, 0, 0): mean (0.5, 0, 0.5)
    neg = np.array([[0.0, -5.0, 0.0]])  # unit (0, -1, 0)
    # 1 * (0.6, 0.8, 0) + 1 * (0.5, 0, 0.5) - 0.25 * (0, -1, 0) = (1.1, 1.05, 0.5)
    np.testing.assert_allclose(rocchio(q, pos, neg), [1.1, 1.05, 0.5], rtol=1e-6)
    # 2 * (0.6, 0.8, 0) + 0.5 * (0.5, 0, 0.5) - 1 * (0, -1, 0) = (1.45, 2.6, 0.25)
    np.testing.assert_allclose(rocchio(q, pos, neg, (2, 0.5, 1)), [1.45, 2.6, 0.25], rtol=1e-6)
    # no query, no negatives: the positives' mean direction
    np.testing.assert_allclose(rocchio(None, pos, np.zeros((0, 3))), [0.5, 0, 0.5], rtol=1e-6)
    # a zero vector adds nothing (and divides by nothing)
    np.testing.assert_allclose(rocchio(np.zeros(3), pos[:1], np.zeros((0, 3))), [0, 0, 1], rtol=1e-6)


def test_without_continuous_outputs_the_codes_vote_bit_by_bit():
    query_bits = np.array([1, 1, -1, -1])
    pos = np.array([[-1, 1, 1, -1], [-1, 1, 1, 1], [-1, -1, 1, -1]])
    neg = np.array([[1, 1, 1, 1]])
    h, rule = refined_query(None, query_bits, None, None, pos, neg, (1.0, 1.0, 0.0))
    assert rule == "codes"
    # per bit (x 1/2, the unit scale of a 4-bit code): query + mean(positives) = 1 - 1, 1 + 1/3, -1 + 1, -1 - 1/3:
    # the first and third bits tie at 0 and are set, as the sign of 0 is everywhere in duch
    np.testing.assert_allclose(h, np.array([0, 4 / 3, 0, -4 / 3]) / 2, atol=1e-6)
    assert unpack_codes(pack_codes(h[None]), 4)[0].tolist() == [1, 1, 1, -1]
    h, _ = refined_query(None, query_bits, None, None, pos, neg, (1.0, 1.0, 1.0))  # the wrong one pushes down
    assert unpack_codes(pack_codes(h[None]), 4)[0].tolist() == [-1, 1, -1, -1]
    cont = refined_query(np.array([1.0, 0, 0, 0]), query_bits, pos.astype(float), neg.astype(float), pos, neg)
    assert cont[1] == "continuous"


def test_feedback_lists_and_their_mistakes():
    f = Feedback.parse(["a,b", " c", "a"], "d")
    assert f.positives == ("a", "b", "c") and f.negatives == ("d",) and f.marked == ("a", "b", "c", "d")
    for kwargs, words in [(dict(positives="a", negatives="a"), "both right and wrong"),
                          (dict(exclude_marked=True), "give `positives` or `negatives` too"),
                          (dict(positives="a", weights=(1, -1, 0)), "`rocchio`"),
                          (dict(positives="a", weights=(1, 1)), "three weights")]:
        with pytest.raises(DuchError, match=words):
            Feedback.parse(**kwargs)


def square(lon, lat, half):
    """A footprint: corners ul, ur, lr, ll of a lon/lat square."""
    return [[lon - half, lat + half], [lon + half, lat + half], [lon + half, lat - half], [lon - half, lat - half]]


def test_near_rule_at_radius_0_huge_the_antimeridian_and_a_pole():
    degree = np.radians(1) * EARTH_RADIUS_M  # metres in a degree of a great circle
    tiles = np.array([square(0, 0, 0.5), square(3, 0, 0.5), square(179.8, 0, 0.1), square(-179.8, 0, 0.1),
                      [[0, 89.9], [90, 89.9], [180, 89.9], [-90, 89.9]],  # around the north pole
                      [[np.nan, np.nan]] * 4])
    d = footprint_distance(tiles, 0.2, 0.1)
    assert d[0] == 0 and d[5] != d[5]  # inside; no lon/lat
    np.testing.assert_allclose(d[1], 2.3 * degree, rtol=1e-3)  # to the west edge at lon 2.5, lat 0.1
    assert near_mask(tiles, (0.2, 0.1, 0)).tolist() == [True] + [False] * 5  # radius 0: the tile holding it
    assert near_mask(tiles, (0.2, 0.1, 1e9)).tolist() == [True] * 5 + [False]  # everything with a place
    # across the antimeridian: from 180 both tiles are 0.1 degree away, the one at -179.8 as near as the other
    d = footprint_distance(tiles, 180.0, 0.0)
    np.testing.assert_allclose(d[2:4], [0.1 * degree] * 2, rtol=1e-3)
    assert near_mask(tiles, (-180.0, 0.0, 0.11 * degree)).tolist() == [False, False, True, True, False, False]
    # the pole lies inside the polar tile, whatever the longitude given for it
    assert footprint_distance(tiles, 123.0, 90.0)[4] == 0
    assert near_mask(tiles, (-45.0, 89.95, 0)).tolist() == [False] * 4 + [True, False]
    np.testing.assert_allclose(footprint_distance(tiles, 0.0, 89.0)[4], 0.9 * degree, rtol=1e-3)


def test_near_parses_three_numbers_and_names_its_mistakes():
    assert parse_near("-120.5,37.3,2000") == (-120.5, 37.3, 2000.0) and parse_near([1, 2, 0]) == (1, 2, 0)
    for text, words in [("1,2", "three numbers"), ("1,2,x", "three numbers"), ("200,0,1", "-180..180"),
                        ("0,91,1", "-90..90"), ("0,0,-1", "0 or more"), ("0,0,nan", "three numbers")]:
        with pytest.raises(DuchError, match=words):
            parse_near(text)


@pytest.fixture(scope="module")
def served(scenes, tmp_path_factory) -> dict:
    """The scene archive (continuous outputs) and a plain archive of its model without continuous outputs."""
    root = tmp_path_factory.mktemp("refine")
    archive, plain = root / "scenes", root / "plain"
    shutil.copytree(scenes["archive"], archive)
    shutil.copytree(scenes["model"], root / "model")  # where the archive's codes say their model is
    shutil.copytree(scenes["model"], plain)
    encode_archive(EncodeConfig(run=str(plain), device="cpu"), progress=False, echo=lambda _: None)
    return {"archive": archive, "plain": plain, "tiles": scenes["tiles"]}


@pytest.fixture(scope="module")
def index(served) -> Index:
    return Index.load(served["archive"], bits=64, device="cpu")


def ids(hits) -> list[str]:
    return [h.id for h in hits]


def test_examples_alone_and_with_a_caption_in_the_library(index):
    one = "merced/2_3"
    # one example alone: its own direction, so the same ranking as the item as a query
    assert ids(index.search(positives=[one], k=10)) == ids(index.search(id=one, k=10))
    table = index.tables["image"]
    pos, neg = ["merced/0_0", "merced/5_5"], ["merced/7_1"]
    h = rocchio(index.coder.embed_text(["many planes"])[0],
                np.asarray(table.continuous[[table.row_of[i] for i in pos]], np.float32),
                np.asarray(table.continuous[[table.row_of[i] for i in neg]], np.float32))
    expected = index.rank(type(index.id_query(one)).of("text", h), k=12, modality="image")
    refined = index.search(text="many planes", positives=pos, negatives=neg, k=12)
    assert ids(refined) == ids(expected)
    kept = index.search(text="many planes", positives=pos, negatives=neg, k=64, exclude_marked=True)
    assert len(kept) == 61 and not set(ids(kept)) & set(pos + neg)
    with pytest.raises(UnknownItem) as e:
        index.search(text="many planes", positives=["nope", "merced/0_0", "merced/0_0#0"], negatives=["7"])
    assert "not in the archive: 'nope', 'merced/0_0#0', '7'" in str(e.value) and "merced/0_0'," not in str(e.value)


def test_without_continuous_outputs_refining_votes_with_the_codes(served):
    plain = Index.load(served["plain"], bits=64, device="cpu")
    table = plain.tables["image"]
    assert table.continuous is None
    pos = ["0", "3", "6"]
    bits = unpack_codes(np.asarray(table.codes[[table.row_of[i] for i in pos]]), 64)
    vote = pack_codes((bits.sum(axis=0) >= 0)[None].astype(np.float32) * 2 - 1)
    hits = plain.search(positives=pos, k=24, ties="order")
    assert [h.distance for h in hits] == sorted(
        int(np.unpackbits(np.bitwise_xor(vote[0], np.asarray(table.codes[h.row]))).sum()) for h in hits)


def test_near_filters_before_the_top_k(index, served):
    row = index.tables["image"].row_of["merced/3_4"]
    centre = np.asarray(index.tables["image"].meta["lonlat"][row], np.float64).mean(axis=0)
    at = PlaceFilter.parse(near=(centre[0], centre[1], 0))
    hits, matched = search_places(index, at, text="many planes", k=10)
    assert matched == 1 and ids(hits) == ["merced/3_4"]
    side = 256 * FOOT  # a tile's side in metres: its 8 neighbours are within it of the centre, the next ring not
    around, matched = search_places(index, PlaceFilter.parse(near=(centre[0], centre[1], side)), text="x", k=64)
    assert matched == 9 and {h.id for h in around} == {f"merced/{i}_{j}" for i in (2, 3, 4) for j in (3, 4, 5)}
    assert "within 300 m of" in PlaceFilter.parse(near=(centre[0], centre[1], 300)).describe()
    assert search_places(index, PlaceFilter.parse(near=(centre[0], centre[1], 1.4 * side)), text="x", k=1)[1] == 9
    result = CliRunner().invoke(main, ["search", "--run", str(served["archive"]), "--bits", "64", "--text", "x",
                                       "--near", f"{centre[0]},{centre[1]},0", "--positive", "merced/0_0,merced/1_1",
                                       "--negative", "merced/7_7", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "filter: 1 of 64 tiles match within 0 m of" in result.output and "merced/3_4" in result.output
    bad = CliRunner().invoke(main, ["search", "--run", str(served["archive"]), "--bits", "64", "--positive", "zz",
                                    "--negative", "merced/0_0#1", "--device", "cpu"])
    assert bad.exit_code != 0 and "not in the archive: 'zz'" in bad.output, bad.output
    bad = CliRunner().invoke(main, ["search", "--run", str(served["archive"]), "--text", "x", "--near", "1,2"])
    assert bad.exit_code != 0 and "--near '1,2': give three numbers" in bad.output, bad.output


@pytest.fixture(scope="module")
def base(served):
    app = create_app(ServeConfig(run=str(served["archive"]), bits=64, device="cpu", archives=(str(served["plain"]),)))
    with running(app) as url:
        yield url


def post(base, **fields) -> httpx.Response:
    return httpx.post(f"{base}/api/search", json=fields, timeout=30)


def test_the_service_refines_and_answers_bad_examples_with_one_json_error(base, index):
    pos, neg = ["merced/0_0", "merced/5_5"], ["merced/7_1"]
    r = post(base, text="many planes", positives=pos, negatives=",".join(neg), k=10, exclude_marked=True)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = index.search(text="many planes", positives=pos, negatives=neg, k=10, exclude_marked=True)
    assert [h["id"] for h in body["hits"]] == ids(expected)
    assert body["query"]["positives"] == pos and body["query"]["rule"] == "continuous"
    alone = post(base, positives=pos, k=5).json()
    assert alone["query"]["kind"] == "examples" and len(alone["hits"]) == 5
    r = post(base, text="x", positives=["merced/0_0", "nope", "3"])  # "3": the plain archive's image
    assert r.status_code == 404 and r.json()["error"].startswith("positives and negatives name archive images; "
                                                                "not in the archive: 'nope', '3'")
    assert "archive 'plain' holds some of them" in r.json()["error"]
    plain = post(base, positives="3", archive="plain", k=3).json()
    assert plain["query"]["rule"] == "codes" and plain["hits"][0]["id"] == "3"
    for fields, words in [(dict(positives=["a"], negatives=["a"]), "both right and wrong"),
                          (dict(text="x", exclude_marked=True), "give positives or negatives too"),
                          (dict(positives="a", rocchio="1,x,0"), "rocchio '1,x,0'"),
                          (dict(text="x", near="0,0"), "near '0,0': give three numbers")]:
        r = post(base, **fields)
        assert r.status_code == 422 and words in r.json()["error"], (fields, r.text)
    row = index.tables["image"].row_of["merced/3_4"]
    lon, lat = np.asarray(index.tables["image"].meta["lonlat"][row], np.float64).mean(axis=0)
    r = post(base, id="merced/0_0", near=[lon, lat, 0])
    assert r.json()["matched"] == 1 and r.json()["filter"]["near"] == [lon, lat, 0]
    geo = httpx.get(f"{base}/api/search.geojson",
                    params={"positives": "merced/0_0", "near": f"{lon},{lat},{256 * FOOT}"}, timeout=30)
    assert geo.status_code == 200 and len(geo.json()["features"]) == 9, geo.text
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 60)).save(png, "PNG")
    form = httpx.post(f"{base}/api/search", data={"positives": "merced/0_0,merced/1_1", "k": "2"},
                      files={"image": ("field.png", png.getvalue(), "image/png")}, timeout=30)
    assert form.status_code == 200 and form.json()["query"]["kind"] == "image", form.text
    assert form.json()["query"]["positives"] == ["merced/0_0", "merced/1_1"]
