"""Change between dates: tiles of two dates paired by footprint (the same grid, or by overlap on another grid),
ranked by the Hamming distance of their codes; tiles without a partner reported; the box filter, removed tiles,
the command line and the GeoJSON output. The geometry on hand-made squares, the archive a real-UCM mosaic on three
dates (tests/changekit.py)."""
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from duch.cli import main
from duch.data.geo import to_lonlat
from duch.pipeline import DuchError
from duch.pipeline.retrieval.changes import changes_geojson, find_changes
from duch.pipeline.retrieval.filters import PlaceFilter
from duch.pipeline.retrieval.overlap import intersection_area, iou, one_to_one, pair_footprints
from duch.pipeline.retrieval.search import Index

from .changekit import CHANGED, build_dated
from .scenekit import FOOT, MERCED, UTM11


@pytest.fixture(scope="module")
def dated(tmp_path_factory, scenes, tiny_clip_spec) -> dict:
    return build_dated(tmp_path_factory.mktemp("dated"), scenes, tiny_clip_spec)


def square(x, y, side=1.0):
    """Corners ul, ur, lr, ll of a north-up square whose lower-left corner is (x, y)."""
    return np.array([[x, y + side], [x + side, y + side], [x + side, y], [x, y]], float)


def test_overlap_areas_on_hand_made_squares():
    p = np.stack([square(0, 0), square(0, 0), square(0, 0), square(0, 0), square(0, 0), square(1e6, 4e6, 256)])
    diamond = np.array([[0.5, -0.25], [1.25, 0.5], [0.5, 1.25], [-0.25, 0.5]])  # |x - .5| + |y - .5| <= 0.75
    q = np.stack([square(0, 0), square(0.5, 0), square(1, 0), square(3, 3), diamond, square(1e6 + 256, 4e6, 256)])
    # same; half shifted; neighbours sharing an edge; apart; the diamond (area 1.125) leaves out 4 corner triangles
    # of 1/32 each; far from the origin, neighbours
    np.testing.assert_allclose(intersection_area(p, q)[:5], [1, 0.5, 0, 0, 0.875], atol=1e-5)
    np.testing.assert_allclose(iou(p, q), [1, 1 / 3, 0, 0, 0.875 / 1.25, 0], atol=1e-5)
    # Orientation and corner order do not matter.
    np.testing.assert_allclose(iou(p[:, ::-1], np.roll(q, 1, axis=1)), iou(p, q), atol=1e-9)


def test_the_same_grid_pairs_each_tile_with_its_own_window():
    grid = np.stack([square(i, j) for i in range(5) for j in range(4)])
    a, b, overlap = pair_footprints(grid, grid[::-1], geographic=False)
    assert a.tolist() == list(range(20)) and b.tolist() == list(range(19, -1, -1))
    np.testing.assert_allclose(overlap, 1.0)


def test_another_grid_pairs_by_the_largest_overlap_above_the_threshold():
    grid = np.stack([square(i, 0) for i in range(4)])
    shifted = np.stack([square(i + 0.25, 0) for i in range(3)])  # IoU 0.75 / 1.25 = 0.6 with its own, 0.25 / 1.75
    a, b, overlap = pair_footprints(grid, shifted, geographic=False)
    assert (a.tolist(), b.tolist()) == ([0, 1, 2], [0, 1, 2])
    np.testing.assert_allclose(overlap, 0.6, atol=1e-5)
    assert len(pair_footprints(grid, shifted, geographic=False, min_iou=0.61)[0]) == 0
    # Halfway: IoU 1/3 with both neighbours, below 0.5: unpaired; at a threshold of 0.3 paired one to one.
    half = np.stack([square(0.5, 0)])
    assert len(pair_footprints(grid, half, geographic=False)[0]) == 0
    a, b, _ = pair_footprints(grid, half, geographic=False, min_iou=0.3)
    assert (a.tolist(), b.tolist()) == ([0], [0])  # equal overlaps: the first tile


def test_one_to_one_takes_the_largest_overlaps_first():
    # a0-b0 0.9, a0-b1 0.8, a1-b0 0.85: a0 takes b0; a1 then has no partner left.
    a, b, s = np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([0.9, 0.8, 0.85])
    assert one_to_one(a, b, s).tolist() == [0]
    a, b, s = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), np.array([0.9, 0.8, 0.85, 0.6])
    assert one_to_one(a, b, s).tolist() == [0, 3]


