"""The map panel of the search page on a scene archive, in a real browser (Debian's chromium driven by Playwright)
against a real server on 127.0.0.1: the hits' footprints drawn (one polygon a hit), cards and footprints lit
together, a box drawn around a scene and then around its corner (only tiles inside it come back, the address
keeps it), the shared link, back, the date filter, nothing fetched from outside, and a basemap drawn beneath
from a tile server when one is configured.

    DUCH_MAP_SCREENSHOT=docs/scenes-map.jpg DUCH_SCENES_RUN=runs/scenes python -m pytest tests/test_serve_map.py

runs the same test on a scene archive of your own at 64 bits (tiles named SCENE/ROW_COL, as extract --tile names
them) and keeps the screenshot of one scene's hits (by default it goes to the test's temporary folder).
"""
import http.server
import io
import os
import shutil
import threading
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from PIL import Image

from duch.data.geo import overlaps_box
from duch.pipeline.config import ServeConfig
from duch.pipeline.serve.app import create_app

from .serving import running
from .test_serve_page import ALL_LOADED, browser, query, settled  # noqa: F401  (browser: a fixture)

CAPTION = "many airplanes parked at the airport"
pytestmark = pytest.mark.slow  # a browser and two servers: about fifteen seconds on 2 cores

if not os.path.exists("/usr/bin/chromium") and not os.environ.get("CI"):  # CI installs it (.ci/run)
    pytestmark = [pytestmark, pytest.mark.skip(reason="needs Debian's chromium: apt-get install -y chromium")]


@pytest.fixture(scope="module")
def config(request, tmp_path_factory) -> ServeConfig:
    own = os.environ.get("DUCH_SCENES_RUN")
    if own:
        return ServeConfig(run=own, bits=64)
    scenes = request.getfixturevalue("scenes")
    root = tmp_path_factory.mktemp("map")
    shutil.copytree(scenes["model"], root / "model")  # where the archive's codes say their model is
    shutil.copytree(scenes["archive"], root / "scenes")
    return ServeConfig(run=str(root / "scenes"), bits=64, device="cpu")


@pytest.fixture(scope="module")
def site(config):
    with running(create_app(config)) as url:
        yield url


def footprints(page) -> list[str]:
    return page.eval_on_selector_all("#map polygon.footprint", "p => p.map(x => x.dataset.id)")


def shown(page) -> list[str]:
    settled(page)
    page.wait_for_function(ALL_LOADED)  # every thumbnail, tiles rendered from their scene window, really loaded
    ids = page.eval_on_selector_all("#results .hit", "hits => hits.map(h => h.dataset.id)")
    assert footprints(page) == ids  # one footprint a hit, in rank order
    return ids


def on_page(page, lonlat) -> np.ndarray:
    """[N, 2] page coordinates of lon/lat points on the map."""
    return np.array([page.evaluate("([lon, lat]) => window.duchMap.toClient(lon, lat)", [float(x), float(y)])
                     for x, y in np.asarray(lonlat).reshape(-1, 2)])


def drag_box(page, lonlat, margin: float = 6) -> None:
    """Drag a box on the map around these lon/lat points, `margin` pixels wider."""
    points = on_page(page, lonlat)
    (x0, y0), (x1, y1) = points.min(axis=0) - margin, points.max(axis=0) + margin
    page.mouse.move(x0, y1)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=4)
    page.mouse.move(x1, y0, steps=4)
    page.mouse.up()


def pan(page, start, end) -> None:
    page.keyboard.down("Shift")
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=4)
    page.mouse.up()
    page.keyboard.up("Shift")


def wheel(page, delta: float) -> float:
    """Turn the wheel over the map where the pointer is; the scale it had."""
    scale = page.evaluate("window.duchMap.view.scale")
    page.mouse.wheel(0, delta)
    page.wait_for_function(f"() => window.duchMap.view.scale !== {scale}")
    return scale


def hover(page, selector: str) -> None:
    """The pointer to the middle of an element (page.hover would refuse a footprint under its rank marker)."""
    box = page.locator(selector).first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


def lit(page) -> tuple[list[str], list[str]]:
    return (page.eval_on_selector_all("#results .hit.on", "h => h.map(x => x.dataset.id)"),
            page.eval_on_selector_all("#map polygon.footprint.on", "p => p.map(x => x.dataset.id)"))


