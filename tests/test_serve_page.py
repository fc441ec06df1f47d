"""The search page in a real browser (Debian's chromium driven by Playwright) against a real server on 127.0.0.1:
type a caption and see thumbnails that really loaded, "more like this", back and forward, the modality switch,
paging, the class filter, an image picked and an image dropped, a shared link and the error state, with no
request leaving the service.

    DUCH_SCREENSHOT=docs/serve.jpg DUCH_SERVE_RUN=runs/ucm python -m pytest tests/test_serve_page.py

runs the same test against a finished run of your own at 64 bits (instead of the tiny test run) and keeps the
screenshot of its caption search (by default it goes to the test's temporary folder).
"""
import os
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

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

pytestmark = pytest.mark.slow  # a browser and a server: about ten seconds on 2 cores

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
    assert not page.is_hidden("#pager") and page.inner_text("#pageinfo").startswith("page 1 of ")
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

    page.evaluate("""bytes => {  // an image dropped on the page
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], "1003.jpg", {type: "image/jpeg"}));
        document.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
    }""", list((ASSETS / "1003.jpg").read_bytes()))
    page.wait_for_function("() => document.getElementById('query').innerText === 'Images like 1003.jpg'")
    assert len(shown_ids(page)) == 24 and query(page)["image"] == "1003.jpg"
    page.go_back()  # back to the picked file's query: the page still holds that image
    page.wait_for_function("() => document.getElementById('query').innerText === 'Images like 102.jpg'")
    assert len(shown_ids(page)) == 24

    shared = browser.new_context().new_page()  # a link opened elsewhere is the same search
    shared.on("request", lambda r: requested.append(r.url))
    shared.goto(f"{base}/?q={CAPTION.replace(' ', '+')}&m=image")
    shared.wait_for_selector("#results .hit img")
    assert shown_ids(shared) == first
    shared.goto(f"{base}/?id=no-such-item")
    settled(shared, "error")
    assert "id 'no-such-item' is not in the archive" in shared.inner_text("#status")
    assert shared.is_visible("#status.error")

    assert requested and all(url.startswith(base + "/") for url in requested), \
        [u for u in requested if not u.startswith(base)]  # no CDN, nothing beyond the service
    context.close()