def test_pairing_in_lon_lat_across_the_antimeridian_and_in_utm():
    deg = 0.001
    west = np.stack([square(179.999, 10.0, deg), square(-180.0, 10.0, deg)])  # both sides of 180
    east = np.stack([square(179.9995, 10.0, deg)])  # straddling it: IoU 1/3 with each; 0.5 to 1 side halves
    a, b, overlap = pair_footprints(west, east, geographic=True, min_iou=0.3)
    assert len(a) == 1 and overlap[0] == pytest.approx(1 / 3, abs=1e-3)
    # UTM squares of 78 m near Merced, reprojected: shifted by a quarter tile east, IoU 0.6 as on the plane.
    side = 256 * FOOT
    utm_a = np.stack([square(MERCED[0] + i * side, MERCED[1], side) for i in range(3)])
    utm_b = np.stack([square(MERCED[0] + (i + 0.25) * side, MERCED[1], side) for i in range(3)])
    a, b, overlap = pair_footprints(to_lonlat(UTM11, utm_a), to_lonlat(UTM11, utm_b), geographic=True)
    assert (a.tolist(), b.tolist()) == ([0, 1, 2], [0, 1, 2])
    np.testing.assert_allclose(overlap, 0.6, atol=2e-3)


def changed_ids(year="2022"):
    return {f"{year}/merced/{i}_{j}" for i, j in CHANGED}


def test_the_replaced_tiles_come_first_on_the_same_grid(dated):
    index = Index.load(dated["archive"], bits=64, device="cpu")
    found = find_changes(index, "2021-06-03", "2022-06-03", k=64)
    assert found.matched == 64 and found.tiles == {"from": 64, "to": 64}
    assert found.unpaired == {"from": [], "to": []}
    assert all(p.iou == pytest.approx(1.0) for p in found.pairs)
    assert all(p.before.id.split("/", 1)[1] == p.after.id.split("/", 1)[1] for p in found.pairs)  # same window
    assert {p.after.id for p in found.pairs[:3]} == changed_ids()
    assert [p.rank for p in found.pairs] == list(range(1, 65))
    keys = [(-p.distance, p.score) for p in found.pairs]
    assert keys == sorted(keys)  # most changed first, equal distances by cosine
    assert all(p.score > 0.999 and p.distance == 0 for p in found.pairs[3:])  # the same pixels
    # Re-ranked by cosine: the three least similar first too; the other direction pairs the same tiles.
    reranked = find_changes(index, "2021-06-03", "2022-06-03", k=3, rerank=True)
    assert {p.after.id for p in reranked.pairs} == changed_ids() and reranked.reranked
    back = find_changes(index, "2022-06-03", "2021-06-03", k=3)
    assert {p.before.id for p in back.pairs} == changed_ids()
    assert [p.rank for p in find_changes(index, "2021-06-03", "2022-06-03", k=2, offset=2).pairs] == [3, 4]


def test_another_grid_pairs_by_overlap_and_reports_the_tiles_left_without_a_partner(dated):
    index = Index.load(dated["archive"], bits=64, device="cpu")
    found = find_changes(index, "2021-06-03", "2023-06-03", k=100)
    assert found.tiles == {"from": 64, "to": 48} and found.matched == 48
    assert all(p.iou == pytest.approx(0.6, abs=1e-3) for p in found.pairs)
    assert all(p.before.id.split("/")[-1] == p.after.id.split("/")[-1] for p in found.pairs)  # row_col: its own
    assert sorted(found.unpaired["from"]) == sorted(f"2021/merced/{i}_{j}" for i in range(8) for j in (6, 7))
    assert found.unpaired["to"] == []
    strict = find_changes(index, "2021-06-03", "2023-06-03", k=10, min_iou=0.7)
    assert strict.matched == 0 and strict.pairs == [] and len(strict.unpaired["from"]) == 64


def test_two_equal_dates_or_a_date_without_tiles_is_one_clear_error(dated):
    index = Index.load(dated["archive"], bits=64, device="cpu")
    with pytest.raises(DuchError, match="both 2021-06-03: changes compare two acquisitions"):
        find_changes(index, "2021-06-03", "2021:06:03")
    with pytest.raises(DuchError, match=r"`to_date` 2020-01-01: no tile .* its dates are 2021-06-03 \(64 tiles\), "
                                        r"2022-06-03 \(64 tiles\), 2023-06-03 \(48 tiles\)"):
        find_changes(index, "2021-06-03", "2020-01-01")
    with pytest.raises(DuchError, match="`from_date` 'June': give a date as YYYY-MM-DD"):
        find_changes(index, "June", "2020-01-01")
    with pytest.raises(DuchError, match="`min_iou` must be above 0"):
        find_changes(index, "2021-06-03", "2022-06-03", min_iou=0)


