"""The service's API description (issue 31, defect 4): every `$ref` resolves, every status the service answers is
documented with the shape it really has, the GeoJSON routes as application/geo+json; /docs renders from the
service's own files with no request leaving 127.0.0.1 (in a real browser); and an API fuzzer (schemathesis) over the
live document, a fixed seed and a fixed number of examples per operation: no 5xx, every answer as documented."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import httpx
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from duch.pipeline.config import ServeConfig
from duch.pipeline.serve.app import create_app

from .serving import running
from .test_serve_page import ARGS, CHROMIUM

FUZZ_EXAMPLES = 40  # per operation (8 of them), a fixed seed (derandomized): about 15 s on 2 cores


@pytest.fixture(scope="module")
def run(tmp_path_factory, encoded_run) -> Path:
    target = tmp_path_factory.mktemp("openapi") / "run"
    shutil.copytree(encoded_run, target)
    return target


@pytest.fixture(scope="module")
def base(run):
    # The fuzzer sends invalid requests on purpose, hundreds of them: no refusal rule slows it (test_serve_fairness).
    config = ServeConfig(run=str(run), bits=16, device="cpu", max_upload_mb=0.5, refusal_rate=0)
    with running(create_app(config)) as url:
        yield url


@pytest.fixture(scope="module")
def doc(base) -> dict:
    return httpx.get(f"{base}/openapi.json").json()


def refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from [value] if key == "$ref" else refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def resolved(doc: dict, ref: str):
    assert ref.startswith("#/"), ref
    node = doc
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def operations(doc: dict):
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_every_ref_resolves_and_every_error_is_an_error_object(doc):
    found = list(refs(doc))
    assert "#/components/schemas/SearchRequest" in found  # POST /api/search's body
    for ref in found:
        resolved(doc, ref)
    ids = [operation["operationId"] for _, _, operation in operations(doc)]
    assert len(ids) == len(set(ids)), ids  # what client generators name their functions by
    assert {"HTTPValidationError", "ValidationError"}.isdisjoint(doc["components"]["schemas"])  # never answered
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
    for path, method, operation in operations(doc):
        responses = operation["responses"]
        assert {"400", "413"} <= set(responses), (method, path)  # Host, a declared body's size: any route
        for status, response in responses.items():
            assert status.startswith("2") or response["content"] == error, (method, path, status)
    search = doc["paths"]["/api/search"]["post"]["responses"]
    assert {"200", "400", "403", "404", "408", "413", "415", "422", "503"} <= set(search)
    for path in ("/api/scenes", "/api/search.geojson"):
        assert set(doc["paths"][path]["get"]["responses"]["200"]["content"]) == {"application/geo+json"}
    names = {p["name"] for p in doc["paths"]["/api/search.geojson"]["get"]["parameters"]}
    assert {"text", "id", "k", "offset", "bbox", "inside", "date_from", "date_to", "label", "archive"} <= names


def conforms(doc: dict, path: str, method: str, answer: httpx.Response) -> None:
    """The answer's status and media type are documented for the operation, and its body has the documented shape."""
    responses = doc["paths"][path][method]["responses"]
    assert str(answer.status_code) in responses, (method, path, answer.status_code, answer.text)
    content = responses[str(answer.status_code)].get("content", {})
    media = answer.headers["content-type"].split(";")[0]
    assert media in content, (method, path, answer.status_code, media)
    schema = content[media].get("schema")
    if schema:
        jsonschema.validate(answer.json(), {**schema, "components": doc["components"]})


def test_the_answers_the_service_gives_are_the_documented_ones(base, doc):
    json_kind = {"content-type": "application/json"}
    answers = [
        ("/api/search", "post", 200, httpx.post(f"{base}/api/search", json={"text": "a harbor", "k": 3})),
        ("/api/search", "post", 400, httpx.post(f"{base}/api/search", content=b"{", headers=json_kind)),
        ("/api/search", "post", 404, httpx.post(f"{base}/api/search", json={"id": "no such id"})),
        ("/api/search", "post", 413, httpx.post(f"{base}/api/search", content=b" " * 600_000, headers=json_kind)),
        ("/api/search", "post", 415, httpx.post(f"{base}/api/search", content=b"text=a", headers={
            "content-type": "text/plain"})),
        ("/api/search", "post", 422, httpx.post(f"{base}/api/search", json={})),
        ("/api/search", "post", 403, httpx.post(f"{base}/api/search", json={"text": "a harbor"}, headers={
            "Origin": "http://elsewhere.example"})),
        ("/api/info", "get", 400, httpx.get(f"{base}/api/info", headers={"Host": "elsewhere.example"})),
        ("/api/search", "post", 400, httpx.post(f"{base}/api/search", files={"image": ("a.png", b"not an image")})),
        ("/api/search.geojson", "get", 422, httpx.get(f"{base}/api/search.geojson", params={"text": "a harbor"})),
        ("/api/scenes", "get", 200, httpx.get(f"{base}/api/scenes")),
        ("/api/scenes", "get", 404, httpx.get(f"{base}/api/scenes", params={"archive": "nope"})),
        ("/api/items/{item_id}", "get", 200, httpx.get(f"{base}/api/items/5%231")),
        ("/api/items/{item_id}", "get", 404, httpx.get(f"{base}/api/items/nope")),
        ("/api/info", "get", 200, httpx.get(f"{base}/api/info")),
        ("/thumbs/{item_id}", "get", 200, httpx.get(f"{base}/thumbs/5")),
        ("/thumbs/{item_id}", "get", 404, httpx.get(f"{base}/thumbs/nope")),
        ("/healthz", "get", 200, httpx.get(f"{base}/healthz")),
        ("/metrics", "get", 200, httpx.get(f"{base}/metrics")),
    ]
    for path, method, status, answer in answers:
        assert answer.status_code == status, (method, path, answer.text)
        conforms(doc, path, method, answer)
    scenes = next(a for p, _, status, a in answers if p == "/api/scenes" and status == 200)
    assert scenes.headers["content-type"] == "application/geo+json" and scenes.json()["type"] == "FeatureCollection"


