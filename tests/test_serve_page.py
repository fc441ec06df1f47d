"""The search page in a real browser (Debian's chromium driven by Playwright) against a real server on 127.0.0.1:
type a caption and see thumbnails that really loaded, "more like this", back and forward, the modality switch,
paging, the class filter, an image picked and an image dropped (each shown above its results), a shared link and
the error state, with no request leaving the service; the pager at the service's depth limit; the page on a phone
(360, 390 and 414 px wide), with and without the map of a scene archive.

    DUCH_SCREENSHOT=docs/serve.jpg DUCH_SERVE_RUN=runs/ucm python -m pytest tests/test_serve_page.py

runs the same test against a finished run of your own at 64 bits (instead of the tiny test run) and keeps the
screenshot of its caption search (by default it goes to the test's temporary folder);
DUCH_PHONE_SCREENSHOT=docs/serve-phone.jpg keeps the phone's (390 px wide, an uploaded image's results).
"""
import os
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from PIL import Image

from duch.pipeline.config import ServeConfig
from duch.pipeline.serve.app import create_app

from .conftest import ASSETS
from .serving import running

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
CAPTION = "many planes parked at the airport"
ALL_LOADED = ("() => { const imgs = [...document.querySelectorAll('#results img, #query img')];"
              " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }")

pytestmark = pytest.mark.slow  # a browser and two servers: about 25 s on 2 cores (scenes: shared with test_serve_map)

if not Path(CHROMIUM).exists() and not os.environ.get("CI"):  # CI installs it (.ci/run): there it must run
    pytestmark = [pytestmark, pytest.mark.skip(reason="needs Debian's chromium: apt-get install -y chromium")]


