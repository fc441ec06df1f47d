"""`duch serve`: the API over HTTP on a real uvicorn server (127.0.0.1), on a tiny run built from real tiles."""
import asyncio
import io
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from PIL import Image

from duch.data.images import load_image
from duch.pipeline import DuchError
from duch.pipeline.config import ServeConfig
from duch.pipeline.retrieval.search import Index
from duch.pipeline.serve.admission import Admission, Overloaded
from duch.pipeline.serve.app import create_app
from duch.pipeline.serve.batching import QueryBatcher
from duch.pipeline.serve.thumbs import Thumbnails, thumbnail_jpeg

from .serving import running
from .test_bad_input import png_bomb

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, encoded_run) -> Path:
    target = tmp_path_factory.mktemp("served") / "run"
    shutil.copytree(encoded_run, target)
    return target


@pytest.fixture(scope="module")
def base(run):
    with running(create_app(ServeConfig(run=str(run), bits=16, device="cpu", max_upload_mb=0.5))) as url:
        yield url


@pytest.fixture(scope="module")
def index(run) -> Index:
    return Index.load(run, bits=16, device="cpu")


def post(base, **fields) -> httpx.Response:
    return httpx.post(f"{base}/api/search", json=fields, timeout=30)


def archive_image(index: Index, image_id: str) -> Path:
    return index.images_dir / str(index.tables["image"].meta["path"][index.tables["image"].row_of[image_id]])


