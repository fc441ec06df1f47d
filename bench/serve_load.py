"""Load on `duch serve`: 1, 4, 16 and 64 concurrent clients sending caption, id and image queries for a fixed time,
on loopback only; queries/s, p50/p95/p99 latency, errors, 503s, the server's CPU per query, and its RSS before
and after a soak of mixed queries; side by side in the same run, the CLI doing the same queries one process each,
and servers with other settings (captions one by one and images in batches; one torch thread).

    python bench/serve_load.py --run runs/ucm                     # 64 bits, 10 s a cell, 60 s soak (~5 minutes)
    python bench/serve_load.py --run runs/ucm --seconds 3 --soak 10 --cli 1 --clients 1,16

The server is `duch serve` (this checkout's cli.py) in its own process on 127.0.0.1; the clients are asyncio
coroutines in this process, each on one keep-alive HTTP/1.1 connection written and read directly (a plain client
costs the shared CPU less than an HTTP library would). A client that gets a 503 waits as Retry-After asks (at
most 1 s) and goes on; every count is bounded by --seconds. Each query asks for k=20 hits, as the page does (24).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "duch" not in sys.modules:  # this checkout's duch, as its cli.py runs it, whatever is installed
    import types

    sys.modules["duch"] = types.ModuleType("duch")
    sys.modules["duch"].__path__ = [str(ROOT)]

from bench.common import save  # noqa: E402
from duch.pipeline.retrieval.search import Index  # noqa: E402

HOST = "127.0.0.1"  # loopback only, whatever the arguments
CAPTIONS = [
    "many planes parked at the airport", "a river crossing farmland", "a baseball field next to a parking lot",
    "dense residential area with many houses", "boats docked in a harbor", "a freeway with cars",
    "green trees in a forest", "a golf course with sand bunkers", "storage tanks near a road",
    "tennis courts surrounded by trees", "an overpass over a highway", "white waves on a sandy beach",
    "a mobile home park", "a large building with a parking lot", "an intersection of two roads",
    "farmland with straight lines of crops", "a chaparral covered hillside", "sparse houses among lawns",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def json_request(port: int, payload: dict) -> bytes:
    body = json.dumps(payload).encode()
    return (f"POST /api/search HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def upload_request(port: int, name: str, data: bytes, k: int) -> bytes:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return (f"POST /api/search HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection; the service answers with a Content-Length, never chunked."""

    def __init__(self, port: int, source: str | None = None):
        self.port, self.source, self.reader, self.writer = port, source, None, None

    async def request(self, raw: bytes) -> tuple[int, dict, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                HOST, self.port, local_addr=(self.source, 0) if self.source else None)
        self.writer.write(raw)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = dict((k.lower(), v.strip()) for k, v in (line.split(":", 1) for line in head[1:] if line))
        if "content-length" not in headers:
            raise RuntimeError(f"an answer without Content-Length: {head[0]}")
        body = await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(head[0].split()[1]), headers, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def drive(port: int, make, clients: int, seconds: float, sources: list[str] | None = None) -> dict:
    """`clients` clients sending make(i) for `seconds`: counts and the latencies of the answered queries. Client c
    connects from loopback address sources[c] (default: the system's choice, 127.0.0.1)."""
    latencies, statuses, errors = [], Counter(), Counter()
    stop = time.perf_counter() + seconds

    async def client(first: int):
        conn, i = Connection(port, sources[first] if sources else None), first
        while time.perf_counter() < stop:
            raw, i = make(i), i + clients
            start = time.perf_counter()
            try:
                status, headers, body = await conn.request(raw)
            except (OSError, asyncio.IncompleteReadError, RuntimeError) as e:
                errors[type(e).__name__] += 1
                conn.close()
                await asyncio.sleep(0.05)
                continue
            statuses[status] += 1
            if status == 200:
                latencies.append(time.perf_counter() - start)
                if b'"hits":[{' not in body:
                    errors["no hits"] += 1
            elif status == 503:
                await asyncio.sleep(min(float(headers.get("retry-after", 1)), 1.0))
        conn.close()

    began = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.perf_counter() - began
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return {"clients": clients, "seconds": round(elapsed, 2), "ok": statuses[200],
            "qps": round(statuses[200] / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "status_503": statuses[503],
            "status_5xx_other": sum(n for s, n in statuses.items() if s >= 500 and s != 503),
            "status_other": {str(s): n for s, n in statuses.items() if s not in (200, 503)},
            "errors": dict(errors)}


class Server:
    """`duch serve` in its own process, on loopback."""

    def __init__(self, run: str, bits: int, extra: list[str], log: Path, cli: Path = ROOT / "cli.py"):
        import psutil

        self.port = free_port()
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, str(cli), "serve", "--run", run, "--bits", str(bits),
                                      "--host", HOST, "--port", str(self.port), *extra],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 300
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"duch serve did not start; see {log}") from None
                time.sleep(0.25)

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def sample_queries(index: Index) -> tuple[list[str], list[tuple[str, bytes]]]:
    """500 archive ids and 32 archive images (name, bytes), drawn with a fixed seed."""
    meta = index.tables["image"].meta
    rng = np.random.default_rng(0)
    ids = [str(meta["ids"][r]) for r in rng.permutation(len(meta["ids"]))[:500]]
    tiles = [(Path(str(meta["path"][r])).name, (index.images_dir / str(meta["path"][r])).read_bytes())
             for r in rng.permutation(len(meta["ids"]))[:32]]
    return ids, tiles