def test_the_map_draws_the_hits_and_searches_the_box_drawn_on_it(site, browser, tmp_path):  # noqa: F811
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(f"{site}/?q={quote(CAPTION)}")
    ids = shown(page)
    assert len(ids) == 24 and page.is_visible("#mappanel") and page.is_hidden("#label")
    assert page.locator("#map .rank, #map .marker").count() == 24 and page.locator("#map polygon.scene").count()
    hover(page, f"#results .hit[data-id='{ids[1]}']")  # a card lights its footprint ...
    assert lit(page) == ([ids[1]], [ids[1]])
    hover(page, f"#map polygon.footprint[data-id='{ids[3]}']")  # ... and a footprint its card
    assert lit(page) == ([ids[3]], [ids[3]])

    scene = ids[0].rsplit("/", 1)[0]  # the first hit's scene: zoomed in to with the wheel, a box drawn around it
    feature = next(f for f in httpx.get(f"{site}/api/scenes").json()["features"] if f["id"] == scene)
    outline = np.array(feature["geometry"]["coordinates"][0])
    centre = outline[:4].mean(axis=0)
    frame = page.locator("#map").bounding_box()
    middle = np.array([frame["x"] + frame["width"] / 2, frame["y"] + frame["height"] / 2])
    for to in (on_page(page, [centre])[0] + [-70, 50], middle):  # shift-drag pans: the scene's centre to the middle
        pan(page, on_page(page, [centre])[0], to)
        assert np.abs(on_page(page, [centre])[0] - to).max() < 1
    at = middle
    for delta in (-300, 300, -300):  # the wheel zooms about the pointer: in, out, in
        scale = wheel(page, delta)
        ratio = page.evaluate("window.duchMap.view.scale") / scale
        assert ratio == pytest.approx(np.exp(-delta * 0.002)) and np.abs(on_page(page, [centre])[0] - at).max() < 1
    while np.ptp(on_page(page, outline)[:, 0]) < 250:  # a scene of a large archive: in until it is large enough
        wheel(page, -300)
    while np.ptp(on_page(page, outline)[:, 0]) > 450:  # and out while it is too large to draw around
        wheel(page, 300)
    drag_box(page, outline)
    page.wait_for_function("() => location.search.includes('bbox=')")
    in_scene = shown(page)
    assert len(in_scene) == 24 and all(i.startswith(scene + "/") for i in in_scene)
    assert f" of {feature['properties']['tiles']} tiles" in page.inner_text("#status")
    page.click("#fit")  # the view fitted to the box
    hover(page, f"#results .hit[data-id='{in_scene[0]}']")
    assert lit(page) == ([in_scene[0]], [in_scene[0]])
    shot = os.environ.get("DUCH_MAP_SCREENSHOT") or str(tmp_path / "scenes-map.jpg")
    page.screenshot(path=shot, **({"quality": 85} if shot.endswith(".jpg") else {}))

    corner = [f"{scene}/{i}_{j}" for i in (0, 1) for j in (0, 1)]  # the scene's upper-left 2 x 2 tiles
    places = [httpx.get(f"{site}/api/items/{quote(c, safe='')}").json()["place"] for c in corner]
    page.check("#inside")
    page.wait_for_function("() => location.search.includes('inside=1')")
    shown(page)
    scene_box = query(page)["bbox"]
    drag_box(page, [p["lonlat"] for p in places])
    page.wait_for_function(f"() => new URLSearchParams(location.search).get('bbox') !== {scene_box!r}")
    assert sorted(shown(page)) == sorted(corner) and "1-4 of 4 tiles" in page.inner_text("#status")
    address = query(page)
    box = [float(v) for v in address["bbox"].split(",")]
    assert address["q"] == CAPTION and address["inside"] == "1" and page.locator("#map rect.searchbox").count() == 1
    assert all(box[0] <= x <= box[2] and box[1] <= y <= box[3] for p in places for x, y in p["lonlat"])

    page.uncheck("#inside")  # overlapping the box: what the API answers, every footprint meeting the box
    page.wait_for_function("() => !location.search.includes('inside=1')")
    overlapping = shown(page)
    api = httpx.post(f"{site}/api/search", json={"text": CAPTION, "k": 24, "bbox": box}, timeout=30).json()
    assert overlapping == [h["id"] for h in api["hits"]] and set(corner) <= set(overlapping)
    assert overlaps_box(np.array([h["place"]["lonlat"] for h in api["hits"]]), box).all()
    doc = httpx.get(site + page.get_attribute("#geojson", "href")).json()  # the page's GeoJSON link: these hits
    assert [f["id"] for f in doc["features"]] == overlapping and doc["matched"] == api["matched"]

    link = page.url  # the link, opened elsewhere, is the same search with the same box
    other = browser.new_context(viewport={"width": 1280, "height": 860}).new_page()
    other.on("request", lambda r: requested.append(r.url))
    other.goto(link)
    assert shown(other) == overlapping and other.locator("#map rect.searchbox").count() == 1
    assert not other.is_checked("#inside") and other.inner_text("#boxinfo").startswith("box ")

    page.go_back()  # back to the box with "wholly inside"
    page.wait_for_function("() => location.search.includes('inside=1')")
    assert sorted(shown(page)) == sorted(corner) and page.is_checked("#inside")
    date = places[0]["date"]
    page.fill("#to", _day_before(date))  # tiles acquired before the scene's date: none
    page.wait_for_function("() => location.search.includes('to=')")
    settled(page)
    assert footprints(page) == [] and "Nothing here matches the filters" in page.inner_text("#results")
    assert page.inner_text("#status").startswith("0-0 of 0 tiles")
    page.fill("#to", date)
    page.wait_for_function(f"() => location.search.includes('to={date}')")
    assert sorted(shown(page)) == sorted(corner)
    page.click("#clearbox")
    page.wait_for_function("() => !location.search.includes('bbox=')")
    assert len(shown(page)) == 24 and page.locator("#map rect.searchbox").count() == 0
    assert not page.locator("#map image").count()
    assert requested and all(url.startswith(site + "/") for url in requested), \
        [u for u in requested if not u.startswith(site)]  # offline: nothing beyond the service
    context.close()


