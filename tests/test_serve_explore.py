"""Exploring an archive on the search page, in a real browser (Debian's chromium driven by Playwright) against a
real server on 127.0.0.1: results marked right and wrong (the marks in the address at once, no new search), the
refine step (the service's own refined ranking), the address shared to another browser and reloaded (the marks and
the refined results come back), the marked images hidden; and "like this, near here" on a scene archive's map (a
point clicked with a radius of 0: the tile there only).

    DUCH_REFINE_SCREENSHOT=docs/refine.jpg DUCH_SERVE_RUN=runs/ucm python -m pytest tests/test_serve_explore.py

runs the marks' test against a finished run of your own at 64 bits and keeps the screenshot of the refined search.
"""
import os
import shutil

import httpx
import numpy as np
import pytest

from duch.pipeline.config import ServeConfig
from duch.pipeline.serve.app import create_app

from .serving import running
from .test_serve_map import config, on_page, site  # noqa: F401  (fixtures)
from .test_serve_page import ALL_LOADED, browser, query, settled  # noqa: F401  (browser: a fixture)

CAPTION = os.environ.get("DUCH_REFINE_CAPTION", "many planes parked at the airport")
pytestmark = pytest.mark.slow  # a browser and two servers: about 15 s on 2 cores

if not os.path.exists("/usr/bin/chromium") and not os.environ.get("CI"):  # CI installs it (.ci/run)
    pytestmark = [pytestmark, pytest.mark.skip(reason="needs Debian's chromium: apt-get install -y chromium")]


@pytest.fixture(scope="module")
def base(request, tmp_path_factory):
    own = os.environ.get("DUCH_SERVE_RUN")
    if own:
        config = ServeConfig(run=own, bits=64)
    else:
        run = tmp_path_factory.mktemp("explore") / "run"
        shutil.copytree(request.getfixturevalue("encoded_run"), run)
        config = ServeConfig(run=str(run), bits=16, device="cpu")
    with running(create_app(config)) as url:
        yield url


def cards(page) -> list[dict]:
    settled(page)
    page.wait_for_function(ALL_LOADED)
    return page.eval_on_selector_all("#results .hit", """hits => hits.map(h => ({id: h.dataset.id,
        image: h.dataset.image, label: h.querySelector('.label').textContent, right: h.classList.contains('right'),
        wrong: h.classList.contains('wrong')}))""")


def test_marks_refine_share_and_reload(base, browser, tmp_path):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((base, "blob:", "data:")) else None)
    page.goto(base + "/")
    page.fill("#q", CAPTION)
    page.press("#q", "Enter")
    first = cards(page)
    assert len(first) > 8 and page.is_hidden("#marksbar")
    # Right: the first hit's class among the first 8; wrong: the others. The address keeps them, no search runs.
    target = first[0]["label"]
    right = [c["image"] for c in first[:8] if c["label"] == target]
    wrong = [c["image"] for c in first[:8] if c["label"] != target]
    searches = []
    page.on("request", lambda r: searches.append(r.url) if r.url.endswith("/api/search") else None)
    for c in first[:8]:
        page.click(f'#results .hit[data-image="{c["image"]}"] .mark.{"pos" if c["image"] in right else "neg"}')
    page.click(f'#results .hit[data-image="{first[0]["image"]}"] .mark.neg')  # changed its mind: wrong, then
    page.click(f'#results .hit[data-image="{first[0]["image"]}"] .mark.pos')  # right again
    assert searches == [] and set(query(page)["pos"].split(",")) == set(right)
    assert set(query(page).get("neg", "").split(",")) - {""} == set(wrong)
    assert {c["image"] for c in cards(page) if c["right"]} == set(right)
    assert page.inner_text("#markinfo").startswith(f"{len(right)} right, {len(wrong)} wrong marked")
    # Refine: the service's refined ranking, the marks still on their cards.
    page.click("#refine")
    refined = cards(page)
    assert query(page)["refine"] == "1" and len(searches) == 1
    fields = {"text": CAPTION, "positives": query(page)["pos"], "negatives": query(page).get("neg"), "k": 24}
    api = httpx.post(f"{base}/api/search", json={**fields, "offset": 0, "modality": "image"}, timeout=60).json()
    assert [c["id"] for c in refined] == [h["id"] for h in api["hits"]]
    assert {c["image"] for c in refined if c["right"]} == set(right) & {c["image"] for c in refined}
    assert "refined with" in page.inner_text("#query")
    shot = os.environ.get("DUCH_REFINE_SCREENSHOT") or str(tmp_path / "refine.jpg")
    page.screenshot(path=shot, type="jpeg", quality=80)
    # Shared: the address in another browser shows the same marks and refined results; so does a reload.
    address = page.url
    other = browser.new_page(viewport={"width": 1280, "height": 900})
    other.goto(address)
    assert cards(other) == refined
    page.reload()
    assert cards(page) == refined and page.input_value("#q") == CAPTION
    # Hide marked: none of the marked images comes back.
    page.check("#hidemarked")
    hidden = cards(page)
    assert query(page)["ex"] == "1" and not {c["image"] for c in hidden} & set(right + wrong)
    page.go_back()
    assert cards(page) == refined
    page.click("#clearmarks")
    assert "pos" not in query(page) and [c["id"] for c in cards(page)] == [c["id"] for c in first]
    assert outside == []
    other.close()
    page.close()


def test_like_this_near_here_on_the_map(site, browser):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(site + "/?id=merced/0_0")
    settled(page)
    shown = set(page.eval_on_selector_all("#results .hit", "h => h.map(x => x.dataset.id)"))
    info = httpx.get(f"{site}/api/items/merced/5_6", timeout=30).json()
    assert "merced/5_6" not in shown  # off the hits' footprints, so the click is a point, not a pick
    page.fill("#radius", "0")
    (x, y), = on_page(page, np.asarray(info["place"]["lonlat"]).mean(axis=0))
    page.mouse.click(x, y)
    settled(page)
    lon, lat, metres = (float(v) for v in query(page)["near"].split(","))
    assert metres == 0 and query(page)["id"] == "merced/0_0"
    assert page.eval_on_selector_all("#results .hit", "h => h.map(x => x.dataset.id)") == ["merced/5_6"]
    assert page.locator("#map circle.nearpoint").count() == 1 and "within 0 m" in page.inner_text("#nearinfo")
    page.fill("#radius", "100")
    page.dispatch_event("#radius", "change")
    settled(page)
    assert query(page)["near"].endswith(",100") and len(page.eval_on_selector_all("#results .hit", "h => h")) == 9
    page.click("#clearnear")
    settled(page)
    assert "near" not in query(page)
    page.close()
