"""`duch serve` against a hostile network (issue 31): large and pathological JSON bodies, other origins and host
names, slow clients, HEAD, process metrics and generation switches; on a real uvicorn server on 127.0.0.1."""
import logging
import shutil
import socket
import time
from pathlib import Path

import httpx
import pytest

from duch.pipeline import DuchError
from duch.pipeline.config import ServeConfig
from duch.pipeline.serve.app import create_app
from duch.pipeline.serve.generations import GenerationWatcher
from duch.pipeline.serve.limits import split_host

from .serving import running

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, encoded_run) -> Path:
    target = tmp_path_factory.mktemp("hostile") / "run"
    shutil.copytree(encoded_run, target)
    return target


@pytest.fixture(scope="module")
def base(run):
    config = ServeConfig(run=str(run), bits=16, device="cpu", allowed_hosts=("search.example.org",),
                         cors_origins=("http://maps.example",), header_timeout=1.0, body_timeout=1.0)
    with running(create_app(config)) as url:
        yield url


def raw_json(base, body: bytes, **headers) -> httpx.Response:
    return httpx.post(f"{base}/api/search", content=body, timeout=30,
                      headers={"content-type": "application/json", **headers})


def test_a_large_json_body_is_refused_from_its_headers_before_a_byte_of_it_is_read(base):
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:  # 18 MB declared, none of it sent
        sock.sendall(f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {18_000_000}\r\n\r\n".encode())
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413") and b"application/json" in answer
    assert b"JSON body is over the 64 KiB limit" in answer
    body = b'{"text": "a", "label": [' + b"1, " * 6_000_000 + b'1]}'  # 18 MB, under the 20 MB upload limit
    response = raw_json(base, body)
    assert (response.status_code, response.headers["content-type"]) == (413, "application/json")
    assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200

    def chunked():  # no Content-Length: cut off once past the limit, never read whole
        for _ in range(300):
            yield b" " * 65_536

    response = httpx.post(f"{base}/api/search", content=chunked(), headers={"content-type": "application/json"},
                          timeout=30)
    assert response.status_code == 413 and "64 KiB" in response.json()["error"]


@pytest.mark.parametrize("body, words", [
    (b"[" * 100_000, "malformed JSON body"),  # over the JSON limit too: refused unparsed
    (b"[" * 60_000, "nested too deep"),
    (b'{"text": ' * 2_000 + b'"a"' + b"}" * 2_000, "nested too deep"),
    (b'{"text": "a", "k": ' + b"9" * 5_000 + b"}", "4300 digits"),
    (b'{"text": "caf\xe9"}', "not UTF-8"),
    (b'{"text": "a",', "Expecting"),
], ids=["100k-brackets", "60k-brackets", "2000-deep-objects", "5000-digit-int", "latin-1", "truncated"])
def test_pathological_json_is_a_json_4xx_never_a_bare_500(base, body, words):
    response = raw_json(base, body)
    assert 400 <= response.status_code < 500 and response.headers["content-type"] == "application/json"
    if response.status_code != 413:
        assert words in response.json()["error"] and "\n" not in response.json()["error"]
    assert response.json()["status"] == response.status_code


def test_a_long_integer_in_a_form_or_query_string_is_a_422(base):
    form = {"text": (None, "a"), "k": (None, "9" * 5_000)}  # multipart, without a file
    response = httpx.post(f"{base}/api/search", files=form, timeout=30)
    assert response.status_code == 422 and response.headers["content-type"] == "application/json"
    response = httpx.get(f"{base}/api/search.geojson", params={"text": "a", "k": "9" * 5_000}, timeout=30)
    assert 400 <= response.status_code < 500 and response.headers["content-type"] == "application/json"


def test_a_post_from_another_origin_is_refused_and_the_own_origin_works(base):
    image = {"image": ("102.jpg", (ROOT / "tests/assets/102.jpg").read_bytes())}
    for origin in ("http://evil.example", "null", "http://127.0.0.1:1"):
        response = httpx.post(f"{base}/api/search", files=image, headers={"origin": origin}, timeout=30)
        assert response.status_code == 403 and "another origin" in response.json()["error"], origin
        form = httpx.post(f"{base}/api/search", data={"text": "a harbor"}, headers={"origin": origin}, timeout=30)
        assert form.status_code == 403
    assert httpx.post(f"{base}/api/search", files=image, headers={"origin": base}, timeout=30).status_code == 200
    assert httpx.post(f"{base}/api/search", files=image, timeout=30).status_code == 200  # curl: no Origin
    allowed = httpx.post(f"{base}/api/search", json={"text": "a"}, headers={"origin": "http://maps.example"})
    assert allowed.status_code == 200  # a --cors origin
    # Reading is not a forgery: a GET from elsewhere is answered (the browser keeps it from the page without CORS).
    assert httpx.get(f"{base}/api/info", headers={"origin": "http://evil.example"}).status_code == 200


def test_a_host_the_service_is_not_bound_to_is_refused_and_an_allowed_one_works(base):
    port = int(base.rsplit(":", 1)[1])
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1:1", f"localhost.evil.example:{port}", "a b",
                 f"search.example.org.evil:{port}"):
        response = httpx.get(f"{base}/healthz", headers={"host": host})
        assert response.status_code == 400 and "is not a name this service answers to" in response.json()["error"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"LOCALHOST:{port}", "search.example.org",
                 "search.example.org:443"):
        assert httpx.get(f"{base}/healthz", headers={"host": host}).status_code == 200, host
    assert split_host("[::1]:8000") == ("[::1]", 8000) and split_host("a:b") == ("", None)