def test_the_box_keeps_pairs_with_a_tile_in_it(dated):
    index = Index.load(dated["archive"], bits=64, device="cpu")
    meta = index.tables["image"].meta
    row = list(meta["ids"]).index("2021/merced/1_1")
    lonlat = np.asarray(meta["lonlat"][row])
    middle = lonlat.mean(axis=0)
    box = f"{middle[0] - 1e-6},{middle[1] - 1e-6},{middle[0] + 1e-6},{middle[1] + 1e-6}"
    found = find_changes(index, "2021-06-03", "2022-06-03", places=PlaceFilter.parse(bbox=box))
    assert [(p.before.id, p.after.id) for p in found.pairs] == [("2021/merced/1_1", "2022/merced/1_1")]
    assert found.matched == 1 and found.tiles == {"from": 1, "to": 1}
    shifted = find_changes(index, "2021-06-03", "2023-06-03", places=PlaceFilter.parse(bbox=box))
    assert shifted.matched == 1 and shifted.tiles == {"from": 1, "to": 1}  # only the 2023 tile over that point


def test_a_removed_tile_leaves_its_partner_unpaired(dated, tmp_path):
    run = dated["root"] / "removed"
    shutil.copytree(dated["archive"], run)
    result = CliRunner().invoke(main, ["remove", "--run", str(run), "2022/merced/3_6"])
    assert result.exit_code == 0, result.output
    found = find_changes(Index.load(run, bits=64, device="cpu"), "2021-06-03", "2022-06-03", k=64)
    assert found.matched == 63 and found.unpaired == {"from": ["2021/merced/3_6"], "to": []}
    assert "2022/merced/3_6" not in {p.after.id for p in found.pairs}


def test_the_command_line_table_json_and_geojson(dated):
    base = ["changes", "--run", str(dated["archive"]), "--from", "2021-06-03", "--to", "2023-06-03", "-k", "3"]
    table = CliRunner().invoke(main, base)
    assert table.exit_code == 0, table.output
    assert "2021-06-03 -> 2023-06-03: 48 pairs of 64 and 48 tiles" in table.output
    assert "iou 0.60" in table.output and "unpaired on 2021-06-03: 16 tiles" in table.output
    doc = json.loads(CliRunner().invoke(main, [*base, "--json"]).output)
    assert doc["matched"] == 48 and doc["unpaired"]["from"]["count"] == 16 and len(doc["pairs"]) == 3
    assert doc["pairs"][0]["from"]["place"]["date"] == "2021-06-03"
    geo = json.loads(CliRunner().invoke(main, [*base, "--geojson"]).output)
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 3
    for feature, pair in zip(geo["features"], doc["pairs"]):
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
        assert np.sum(ring[:-1, 0] * ring[1:, 1] - ring[1:, 0] * ring[:-1, 1]) > 0  # counterclockwise
        assert feature["bbox"] == pair["from"]["place"]["bounds"]
        assert feature["properties"]["from_id"] == pair["from"]["id"]
        assert feature["properties"]["to_id"] == pair["to"]["id"]
    same = CliRunner().invoke(main, [*base[:4], "2021-06-03", "--to", "2021-06-03"])
    assert same.exit_code == 2 and "--from and --to are both 2021-06-03" in same.output
    assert changes_geojson(find_changes(Index.load(dated["archive"], bits=64, device="cpu"), "2021-06-03",
                                        "2023-06-03", k=1))["unpaired"]["to"] == {"count": 0, "ids": []}


@pytest.fixture(scope="module")
def site(request):
    """The service over the three-date archive, or over DUCH_CHANGES_RUN (a scene run of your own, 64 bits)."""
    from duch.pipeline.config import ServeConfig
    from duch.pipeline.serve.app import create_app

    from .serving import running

    own = os.environ.get("DUCH_CHANGES_RUN")
    run = own or str(request.getfixturevalue("dated")["archive"])
    with running(create_app(ServeConfig(run=run, bits=64, device="cpu" if not own else "auto"))) as url:
        yield url