@pytest.fixture(scope="module")
def base(request, tmp_path_factory):
    own = os.environ.get("DUCH_SERVE_RUN")
    if own:
        config = ServeConfig(run=own, bits=64)
    else:
        run = tmp_path_factory.mktemp("page") / "run"
        shutil.copytree(request.getfixturevalue("encoded_run"), run)
        config = ServeConfig(run=str(run), bits=16, device="cpu")
    with running(create_app(config)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def query(page) -> dict:
    return {k: v[0] for k, v in parse_qs(urlparse(page.url).query).items()}


def settled(page, state: str = "done") -> None:
    """Wait until the page has finished with the address it shows (it says so on <body>)."""
    page.wait_for_function("() => document.body.dataset.query === location.search && "
                           "document.body.dataset.state !== 'loading'")
    assert page.evaluate("document.body.dataset.state") == state, page.inner_text("#status")


def query_image(page) -> dict:
    """The image shown above the results: where it comes from, its size, and whether it sits above the grid."""
    return page.evaluate("""() => { const img = document.querySelector('#query img');
        return img && {src: img.src, width: img.naturalWidth, height: img.naturalHeight,
                       above: img.getBoundingClientRect().bottom <= document.getElementById('results')
                                                                           .getBoundingClientRect().top}; }""")


def uploaded(page, name: str, previous: str | None = None) -> str:
    """Check the uploaded file `name` is shown above its results, drawn from the file (a blob: URL, not a
    thumbnail of the service's) at its own size; its URL (another than `previous`)."""
    page.wait_for_function(ALL_LOADED)
    shown = query_image(page)
    width, height = Image.open(ASSETS / name).size
    assert shown and shown["src"].startswith("blob:") and shown["src"] != previous, shown
    assert (shown["width"], shown["height"]) == (width, height) and shown["above"], shown
    return shown["src"]


def shown_ids(page) -> list[str]:
    settled(page)
    page.wait_for_function(ALL_LOADED)  # thumbnails that really loaded: no broken image in the grid
    return page.eval_on_selector_all("#results .hit", "hits => hits.map(h => h.dataset.id)")


def test_the_page_searches_pages_filters_uploads_and_shares(base, browser, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(base + "/")
    settled(page, "empty")
    assert "Type a caption" in page.inner_text("#status")

    page.fill("#q", CAPTION)
    page.press("#q", "Enter")
    page.wait_for_selector("#results .hit img")
    first = shown_ids(page)
    assert len(first) == 24 and query(page) == {"q": CAPTION, "m": "image", "page": "1"}
    assert " images · encode " in page.inner_text("#status")
    assert page.locator("#results .hit .label").first.inner_text()
    shot = os.environ.get("DUCH_SCREENSHOT") or str(tmp_path / "serve.jpg")
    page.screenshot(path=shot, **({"quality": 80} if shot.endswith(".jpg") else {}))

    page.click(f"#results .hit[data-id='{first[2]}'] a")  # more like this
    page.wait_for_function(f"() => location.search.includes('id={first[2]}')")
    assert page.inner_text("#query") == f"More like {first[2]}"
    like = shown_ids(page)
    assert like and like != first

    page.go_back()
    page.wait_for_function(f"() => document.getElementById('q').value === {CAPTION!r}")
    assert shown_ids(page) == first and "id" not in query(page)
    page.go_forward()
    page.wait_for_function("() => document.getElementById('query').innerText.startsWith('More like')")
    assert shown_ids(page) == like

    page.check("input[name=modality][value=text]")  # captions, each shown with its image
    page.wait_for_function("() => document.querySelector('#results .hit.text') !== null")
    captions = shown_ids(page)
    assert all("#" in c for c in captions) and page.locator("#results .hit.text .caption").count() == len(captions)
    matched = int(page.inner_text("#status").split(" of ")[1].split()[0])
    assert not page.is_hidden("#pager") and page.inner_text("#pageinfo") == f"page 1 of {-(-matched // 24)}"
    page.click("#next")
    page.wait_for_function("() => location.search.includes('page=2')")
    second = shown_ids(page)
    assert second and not set(second) & set(captions)

    label = page.eval_on_selector_all("#label option", "o => o.map(x => x.value)")[1]
    page.select_option("#label", label)
    page.wait_for_function(f"() => location.search.includes('label={label}') && "
                           "!document.getElementById('results').classList.contains('loading')")
    shown_ids(page)
    assert set(page.locator("#results .hit .label").all_inner_texts()) == {label}
    assert query(page)["page"] == "1"

    page.check("input[name=modality][value=image]")
    page.select_option("#label", "")
    page.set_input_files("#file", str(ASSETS / "102.jpg"))  # search by an uploaded image
    page.wait_for_function("() => location.search.includes('image=102.jpg')")
    page.wait_for_function("() => document.getElementById('query').innerText === 'Images like 102.jpg'")
    assert len(shown_ids(page)) == 24
    picked = uploaded(page, "102.jpg")

    page.evaluate("""bytes => {  // an image dropped on the page
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], "1003.jpg", {type: "image/jpeg"}));
        document.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
    }""", list((ASSETS / "1003.jpg").read_bytes()))
    page.wait_for_function("() => document.getElementById('query').innerText === 'Images like 1003.jpg'")
    assert len(shown_ids(page)) == 24 and query(page)["image"] == "1003.jpg"
    uploaded(page, "1003.jpg", previous=picked)
    page.go_back()  # back to the picked file's query: the page still holds that image
    page.wait_for_function("() => document.getElementById('query').innerText === 'Images like 102.jpg'")
    assert len(shown_ids(page)) == 24 and uploaded(page, "102.jpg") == picked

    shared = browser.new_context().new_page()  # a link opened elsewhere is the same search
    shared.on("request", lambda r: requested.append(r.url))
    shared.goto(f"{base}/?q={CAPTION.replace(' ', '+')}&m=image")
    shared.wait_for_selector("#results .hit img")
    assert shown_ids(shared) == first
    shared.goto(f"{base}/?id=no-such-item")
    settled(shared, "error")
    assert "id 'no-such-item' is not in the archive" in shared.inner_text("#status")
    assert shared.is_visible("#status.error")

    outside = [u for u in requested if not u.startswith((base + "/", "blob:" + base + "/"))]
    assert requested and not outside, outside  # no CDN, nothing beyond the service (blob: the uploads, in the page)
    context.close()


def test_the_pager_never_offers_a_page_past_the_depth_limit(base, browser, monkeypatch):
    """At a limit under the archive's caption count (the service's own, lowered for the test: it refuses past it
    as it does at 10,000) the pages end at the limit, the last one short, and the captions beyond are counted."""
    from duch.pipeline.serve import api, routes

    limit = 40  # of the tiny archive's 48 captions; not a multiple of 24: the second page holds the last 16
    monkeypatch.setattr(api, "MOST_DEPTH", limit)  # what the service checks ...
    monkeypatch.setattr(routes, "MOST_DEPTH", limit)  # ... and what /api/info tells the page
    fields = {"text": CAPTION, "modality": "text"}
    matched = httpx.post(base + "/api/search", json={**fields, "k": 1}, timeout=30).json()["matched"]
    assert matched > limit
    assert httpx.post(base + "/api/search", json={**fields, "k": 24, "offset": 24}, timeout=30).status_code == 422
    asked = []
    page = browser.new_context(viewport={"width": 1280, "height": 860}).new_page()
    page.on("request", lambda r: asked.append(r.post_data_json) if r.url.endswith("/api/search") else None)
    page.goto(f"{base}/?q={CAPTION.replace(' ', '+')}&m=text")
    first = shown_ids(page)
    assert page.inner_text("#pageinfo") == "page 1 of 2" and page.is_visible("#beyond")
    assert page.inner_text("#beyond").startswith(f"{matched - limit} more captions lie past the first {limit}:")
    page.click("#next")
    page.wait_for_function("() => location.search.includes('page=2')")
    last = shown_ids(page)
    expected = httpx.post(base + "/api/search", json={**fields, "k": 16, "offset": 24}, timeout=30).json()["hits"]
    assert last == [h["id"] for h in expected] and not set(last) & set(first)
    assert page.inner_text("#status").startswith(f"25-40 of {matched} captions") and page.is_disabled("#next")

    page.goto(f"{base}/?q={CAPTION.replace(' ', '+')}&m=text&page=9")  # an address past the limit: its last page
    assert shown_ids(page) == last and query(page)["page"] == "2"
    label = page.eval_on_selector_all("#label option", "o => o.map(x => x.value)")[1]
    page.goto(f"{base}/?q={CAPTION.replace(' ', '+')}&m=text&label={label}&page=2")  # past a class's hits: its last
    in_class = httpx.post(base + "/api/search", json={**fields, "k": 24, "label": label}, timeout=30).json()
    assert in_class["matched"] <= 24 and shown_ids(page) == [h["id"] for h in in_class["hits"]]
    assert query(page)["page"] == "1" and page.is_hidden("#pager")
    assert asked and all(a["offset"] + a["k"] <= limit for a in asked), asked  # the service never refused one
    page.context.close()


OVERFLOW = """() => { // elements that reach past the viewport's sides (the map's drawing is clipped by its <svg>)
    const out = [];
    for (const e of document.querySelectorAll('body *')) {
        const r = e.getBoundingClientRect();
        if (r.width && !e.ownerSVGElement && (r.left < -0.5 || r.right > innerWidth + 0.5)) {
            out.push(`${e.tagName}#${e.id}.${e.getAttribute('class')}`);
        }
    }
    return {wide: out, scroll: document.documentElement.scrollWidth, width: innerWidth}; }"""
TEXT_SHOWN = """selector => { // the element's text wholly inside the viewport and not clipped by the element
    const e = document.querySelector(selector), range = document.createRange();
    range.selectNodeContents(e);
    const r = range.getBoundingClientRect(), box = e.getBoundingClientRect();
    return r.width > 0 && r.left >= 0 && r.right <= innerWidth && r.top >= 0 && r.bottom <= innerHeight &&
        r.right <= box.right + 0.5 && e.scrollWidth <= e.clientWidth + 1; }"""
PHONES = (360, 390, 414)


def fits(page, width: int) -> None:
    """Nothing on the page is wider than the phone, the picker's "or an image" and the drop text show whole, and
    the grid has two columns of cards."""
    page.set_viewport_size({"width": width, "height": 780})
    layout = page.evaluate(OVERFLOW)  # a phone's page widens to what overflows it: innerWidth says so too
    assert not layout["wide"] and layout["scroll"] == layout["width"] == width, (width, layout)
    assert page.evaluate(TEXT_SHOWN, "#search .pick") and page.inner_text("#search .pick").startswith("or an image")
    columns = page.eval_on_selector_all("#results .hit", "h => new Set(h.map(x => x.getBoundingClientRect().left))"
                                                         ".size")
    assert columns == 2, (width, columns)
    page.evaluate("document.dispatchEvent(new DragEvent('dragenter', {bubbles: true}))")
    assert page.is_visible("#drop") and page.evaluate(TEXT_SHOWN, "#drop"), width
    page.evaluate("document.dispatchEvent(new DragEvent('dragleave', {bubbles: true}))")
    assert page.is_hidden("#drop")


def test_the_page_fits_a_phone(base, browser, tmp_path):
    context = browser.new_context(viewport={"width": PHONES[0], "height": 780}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(f"{base}/?q={CAPTION.replace(' ', '+')}&m=text")  # captions: the longest cards
    shown_ids(page)
    for width in PHONES:
        fits(page, width)
    page.set_viewport_size({"width": 390, "height": 780})
    page.check("input[name=modality][value=image]")
    page.set_input_files("#file", str(ASSETS / "102.jpg"))  # the picker, as a phone has no drag and drop
    page.wait_for_function("() => location.search.includes('image=102.jpg')")
    assert len(shown_ids(page)) == 24
    uploaded(page, "102.jpg")
    for width in PHONES:
        fits(page, width)
    page.set_viewport_size({"width": 390, "height": 780})
    shot = os.environ.get("DUCH_PHONE_SCREENSHOT") or str(tmp_path / "serve-phone.jpg")
    page.screenshot(path=shot, **({"quality": 70} if shot.endswith(".jpg") else {}))
    context.close()


@pytest.fixture(scope="module")
def scene_site(scenes, tmp_path_factory):
    root = tmp_path_factory.mktemp("phone-map")
    shutil.copytree(scenes["model"], root / "model")  # where the archive's codes say their model is
    shutil.copytree(scenes["archive"], root / "scenes")
    with running(create_app(ServeConfig(run=str(root / "scenes"), bits=64, device="cpu"))) as url:
        yield url


def test_the_map_fits_a_phone_above_its_hits(scene_site, browser):
    context = browser.new_context(viewport={"width": PHONES[0], "height": 780}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(f"{scene_site}/?q=many+airplanes+parked+at+the+airport")
    ids = shown_ids(page)
    for width in PHONES:
        page.set_viewport_size({"width": width, "height": 780})
        layout = page.evaluate(OVERFLOW)
        assert not layout["wide"] and layout["scroll"] == layout["width"] == width, (width, layout)
        frame, grid = page.locator("#map").bounding_box(), page.locator("#results").bounding_box()
        assert frame["width"] >= width - 40 and 240 <= frame["height"] <= 780 * 0.6, frame
        assert frame["y"] + frame["height"] <= grid["y"]  # the map above its hits, not beside them
    assert page.eval_on_selector_all("#map polygon.footprint", "p => p.map(x => x.dataset.id)") == ids
    frame = page.locator("#map").bounding_box()  # a box drawn across the map's middle searches it
    page.mouse.move(frame["x"] + frame["width"] * 0.3, frame["y"] + frame["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(frame["x"] + frame["width"] * 0.7, frame["y"] + frame["height"] * 0.7, steps=4)
    page.mouse.up()
    page.wait_for_function("() => location.search.includes('bbox=')")
    settled(page)
    assert page.locator("#map rect.searchbox").count() == 1
    context.close()