def test_allowed_hosts_are_checked_when_the_service_starts(run):
    with pytest.raises(DuchError, match="`allowed_hosts`: 'http://x' is not a host name"):
        ServeConfig(run=str(run), allowed_hosts=("http://x",)).validate()


def test_head_is_answered_where_get_is(base):
    for path in ("/", "/thumbs/1", "/healthz", "/static/app.js", "/api/info"):
        got, head = httpx.get(f"{base}{path}"), httpx.head(f"{base}{path}")
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]
    assert httpx.head(f"{base}/api/search").status_code == 405


def slow_client(base: str, first: bytes, then: bytes, every: float) -> tuple[int, bytes]:
    """Sends `first`, then a byte of `then` every `every` seconds until the server answers or closes: (bytes of
    `then` sent by then, what the server sent; len(then) if it never did)."""
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(first)
        sock.settimeout(every)
        for sent, byte in enumerate(then):
            try:
                return sent, sock.recv(65536)  # an answer, or b"": closed
            except TimeoutError:
                pass
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return sent, b""
        return len(then), b""


def test_slow_headers_and_slow_bodies_are_cut_off(base):
    port = int(base.rsplit(":", 1)[1])
    headers = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
    trickle = b"X-Slow: " + b"a" * 200  # 208 bytes, one each 0.2 s: 40 s, against a 1 s header deadline
    sent, got = slow_client(base, headers, trickle, 0.2)
    assert sent < len(trickle) and got == b""  # closed, however steadily bytes trickle
    post = (f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 200\r\n\r\n").encode()
    trickle = b'"' + b"a" * 150 + b'"}'
    sent, got = slow_client(base, post + b'{"text": ', trickle, 0.2)
    assert sent < len(trickle) and got.startswith(b"HTTP/1.1 408") and b"not received within 1 s" in got
    assert httpx.get(f"{base}/healthz").status_code == 200


def test_metrics_show_the_process_and_the_archive_generation(base):
    text = httpx.get(f"{base}/metrics").text
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"):
        assert f"\n{name} " in text, name
    assert 'duch_archive_generation{archive="run"} 0.0' in text


def test_a_generation_switch_is_logged_with_the_generation_it_replaced(tmp_path, caplog):
    (tmp_path / "archive.json").write_text("{}")
    swapped = []

    class Archive:
        class index:
            generation = 3

    watcher = GenerationWatcher({"ucm": str(tmp_path)}, lambda name: Archive(),
                                lambda name, archive: swapped.append(name) or 2, interval=60)
    assert watcher.check() == []
    (tmp_path / "new.json").write_text('{"generation": 3}')
    (tmp_path / "new.json").replace(tmp_path / "archive.json")
    with caplog.at_level(logging.INFO, logger="duch.serve"):
        assert watcher.check() == ["ucm"] == swapped
    assert "archive ucm now serves generation 3 (was 2; opened in" in caplog.text


def test_an_upload_that_times_out_is_decoded_under_admission_and_never_coded(run):
    app = create_app(ServeConfig(run=str(run), bits=16, device="cpu", timeout=1e-4))
    image = {"image": ("102.jpg", (ROOT / "tests/assets/102.jpg").read_bytes())}
    with running(app) as url:
        for _ in range(3):
            late = httpx.post(f"{url}/api/search", files=image, timeout=30)
            assert late.status_code == 503 and "longer than the 0.0001 s limit" in late.json()["error"]
        time.sleep(0.5)  # a decode already on a thread ends there; nothing after it runs
        text = httpx.get(f"{url}/metrics").text
    assert 'duch_queries_refused_total{reason="timeout"} 3.0' in text and "duch_queries_in_flight 0.0" in text
    assert 'duch_query_coder_batch_size_count{modality="image"}' not in text  # no image reached the encoder