def test_a_caption_query_returns_what_the_library_ranks_with_thumbnails_that_load(base, index):
    answer = post(base, text="a harbor scene number 4", k=5).json()
    expected = index.search(text="a harbor scene number 4", k=5)
    assert [(h["id"], h["distance"], h["label"]) for h in answer["hits"]] == \
        [(h.id, h.distance, h.label) for h in expected]
    assert answer["modality"] == "image" and answer["matched"] == 24 and answer["query"]["kind"] == "text"
    assert set(answer["timings"]) == {"encode_ms", "scan_ms", "total_ms", "batch"} and answer["timings"]["batch"] >= 1
    assert answer["timings"]["total_ms"] >= answer["timings"]["encode_ms"] > 0
    for hit in answer["hits"]:
        order, texts = _captions(index, hit["id"])
        assert hit["captions"] == [t for _, t in sorted(zip(order, texts))] and hit["caption"] == hit["captions"][0]
        thumb = httpx.get(base + hit["thumbnail"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        img = Image.open(io.BytesIO(thumb.content))
        assert img.format == "JPEG" and max(img.size) <= 256 and min(img.size) > 0


def _captions(index, image_id):
    meta = index.tables["text"].meta
    rows = [r for r, i in enumerate(meta["image_id"]) if str(i) == image_id]
    return [int(meta["caption_index"][r]) for r in rows], [meta["text"][r] for r in rows]


def test_id_query_caption_results_and_paging_are_one_ranking(base, index):
    answer = post(base, id="3", k=6, modality="text").json()
    assert [h["id"] for h in answer["hits"]] == [h.id for h in index.search(id="3", k=6, modality="text")]
    assert all(h["modality"] == "text" and "#" in h["id"] and h["captions"] == [h["caption"]] for h in answer["hits"])
    assert all(h["thumbnail"] == f"/thumbs/{h['image_id']}" for h in answer["hits"])
    whole = [h["id"] for h in post(base, id="3", k=30, modality="text").json()["hits"]]
    pages = [h["id"] for offset in range(0, 30, 7) for h in
             post(base, id="3", k=min(7, 30 - offset), offset=offset, modality="text").json()["hits"]]
    assert pages == whole and len(whole) == 30
    ranks = [h["rank"] for h in post(base, id="3", k=5, offset=10, modality="text").json()["hits"]]
    assert ranks == list(range(11, 16))


def test_an_uploaded_archive_tile_under_its_name_finds_itself_as_the_file_query_does(base, index):
    path = archive_image(index, "7")
    answer = httpx.post(f"{base}/api/search", files={"image": ("7.jpg", path.read_bytes(), "image/jpeg")},
                        data={"k": "4", "modality": "image"}, timeout=30).json()
    expected = index.search(image=path, k=4, modality="image")
    assert [(h["id"], h["distance"]) for h in answer["hits"]] == [(h.id, h.distance) for h in expected]
    assert answer["hits"][0]["distance"] == 0 and "7" in [h["id"] for h in answer["hits"] if h["distance"] == 0]
    assert answer["query"] == {"kind": "image", "image": "7.jpg"}


def test_the_label_filter_applies_before_the_top_k_and_counts_what_it_let_through(base, index):
    labels = index.tables["image"].meta["label"]
    harbors = int((labels == "harbor").sum())
    answer = post(base, text="airplane", k=5, label="harbor").json()
    assert answer["matched"] == harbors == 8
    assert len(answer["hits"]) == 5 and {h["label"] for h in answer["hits"]} == {"harbor"}
    every = post(base, text="airplane", k=50, label="harbor").json()
    assert len(every["hits"]) == harbors  # all it lets through, never fewer
    captions = post(base, text="airplane", k=50, label="court", modality="text").json()
    assert captions["matched"] == 16 and len(captions["hits"]) == 16
    assert {h["label"] for h in captions["hits"]} == {"court"}


def test_items_info_health_and_docs(base):
    item = httpx.get(f"{base}/api/items/5%231").json()
    assert item["id"] == "5#1" and item["modality"] == "text" and item["image_id"] == "5"
    assert item["captions"][0] == {"id": "5#1", "text": "court seen from above"} and item["label"] == "court"
    assert httpx.get(f"{base}/api/items/5").json()["captions"][0]["id"] == "5#0"
    info = httpx.get(f"{base}/api/info").json()
    assert info["archives"][0]["labels"] == ["airplane", "court", "harbor"] and info["bits"] == 16
    assert httpx.get(f"{base}/healthz").json()["status"] == "ok"
    spec = httpx.get(f"{base}/openapi.json").json()
    assert set(spec["paths"]["/api/search"]["post"]["requestBody"]["content"]) == {"application/json",
                                                                                  "multipart/form-data"}
    assert "swagger" in httpx.get(f"{base}/docs").text.lower()
    page = httpx.get(base + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text and "http" not in page.text.replace(
        'http-equiv', '')  # every asset from the service itself
    assert httpx.get(f"{base}/static/app.js").status_code == 200


def chunked_upload(size: int):
    """A multipart upload sent in chunks, without a Content-Length."""
    yield (b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
           b"Content-Type: image/jpeg\r\n\r\n")
    for _ in range(size // 100_000):
        yield b"\xff" * 100_000


def test_bad_and_hostile_input_gets_one_clear_json_error(base, tmp_path):
    png_bomb(tmp_path / "bomb.png")
    cases = [
        (dict(json={}), 422, "no query: give exactly one of text"),
        (dict(json={"text": "a", "id": "1"}), 422, "text and id at once"),
        (dict(files={"image": ("a.jpg", (ROOT / "tests/assets/102.jpg").read_bytes())}, data={"text": "a"}), 422,
         "text and image at once"),
        (dict(json={"id": "no-such-item"}), 404, "id 'no-such-item' is not in the archive"),
        (dict(json={"text": "a", "k": 0}), 422, "k: Input should be greater than or equal to 1"),
        (dict(json={"text": "a", "k": 100000}), 422, "k: Input should be less than or equal to 200"),
        (dict(json={"text": "a", "k": 150, "offset": 9900}), 422, "offset + k must be at most 10000"),
        (dict(json={"text": "a", "rerank": -1}), 422, "rerank: Input should be greater than or equal to 0"),
        (dict(json={"text": "a", "url": "http://example.org/x.jpg"}), 422, "url: unknown field"),
        (dict(json={"text": "a", "label": "volcano"}), 422, "label 'volcano' is not in archive"),
        (dict(json={"text": "a", "archive": "other"}), 404, "no archive 'other'"),
        (dict(content=b'{"text": "a",', headers={"content-type": "application/json"}), 400, "malformed JSON body"),
        (dict(content=b'["a"]', headers={"content-type": "application/json"}), 422, "must be an object"),
        (dict(content=b"text=a", headers={"content-type": "text/plain"}), 415, "send the query as JSON"),
        (dict(files={"image": ("notes.jpg", b"%PDF-1.4 not an image")}), 400,
         "uploaded file 'notes.jpg': not a recognised image"),
        (dict(files={"image": ("half.jpg", (ROOT / "tests/assets/102.jpg").read_bytes()[:9000])}), 400,
         "uploaded file 'half.jpg': truncated image file"),
        (dict(files={"image": ("bomb.png", (tmp_path / "bomb.png").read_bytes())}), 400,
         "image too large (900000000 pixels; the limit against decompression bombs"),
        (dict(files={"image": ("big.jpg", b"\xff" * 600_000)}), 413, "over the 0.5 MB limit"),
        (dict(content=chunked_upload(700_000), headers={"content-type": "multipart/form-data; boundary=x"}), 413,
         "over the 0.5 MB limit"),  # no Content-Length: cut off once past the limit
    ]
    for request, status, words in cases:
        response = httpx.post(f"{base}/api/search", timeout=30, **request)
        assert (response.status_code, response.headers["content-type"]) == (status, "application/json"), request
        assert words in response.json()["error"] and "\n" not in response.json()["error"]
    assert httpx.get(f"{base}/api/items/nope").status_code == 404
    assert httpx.get(f"{base}/nowhere").json()["error"].startswith("no such page")
    # The service still answers after all of that.
    assert post(base, text="a harbor", k=1).status_code == 200


def test_thumbnails_take_archive_ids_only_and_are_cached_in_the_run(base, run):
    for hostile in ("..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "0%2F..%2F1", "images%2F0.jpg"):
        response = httpx.get(f"{base}/thumbs/{hostile}")
        assert response.status_code == 404 and "is not in the archive" in response.json()["error"]
    first = httpx.get(f"{base}/thumbs/2%230")  # a caption's id: its image's thumbnail
    assert first.status_code == 200 and first.content == httpx.get(f"{base}/thumbs/2").content
    cached = list((run / "serve" / "thumbs").rglob("*.jpg"))
    assert cached and first.content in [p.read_bytes() for p in cached]
    assert not list((run / "serve" / "thumbs").rglob("*.tmp"))


def test_a_thumbnail_follows_extracts_conversion_rules_and_names_a_missing_file(tmp_path):
    raster = np.random.default_rng(1).integers(0, 5000, (300, 200, 4), dtype=np.uint16)  # 16-bit RGB + NIR
    tifffile.imwrite(tmp_path / "tile.tif", raster)
    thumbs = Thumbnails(tmp_path / "cache", size=64)
    data = thumbs.get(tmp_path / "tile.tif")
    assert data == thumbnail_jpeg(load_image(tmp_path / "tile.tif"), 64)
    assert Image.open(io.BytesIO(data)).size == (43, 64) and thumbs.count() == 1
    assert thumbs.get(tmp_path / "tile.tif") == data and thumbs.count() == 1
    with pytest.raises(Exception, match="is missing"):
        thumbs.get(tmp_path / "gone.tif")


def test_metrics_count_requests_by_route_template(base):
    post(base, text="a court", k=2)
    httpx.get(f"{base}/thumbs/1")
    text = httpx.get(f"{base}/metrics").text
    assert 'duch_http_requests_total{method="POST",route="/api/search",status="200"}' in text
    assert 'route="/thumbs/{item_id:path}"' in text and "duch_queries_in_flight 0.0" in text
    assert 'duch_query_coder_batch_size_count{modality="text"}' in text
    assert 'duch_query_duration_seconds_bucket{kind="text"' in text
    assert "/thumbs/1\"" not in text  # raw paths never become labels


def test_cors_is_off_unless_asked(base, run):
    assert "access-control-allow-origin" not in httpx.get(f"{base}/api/info",
                                                          headers={"origin": "http://elsewhere.example"}).headers
    app = create_app(ServeConfig(run=str(run), bits=16, device="cpu", cors_origins=("http://maps.example",)))
    with running(app) as other:
        got = httpx.get(f"{other}/api/info", headers={"origin": "http://maps.example"})
        assert got.headers["access-control-allow-origin"] == "http://maps.example"


def test_admission_refuses_past_the_limit_at_once_and_frees_slots_when_work_ends():
    async def scenario():
        admission = Admission(limit=2, timeout=5)
        gate = asyncio.Event()

        async def held():
            await gate.wait()
            return "done"

        first = asyncio.ensure_future(admission.run(held))
        second = asyncio.ensure_future(admission.run(held))
        await asyncio.sleep(0)
        assert admission.in_flight == 2
        start = time.perf_counter()
        with pytest.raises(Overloaded) as refused:
            await admission.run(held)
        assert time.perf_counter() - start < 0.05 and refused.value.retry_after >= 1
        gate.set()
        assert await first == await second == "done" and admission.in_flight == 0
        slow = Admission(limit=1, timeout=0.05)
        with pytest.raises(Overloaded, match="longer than the 0.05 s limit"):
            await slow.run(lambda: asyncio.sleep(10))
        for _ in range(10):  # the cancelled task ends within a few turns of the loop, not 10 s later
            await asyncio.sleep(0)
        assert slow.in_flight == 0  # and gave its slot back

    asyncio.run(scenario())


def test_a_burst_past_the_limit_gets_503s_with_retry_after_and_no_other_error(run):
    app = create_app(ServeConfig(run=str(run), bits=16, device="cpu", max_in_flight=1))

    async def burst(url):
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*[client.post(f"{url}/api/search", json={"text": f"a scene {i}"})
                                          for i in range(24)])

    with running(app) as url:
        for _ in range(3):  # the first query must still be in flight when the others arrive: usually the first burst
            answers = asyncio.run(burst(url))
            if any(a.status_code == 503 for a in answers):
                break
        assert 'duch_queries_refused_total{reason="overload"}' in httpx.get(f"{url}/metrics").text
    statuses = {a.status_code for a in answers}
    assert statuses == {200, 503}
    refused = next(a for a in answers if a.status_code == 503)
    assert int(refused.headers["retry-after"]) >= 1 and "limit of 1 queries in flight" in refused.json()["error"]
    timeout_app = create_app(ServeConfig(run=str(run), bits=16, device="cpu", timeout=1e-4))
    with running(timeout_app) as url:
        late = httpx.post(f"{url}/api/search", json={"text": "a harbor"}, timeout=30)
        assert late.status_code == 503 and "longer than the 0.0001 s limit" in late.json()["error"]
        assert httpx.post(f"{url}/api/search", json={"text": "a harbor"}, timeout=30).status_code == 503
        assert 'duch_queries_refused_total{reason="timeout"} 2.0' in httpx.get(f"{url}/metrics").text


def test_queued_captions_are_coded_in_one_pass_with_the_codes_one_at_a_time_gives(index):
    passes = []
    gate = threading.Event()

    def held(items):
        gate.wait(10)
        return items

    batcher = QueryBatcher(max_batch=64, on_batch=lambda coder, n, s: passes.append(n))
    try:
        busy = batcher.submit(held, "first")
        texts = [f"a court scene number {i}" for i in range(10)]
        futures = [batcher.submit(index.coder.embed_text, t) for t in texts]
        gate.set()
        assert busy.result(10) == ("first", 1)
        coded = [f.result(30) for f in futures]
    finally:
        batcher.close()
    assert passes == [1, 10] and {n for _, n in coded} == {10}
    one_by_one = np.stack([index.coder.embed_text([t])[0] for t in texts])
    assert np.allclose(np.stack([c for c, _ in coded]), one_by_one, atol=1e-5)
    assert (np.sign(np.stack([c for c, _ in coded])) == np.sign(one_by_one)).all()


def test_two_archives_of_one_model_and_a_refusal_of_another_models(run, tmp_path, tiny_clip_spec):
    from duch.pipeline.config import EncodeConfig, ExtractConfig
    from duch.stages.encode_archive import encode_archive
    from duch.stages.extract import extract

    images = tmp_path / "new" / "images" / "tiles"
    images.mkdir(parents=True)
    for name in ("1003.jpg", "2001.jpg", "156.jpg"):
        shutil.copy(ROOT / "tests/assets" / name, images / name)
    other = tmp_path / "other-run"
    quiet = lambda _: None  # noqa: E731
    extract(ExtractConfig(data=str(tmp_path / "new" / "images"), run=str(other), image_encoder=tiny_clip_spec,
                          text_encoder=None, workers=0, device="cpu"), progress=False, echo=quiet)
    encode_archive(EncodeConfig(run=str(run), archive=str(other), device="cpu"), progress=False, echo=quiet)
    app = create_app(ServeConfig(run=str(run), bits=16, device="cpu", archives=(str(other),)))
    service = app.state.service
    assert list(service.archives) == ["run", "other-run"]
    assert service.archives["other-run"].index.coder.heads is service.archives["run"].index.coder.heads  # loaded once
    with running(app) as url:
        answer = httpx.post(f"{url}/api/search", json={"text": "a harbor", "archive": "other-run", "k": 5}).json()
        assert answer["matched"] == 3 and len(answer["hits"]) == 3
        thumb = httpx.get(url + answer["hits"][0]["thumbnail"])
        assert answer["hits"][0]["thumbnail"].endswith("?archive=other-run") and thumb.status_code == 200
        (images / "156.jpg").unlink()  # an archive file gone since: the thumbnail says so, the service goes on
        gone = httpx.get(f"{url}/thumbs/tiles%2F156?archive=other-run")
        assert gone.status_code == 404 and "156.jpg is missing" in gone.json()["error"], gone.text
    retrained = tmp_path / "retrained"
    shutil.copytree(run, retrained)
    shutil.rmtree(retrained / "serve", ignore_errors=True)
    from duch.pipeline.config import TrainConfig
    from duch.stages.train_hash import train_hash

    train_hash(TrainConfig(run=str(retrained), bits=(16,), epochs=2, hidden=32, batch_size=8, seed=5,
                           device="cpu"), progress=False, echo=quiet, force=True)
    encode_archive(EncodeConfig(run=str(retrained), device="cpu"), progress=False, echo=quiet)
    with pytest.raises(DuchError, match=f"archive {retrained} was coded by another model.*with `archive` {retrained}$"):
        create_app(ServeConfig(run=str(run), bits=16, device="cpu", archives=(str(retrained),)))


@pytest.mark.slow  # two duch processes start (torch, encoders): seconds each on 2 cores
def test_the_cli_serves_the_page_and_refuses_a_run_without_codes(run, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", "--run", str(run), "--bits", "16",
                             "--port", str(port), "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "duch serve did not start"
                time.sleep(0.2)
        assert page.status_code == 200 and "<title>duch search</title>" in page.text
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"at http://127.0.0.1:{port}/" in err and "warning" not in err
    empty = subprocess.run([sys.executable, str(ROOT / "cli.py"), "serve", "--run", str(tmp_path)],
                           capture_output=True, text=True)
    assert empty.returncode == 2 and empty.stderr.startswith("error: ") and "encode-archive" in empty.stderr
    assert len(empty.stderr.strip().splitlines()) == 1


def test_only_loopback_addresses_count_as_private():
    assert all(ServeConfig(run="r", host=h).loopback() for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(ServeConfig(run="r", host=h).loopback() for h in ("0.0.0.0", "::", "192.168.1.4", "example.org"))
    with pytest.raises(DuchError, match="`max_in_flight` must be at least 1"):
        ServeConfig(run="r", max_in_flight=0).validate()
    with pytest.raises(DuchError, match="`threads` must be at least 1"):
        ServeConfig(run="r", threads=0).validate()