def test_the_endpoint_answers_the_pairs_with_both_thumbnails_as_documented(site):
    import httpx

    from .test_openapi import conforms

    doc = httpx.get(f"{site}/openapi.json").json()
    fields = {"from": "2021-06-03", "to": "2022-06-03", "k": 3}
    got = httpx.get(f"{site}/api/changes", params=fields)
    assert got.status_code == 200, got.text
    conforms(doc, "/api/changes", "get", got)
    answer = got.json()
    assert {p["to"]["id"] for p in answer["pairs"]} == changed_ids() and answer["matched"] == 64
    assert answer["unpaired"] == {"from": {"count": 0, "ids": []}, "to": {"count": 0, "ids": []}}
    for side in ("from", "to"):
        thumb = httpx.get(site + answer["pairs"][0][side]["thumbnail"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    posted = httpx.post(f"{site}/api/changes", json=fields)
    assert posted.status_code == 200 and posted.json()["pairs"] == answer["pairs"]
    conforms(doc, "/api/changes", "post", posted)
    geo = httpx.get(f"{site}/api/changes.geojson", params={**fields, "to": "2023-06-03"})
    assert geo.status_code == 200 and geo.headers["content-type"] == "application/geo+json"
    conforms(doc, "/api/changes.geojson", "get", geo)
    assert geo.json()["unpaired"]["from"]["count"] == 16 and len(geo.json()["features"]) == 3
    assert geo.json()["features"][0]["properties"]["to_thumbnail"].startswith("/thumbs/2023%2Fshifted%2F")
    refused = [
        (422, "from and to are both 2021-06-03", httpx.get(f"{site}/api/changes", params={**fields,
                                                                                          "to": "2021-06-03"})),
        (422, "to 2020-01-01: no tile", httpx.post(f"{site}/api/changes", json={**fields, "to": "2020-01-01"})),
        (422, "unknown field", httpx.post(f"{site}/api/changes", json={**fields, "text": "x"})),
        (422, "min_iou", httpx.get(f"{site}/api/changes", params={**fields, "min_iou": 2})),
        (422, "bbox", httpx.get(f"{site}/api/changes", params={**fields, "bbox": "1,2,3"})),
        (400, "malformed JSON", httpx.post(f"{site}/api/changes", content=b"{",
                                           headers={"content-type": "application/json"})),
        (415, "JSON", httpx.post(f"{site}/api/changes", content=b"from=x", headers={"content-type": "text/plain"})),
        (404, "no archive", httpx.get(f"{site}/api/changes", params={**fields, "archive": "nope"})),
    ]
    other = httpx.put(f"{site}/api/changes", json=fields)  # GET and POST are two routes: Allow names both
    assert other.status_code == 405 and other.headers["allow"] == "GET, POST", other.headers
    for status, words, got in refused:
        assert (got.status_code, got.json()["status"]) == (status, status), got.text
        assert words in got.json()["error"], got.text
        conforms(doc, "/api/changes", got.request.method.lower(), got)


def test_the_endpoint_is_under_admission_control(dated):
    import httpx

    from duch.pipeline.config import ServeConfig
    from duch.pipeline.serve.app import create_app

    from .serving import running

    config = ServeConfig(run=str(dated["archive"]), bits=64, device="cpu", timeout=1e-4)
    with running(create_app(config)) as url:
        late = httpx.get(f"{url}/api/changes", params={"from": "2021-06-03", "to": "2022-06-03"}, timeout=30)
    assert late.status_code == 503 and int(late.headers["retry-after"]) >= 1, late.text


PAIR_LOADED = ("() => { const imgs = [...document.querySelectorAll('#pairview img')];"
               " return imgs.length === 2 && imgs.every(i => i.complete && i.naturalWidth > 0); }")


@pytest.mark.slow  # a browser: about 10 s on 2 cores
def test_the_page_draws_the_changed_pairs_and_shows_a_pair_side_by_side(site, tmp_path):
    """In a real browser (Debian's chromium): the dates offered, the pairs drawn on the map and listed, a pair
    picked on the map shown side by side, the address shared, the search's box filtering the pairs, a search
    keeping the layer.

        DUCH_CHANGES_RUN=runs/scenes DUCH_CHANGES_DATES=2021-06-03,2022-06-03 DUCH_CHANGES_BOX=W,S,E,N \\
        DUCH_CHANGES_QUERY="a dense residential area" DUCH_CHANGES_SCREENSHOT=docs/changes.jpg \\
        python -m pytest tests/test_changes.py -k page

    runs it on a scene run of your own (64 bits), within a box and beside a search when given, and keeps the
    screenshot of its most changed pair."""
    from urllib.parse import parse_qs, urlparse

    from .test_serve_page import ARGS, CHROMIUM

    if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):  # CI installs it (.ci/run)
        pytest.skip("needs Debian's chromium: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    own = os.environ.get("DUCH_CHANGES_RUN")
    start, end = os.environ.get("DUCH_CHANGES_DATES", "2021-06-03,2022-06-03").split(",")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        box, caption = os.environ.get("DUCH_CHANGES_BOX"), os.environ.get("DUCH_CHANGES_QUERY")
        page.goto(site + "/" + (f"?bbox={box}" if own and box else ""))
        page.wait_for_selector("#changes:not([hidden])")
        if own and caption:
            page.fill("#q", caption)
            page.press("#q", "Enter")
            page.wait_for_function("() => document.body.dataset.state === 'done'")
        dates = page.eval_on_selector_all("#chfrom option", "o => o.map(x => x.value)")
        assert start in dates and end in dates
        if not own:
            assert dates == ["", "2021-06-03", "2022-06-03", "2023-06-03"]
        page.select_option("#chfrom", start)
        page.select_option("#chto", end)
        page.click("#chshow")
        page.wait_for_selector("#changes[data-state=done]")
        pairs = page.evaluate("window.duchChanges.pairs()")
        drawn = page.eval_on_selector_all("#map polygon.change:not(.other)", "p => p.map(x => Number(x.dataset.pair))")
        assert drawn == [p["rank"] for p in pairs] and len(page.query_selector_all("#pairs li")) == len(pairs)
        if not own:
            assert len(pairs) == 24 and {p["to"]["id"] for p in pairs[:3]} == changed_ids()
            assert "64 pairs of 64 and 64 tiles" in page.inner_text("#chstatus")
        # The first pair picked on the map: both its thumbnails side by side, the address says which.
        corners = np.array(pairs[0]["from"]["place"]["lonlat"])
        x, y = page.evaluate("([lon, lat]) => window.duchMap.toClient(lon, lat)", corners.mean(axis=0).tolist())
        page.mouse.click(x, y)
        page.wait_for_function(PAIR_LOADED)
        sources = page.eval_on_selector_all("#pairview img", "i => i.map(x => new URL(x.src).pathname)")
        assert sources == [urlparse(pairs[0][side]["thumbnail"]).path for side in ("from", "to")]
        shown = page.evaluate("() => [...document.querySelectorAll('#pairview img')].map(i => "
                              "i.getBoundingClientRect().left)")
        assert shown[0] < shown[1]  # side by side: the first date on the left
        address = {k: v[0] for k, v in parse_qs(urlparse(page.url).query).items()}
        assert {k: v for k, v in address.items() if k in ("cfrom", "cto", "pair")} == {"cfrom": start, "cto": end,
                                                                                      "pair": "1"}
        assert own or set(address) == {"cfrom", "cto", "pair"}
        assert page.eval_on_selector_all("#map polygon.change.on", "p => p.map(x => x.dataset.pair)") == ["1"]
        if os.environ.get("DUCH_CHANGES_SCREENSHOT"):
            page.screenshot(path=os.environ["DUCH_CHANGES_SCREENSHOT"], type="jpeg", quality=85)
        # Shared: the address alone shows the same pairs and the same pair.
        other = browser.new_page(viewport={"width": 1280, "height": 900})
        other.goto(page.url)
        other.wait_for_selector("#changes[data-state=done]")
        other.wait_for_function(PAIR_LOADED)
        assert other.evaluate("window.duchChanges.pairs()") == pairs
        assert other.evaluate("window.duchChanges.selected()") == 1
        if not own:
            # A search keeps the layer; the search's box filters the pairs (one tile's middle: one pair).
            other.fill("#q", "many planes")
            other.press("#q", "Enter")
            other.wait_for_function("() => document.body.dataset.state === 'done'")
            assert {"q", "cfrom", "cto"} <= set(parse_qs(urlparse(other.url).query))
            middle = corners.mean(axis=0)
            box = f"{middle[0] - 1e-6},{middle[1] - 1e-6},{middle[0] + 1e-6},{middle[1] + 1e-6}"
            other.goto(f"{site}/?bbox={box}&cfrom={start}&cto={end}")
            other.wait_for_selector("#changes[data-state=done]")
            assert [p["from"]["id"] for p in other.evaluate("window.duchChanges.pairs()")] == [pairs[0]["from"]["id"]]
            other.click("#chclear")
            other.wait_for_selector("#changes[data-state=empty]")
            assert "cfrom" not in other.url and other.query_selector_all("#map polygon.change") == []
        browser.close()