def _day_before(date: str) -> str:
    import datetime

    return (datetime.date.fromisoformat(date) - datetime.timedelta(days=1)).isoformat()


class Tiles(http.server.BaseHTTPRequestHandler):
    """A basemap tile server: a grey PNG for any /Z/X/Y.png, each path asked for recorded."""

    asked: list = []
    png = b""

    def do_GET(self):  # noqa: N802
        Tiles.asked.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(Tiles.png)))
        self.end_headers()
        self.wfile.write(Tiles.png)

    def log_message(self, *args):
        pass


def test_a_configured_basemap_is_drawn_beneath_the_footprints(config, browser):  # noqa: F811
    out = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 210, 190)).save(out, "PNG")
    Tiles.png, Tiles.asked = out.getvalue(), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Tiles)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tiles = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with running(create_app(ServeConfig(run=config.run, bits=64, device=config.device, verify=False,
                                            basemap=tiles + "/{z}/{x}/{y}.png",
                                            basemap_attribution="tiles: a test server"))) as url:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(f"{url}/?q={quote(CAPTION)}")
            ids = shown(page)
            page.wait_for_function("() => [...document.querySelectorAll('#map image.tile')].length > 0")
            hrefs = page.eval_on_selector_all("#map image.tile", "t => t.map(x => x.getAttribute('href'))")
            first = page.evaluate("() => [...document.getElementById('map').children].map(g => g.getAttribute("
                                  "'class'))")
            assert first[0] == "base" and first.index("base") < first.index("hits")  # beneath the footprints
            assert page.inner_text("#attribution") == "tiles: a test server"
            place = httpx.get(f"{url}/api/items/{quote(ids[0], safe='')}").json()["place"]
            page.close()
    finally:
        server.shutdown()
    zxy = [tuple(int(v) for v in h.removeprefix(tiles + "/").removesuffix(".png").split("/")) for h in hrefs]
    z = zxy[0][0]
    assert len({t[0] for t in zxy}) == 1 and 0 <= z <= 19 and {f"/{a}/{b}/{c}.png" for a, b, c in zxy} <= set(
        Tiles.asked)
    lon, lat = np.mean(place["lonlat"], axis=0)  # the tile under the first hit is among those drawn
    x = int((lon + 180) / 360 * 2 ** z)
    y = int((1 - np.log(np.tan(np.radians(lat)) + 1 / np.cos(np.radians(lat))) / np.pi) / 2 * 2 ** z)
    assert (z, x, y) in zxy