def query_makers(port: int, ids: list[str], tiles: list[tuple[str, bytes]], k: int) -> dict:
    """kind -> make(i): the i-th query of that kind as raw HTTP."""
    return {
        "caption": lambda i: json_request(port, {"text": CAPTIONS[i % len(CAPTIONS)], "k": k}),
        "id": lambda i: json_request(port, {"id": ids[i % len(ids)], "k": k, "modality": "image"}),
        "image": lambda i: upload_request(port, *tiles[i % len(tiles)], k),
    }


def measure(server: Server, make, clients: int, seconds: float) -> dict:
    cpu = server.cpu_s()
    row = asyncio.run(drive(server.port, make, clients, seconds))
    row["server_cpu_ms_per_query"] = round(1000 * (server.cpu_s() - cpu) / max(row["ok"], 1), 2)
    row["loadavg_1min"] = round(os.getloadavg()[0], 2)
    return row


def cli_query(run: str, bits: int, args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "search", "--run", run, "--bits", str(bits), "--json",
                    "-k", "20", *args], check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a finished run (encode-archive), e.g. runs/ucm")
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--seconds", type=float, default=10.0, help="per cell (kind x clients)")
    parser.add_argument("--soak", type=float, default=60.0, help="seconds of mixed queries, 16 clients")
    parser.add_argument("--cli", type=int, default=3, help="CLI processes timed per kind (0: none)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--label", default="", help="in the result file's name: serve_load-LABEL-...")
    parser.add_argument("--serve-cli", type=Path, default=ROOT / "cli.py",
                        help="the cli.py whose `duch serve` is measured (another checkout's, for a before/after)")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]

    index = Index.load(args.run, bits=args.bits, verify=False)  # the archive's ids and image files
    meta = index.tables["image"].meta
    ids, tiles = sample_queries(index)
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_load-{os.getpid()}.log"
    server = Server(args.run, args.bits, [], log, cli=args.serve_cli)
    port, k = server.port, args.k
    makers = query_makers(port, ids, tiles, k)
    result = {"run": str(args.run), "serve_cli": str(args.serve_cli), "bits": args.bits, "k": k,
              "seconds_per_cell": args.seconds,
              "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "cells": [], "server_log": str(log)}
    try:
        for make in makers.values():  # warm-up: first passes, thumbnails of nothing, page cache
            asyncio.run(drive(port, make, 4, 2.0))
        print(f"{'kind':<8} {'clients':>7} {'q/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'503':>6} "
              f"{'5xx':>4} {'err':>4} {'cpu ms/q':>8} {'load':>5}")
        for kind, make in makers.items():
            for n in clients:
                row = {"kind": kind, **measure(server, make, n, args.seconds)}
                result["cells"].append(row)
                print(f"{kind:<8} {n:>7} {row['qps']:>8.1f} {row['p50_ms']:>8.1f} {row['p95_ms']:>8.1f} "
                      f"{row['p99_ms']:>8.1f} {row['status_503']:>6} {row['status_5xx_other']:>4} "
                      f"{sum(row['errors'].values()):>4} {row['server_cpu_ms_per_query']:>8.2f} "
                      f"{row['loadavg_1min']:>5.2f}", flush=True)
        if args.soak:
            kinds = list(makers.values())
            before = server.rss_mb()
            soak = measure(server, lambda i: kinds[i % 3](i // 3), 16, args.soak)
            after = server.rss_mb()
            result["soak"] = {**soak, "rss_mb_before": round(before, 1), "rss_mb_after": round(after, 1),
                              "rss_growth_pct": round(100 * (after - before) / before, 2)}
            print(f"soak {args.soak:g} s, 16 clients, mixed: {soak['qps']:.1f} q/s, p99 {soak['p99_ms']:.1f} ms, "
                  f"RSS {before:.1f} -> {after:.1f} MB ({result['soak']['rss_growth_pct']:+.2f}%)", flush=True)
    finally:
        server.stop()
    if 16 in clients:  # the 1- and 16-client cells on servers with other settings, one after the other
        variants = {"max-batch 1, max-image-batch 64": ["--max-batch", "1", "--max-image-batch", "64"],
                    "threads 1": ["--threads", "1"]}
        result["variants"] = {}
        for j, (name, extra) in enumerate(variants.items()):
            other = Server(args.run, args.bits, extra, log.with_suffix(f".variant{j}.log"), cli=args.serve_cli)
            result["variants"][name] = {}
            try:
                for kind, make in (("caption", lambda i, other=other: json_request(other.port, {
                        "text": CAPTIONS[i % len(CAPTIONS)], "k": k})),
                        ("image", lambda i, other=other: upload_request(other.port, *tiles[i % len(tiles)], k))):
                    asyncio.run(drive(other.port, make, 4, 2.0))
                    for n in [c for c in (1, 16) if c in clients]:
                        row = result["variants"][name][f"{kind}-{n}"] = measure(other, make, n, args.seconds)
                        print(f"{kind}, {n} clients, {name}: {row['qps']:.1f} q/s, p50 {row['p50_ms']:.1f} ms, p99 "
                              f"{row['p99_ms']:.1f} ms (server cpu {row['server_cpu_ms_per_query']:.2f} ms/q, load "
                              f"{row['loadavg_1min']})", flush=True)
            finally:
                other.stop()
    if args.cli:  # one process per query: load the codes, the heads and the encoder, answer, exit
        queries = {"caption": [["--text", c] for c in CAPTIONS[:args.cli]],
                   "id": [["--id", i, "--modality", "image"] for i in ids[:args.cli]],
                   "image": [["--image", str(index.images_dir / str(meta["path"][meta["ids"] == i][0]))]
                             for i in ids[:args.cli]]}
        result["cli"] = {}
        for kind, argvs in queries.items():
            times = [cli_query(args.run, args.bits, a) for a in argvs]
            median = float(np.median(times))
            result["cli"][kind] = {"queries": len(times), "median_s": round(median, 2), "qps": round(1 / median, 2)}
            print(f"CLI, one process per {kind} query: {median:.2f} s median ({1 / median:.2f} q/s)", flush=True)
    result["loadavg_end"] = os.getloadavg()
    path = save("serve_load" + (f"-{args.label}" if args.label else ""), result)
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
