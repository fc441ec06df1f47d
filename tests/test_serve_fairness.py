"""Fairness between clients (issue 31): an address whose requests keep being refused is held to a few a second,
others are served as before; one address holds at most its share of the admission slots. The bucket arithmetic
pinned on a given clock, the service on a real uvicorn server on 127.0.0.1, the abusive client sending from
another loopback address (127.0.0.2)."""
import asyncio
import shutil
import socket
from pathlib import Path

import httpx
import pytest

from duch.pipeline import DuchError
from duch.pipeline.config import ServeConfig
from duch.pipeline.serve import fairness
from duch.pipeline.serve.admission import Admission, Overloaded
from duch.pipeline.serve.app import create_app
from duch.pipeline.serve.fairness import MOST_WAITING, RefusalBuckets

from .serving import running

ROOT = Path(__file__).resolve().parents[1]
ABUSER = "127.0.0.2"  # the whole of 127.0.0.0/8 is loopback: another client address on this machine


def test_a_bucket_gives_its_burst_then_its_rate_and_debt_makes_the_wait_longer():
    now = [100.0]
    buckets = RefusalBuckets(burst=3, rate=2.0, clock=lambda: now[0])
    assert buckets.wait("a") == 0.0
    for _ in range(3):
        buckets.refused("a")
    assert buckets.wait("a") == pytest.approx(0.5) and buckets.wait("b") == 0.0  # empty: one token in 0.5 s
    now[0] += 0.5
    assert buckets.wait("a") == 0.0
    for _ in range(4):  # four at once, e.g. four connections: into debt
        buckets.refused("a")
    assert buckets.tokens("a") == pytest.approx(-3.0) and buckets.wait("a") == pytest.approx(2.0)
    for _ in range(10):
        buckets.refused("a")
    assert buckets.tokens("a") == pytest.approx(-3.0)  # never deeper than the burst
    now[0] += 10.0
    assert buckets.tokens("a") == 3.0 and buckets.wait("a") == 0.0  # refilled, never past the burst
    buckets.forget()
    assert buckets.buckets == {}
    off = RefusalBuckets(burst=1, rate=0.0, clock=lambda: now[0])
    for _ in range(5):
        off.refused("a")
    assert off.wait("a") == 0.0 and off.buckets == {}


def test_the_addresses_remembered_stay_bounded_however_many_are_in_debt(monkeypatch):
    monkeypatch.setattr(fairness, "MOST_ADDRESSES", 10)
    buckets = RefusalBuckets(burst=1, rate=0.001, clock=lambda: 0.0)
    for i in range(25):
        buckets.refused(f"10.0.0.{i}")
        assert len(buckets.buckets) <= 10
    assert "10.0.0.24" in buckets.buckets and "10.0.0.0" not in buckets.buckets  # the oldest forgotten first


def test_refusal_settings_are_checked():
    with pytest.raises(DuchError, match="`refusal_rate` must be 0"):
        ServeConfig(run="r", refusal_rate=-1).validate()
    with pytest.raises(DuchError, match="`refusal_burst` must be at least 1"):
        ServeConfig(run="r", refusal_burst=0).validate()


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def raw_post(port: int, body: bytes) -> bytes:
    return (f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_an_address_that_keeps_being_refused_is_held_and_others_are_served(tmp_path, encoded_run):
    run = tmp_path / "run"
    shutil.copytree(encoded_run, run)
    # Two refusals, then one every 100 s: the third request waits far longer than any client here.
    config = ServeConfig(run=str(run), bits=16, device="cpu", refusal_burst=2, refusal_rate=0.01)
    abuser = httpx.Client(transport=httpx.HTTPTransport(local_address=ABUSER), timeout=30)
    with running(create_app(config)) as url, abuser:
        port = int(url.rsplit(":", 1)[1])
        bomb = {"image": ("bomb.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 100)}  # not an image: a 400
        for _ in range(2):
            assert abuser.post(f"{url}/api/search", files=bomb).status_code == 400
        with pytest.raises(httpx.ReadTimeout):  # held: its bucket refills in 100 s
            abuser.get(f"{url}/healthz", timeout=1.0)
        # Another address is served at once, valid or not, and refused requests of its own count for it alone.
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.post(f"{url}/api/search", json={"text": "a harbor", "k": 3}).status_code == 200
        assert httpx.post(f"{url}/api/search", files=bomb).status_code == 400
        assert httpx.get(f"{url}/healthz").status_code == 200
        # Many connections at once buy nothing: past MOST_WAITING held requests, a 429 at once.
        held = []
        for _ in range(MOST_WAITING):
            sock = socket.create_connection(("127.0.0.1", port), source_address=(ABUSER, 0))
            sock.sendall(raw_post(port, b'{"text": "a"}'))
            held.append(sock)
        try:
            for _ in range(300):  # until all are held (the held count is the server's, not a clock's)
                if metric(url, "duch_requests_held_total") >= 1 + MOST_WAITING:
                    break
            assert metric(url, "duch_requests_held_total") >= 1 + MOST_WAITING
            extra = socket.create_connection(("127.0.0.1", port), source_address=(ABUSER, 0))
            extra.settimeout(10)
            extra.sendall(raw_post(port, b'{"text": "a"}'))
            answer = extra.recv(65536)
            extra.close()
            assert answer.startswith(b"HTTP/1.1 429") and b"too many refused requests from 127.0.0.2" in answer
            assert b"retry-after: " in answer.lower()
            assert metric(url, "duch_requests_turned_away_total") == 1.0
        finally:
            for sock in held:
                sock.close()
        assert httpx.get(f"{url}/healthz").status_code == 200


def test_one_client_holds_at_most_its_share_of_the_admission_slots():
    async def scenario():
        admission = Admission(limit=4, timeout=5, per_client=2)
        gate = asyncio.Event()

        async def held():
            await gate.wait()
            return "done"

        mine = [asyncio.ensure_future(admission.run(held, "10.0.0.1")) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="10.0.0.1 has 2 queries in flight") as refused:
            await admission.run(held, "10.0.0.1")
        assert refused.value.reason == "client" and refused.value.retry_after >= 1
        theirs = [asyncio.ensure_future(admission.run(held, "10.0.0.2")) for _ in range(2)]  # another address
        await asyncio.sleep(0)
        assert admission.in_flight == 4 and admission.clients == {"10.0.0.1": 2, "10.0.0.2": 2}
        gate.set()
        assert await asyncio.gather(*mine, *theirs) == ["done"] * 4
        assert admission.in_flight == 0 and admission.clients == {}  # no address kept once it has none in flight
        assert await admission.run(held, "10.0.0.1") == "done"

    asyncio.run(scenario())


def test_the_per_client_share_defaults_to_half_the_slots_and_is_checked():
    assert ServeConfig(run="r").per_client == 16 and ServeConfig(run="r", max_in_flight=1).per_client == 1
    assert ServeConfig(run="r", max_per_client=32).per_client == 32
    with pytest.raises(DuchError, match="`max_per_client` must be 1 to `max_in_flight` \\(32\\), got 33"):
        ServeConfig(run="r", max_per_client=33).validate()