def test_a_query_that_timed_out_is_the_documented_503(run, doc):
    with running(create_app(ServeConfig(run=str(run), bits=16, device="cpu", timeout=1e-4))) as url:
        late = httpx.post(f"{url}/api/search", json={"text": "a harbor"}, timeout=30)
    assert late.status_code == 503, late.text
    conforms(doc, "/api/search", "post", late)
    assert int(late.headers["retry-after"]) >= 1
    assert doc["paths"]["/api/search"]["post"]["responses"]["503"]["headers"]["Retry-After"]["required"]


@pytest.fixture(scope="module")
def scene_base(scenes, tmp_path_factory):
    root = tmp_path_factory.mktemp("openapi-scenes")
    shutil.copytree(scenes["archive"], root / "scenes")  # the service caches thumbnails in the archive's run
    shutil.copytree(scenes["model"], root / "model")  # where the archive's codes say their model is
    with running(create_app(ServeConfig(run=str(root / "scenes"), bits=64, device="cpu"))) as url:
        yield url


def test_the_geojson_a_scene_archive_answers_is_the_documented_one(scene_base):
    doc = httpx.get(f"{scene_base}/openapi.json").json()
    outlines = httpx.get(f"{scene_base}/api/scenes")
    hits = httpx.get(f"{scene_base}/api/search.geojson", params={"text": "airplane", "k": 5, "bbox": "-180,-90,180,90"})
    for path, answer in (("/api/scenes", outlines), ("/api/search.geojson", hits)):
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/geo+json"
        conforms(doc, path, "get", answer)
    assert outlines.json()["features"][0]["geometry"]["type"] == "Polygon" and len(hits.json()["features"]) == 5


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists() and not os.environ.get("CI"):  # CI installs it (.ci/run): there it must run
        pytest.skip("needs Debian's chromium: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.mark.slow
def test_docs_render_every_operation_offline_from_the_pages_api_link(base, browser):
    page = browser.new_page()
    elsewhere = []

    def only_local(route):
        if urlparse(route.request.url).hostname == "127.0.0.1":
            return route.continue_()
        elsewhere.append(route.request.url)
        return route.abort()

    page.route("**/*", only_local)
    page.goto(base + "/")
    page.click("a.docs")  # the page's "API" link
    page.wait_for_selector(".opblock-summary-path")
    shown = set(page.eval_on_selector_all(".opblock", "ops => ops.map(o => o.querySelector("
                                          "'.opblock-summary-method').innerText + ' ' + o.querySelector("
                                          "'.opblock-summary-path').dataset.path)"))
    assert shown == {f"{m.upper()} {p}" for p, m, _ in operations(httpx.get(f"{base}/openapi.json").json())}
    page.click(".opblock-post .opblock-summary")  # POST /api/search: its body and answers, resolved
    page.wait_for_selector(".opblock-post .responses-table")
    body = page.inner_text(".opblock-post")
    assert "SearchRequest" in body or "text" in body
    assert "ErrorOut" in body or '"error"' in body
    assert page.locator(".errors-wrapper").count() == 0  # Swagger UI's "Could not resolve reference" box
    assert not elsewhere, elsewhere
    page.close()


def fuzz_config() -> schemathesis.Config:
    # A request the schema allows may still break a rule that the description states in words and no JSON Schema
    # can: exactly one query (text, id or an image), offset + k at most 10000, a label the archive has (422), an
    # id or archive the service has (404), an upload (any bytes, to a schema) that decodes as an image (400). Any
    # other refusal of a schema-valid request (a 413, a 415, a 5xx...) still fails the check.
    return schemathesis.Config.from_dict({"checks": {"positive_data_acceptance": {
        "expected-statuses": ["2XX", "400", "404", "422"]}}})


@pytest.fixture(scope="module")
def api_schema(base):
    return schemathesis.openapi.from_url(f"{base}/openapi.json", config=fuzz_config())


@pytest.fixture(scope="module")
def scene_schema(scene_base):
    """A scene archive's service: its GeoJSON routes answer features (the tiny archive has no places)."""
    return schemathesis.openapi.from_url(f"{scene_base}/openapi.json", config=fuzz_config())


api = schemathesis.pytest.from_fixture("api_schema")
scene_api = schemathesis.pytest.from_fixture("scene_schema").include(path_regex="^/api/(scenes|search.geojson)$")


@pytest.mark.fuzz
@api.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_fuzz_the_api_over_its_own_description(case):
    """No 5xx, every status, media type, header and body as documented; schema-invalid requests refused."""
    case.call_and_validate(timeout=30)


@pytest.mark.fuzz
@scene_api.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_fuzz_the_geojson_routes_of_a_scene_archive(case):
    case.call_and_validate(timeout=30)
