"""`duch serve` under hostile clients: id-query throughput and `/healthz` latency, quiet and while two clients send
JSON bodies of over 1 MB and two send TIFF bombs (a few hundred KB on the wire, hundreds of MB decoded), for the
service before and after a change, one after the other in the same run, on loopback only.

    python bench/serve_hostile.py --run runs/ucm --before ../before/cli.py     # ~3 minutes

Three services: the one before (--before), this checkout with its refusal rule off (--refusal-rate 0), and
this checkout as it is.

Each cell drives the service for --seconds; the hostile clients run in a process of their own, beside the measured
ones, for the whole cell, each from a loopback address of its own (127.0.0.2 to 127.0.0.5; the measured clients
from 127.0.0.1), as clients on a network have theirs.
The figure of merit is hostile / quiet for id q/s and `/healthz` p50 (the issue's target: within 20 %).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import save  # noqa: E402
from bench.serve_load import HOST, Server, drive, json_request, upload_request  # noqa: E402
from duch.pipeline.retrieval.search import Index  # noqa: E402


def tiff_bomb(side: int = 9000, samples: int = 8) -> bytes:
    """A deflated TIFF of zeros declaring side x side pixels of `samples` samples: ~side^2 * samples bytes decoded
    from a file a thousandth of that."""
    import tifffile

    out = io.BytesIO()
    zeros = np.zeros((side, side, samples), np.uint8)
    tifffile.imwrite(out, zeros, compression="zlib", photometric="minisblack", planarconfig="contig",
                     rowsperstrip=side)
    return out.getvalue()


def get_request(port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()


def hostile_clients(port: int, seconds: float, bomb: bytes, body: bytes) -> dict:
    """2 clients sending the JSON body and 2 uploading the bomb for `seconds` (run in a process of its own, so
    that building and sending them does not slow the measured clients' event loop)."""
    big = (f"POST /api/search HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    upload = upload_request(port, "b.tif", bomb, 20)

    async def both():  # each from an address of its own, as clients on a network are
        return await asyncio.gather(drive(port, lambda i: big, 2, seconds, ["127.0.0.2", "127.0.0.3"]),
                                    drive(port, lambda i: upload, 2, seconds, ["127.0.0.4", "127.0.0.5"]))

    cpu = time.process_time()
    json_row, bomb_row = asyncio.run(both())
    return {"big_json": json_row, "bomb": bomb_row, "hostile_cpu_s": round(time.process_time() - cpu, 2)}


async def measured(port: int, ids: list[str], seconds: float) -> dict:
    """Id queries (1 client) and /healthz (1 client) for `seconds`."""
    id_make = lambda i: json_request(port, {"id": ids[i % len(ids)], "k": 20, "modality": "image"})  # noqa: E731
    rows = await asyncio.gather(drive(port, id_make, 1, seconds),
                                drive(port, lambda i: get_request(port, "/healthz"), 1, seconds))
    return {"id": rows[0], "healthz": rows[1]}


def cell(port: int, ids: list[str], seconds: float, bomb: bytes | None, body: bytes | None) -> dict:
    if bomb is None or body is None:
        return asyncio.run(measured(port, ids, seconds))
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        hostile = pool.submit(hostile_clients, port, seconds + 1.0, bomb, body)
        time.sleep(1.0)  # the hostile clients under way before the measured ones start
        out = asyncio.run(measured(port, ids, seconds))
        out.update(hostile.result())
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a finished run (encode-archive), e.g. runs/ucm")
    parser.add_argument("--before", type=Path, help="another checkout's cli.py, measured first")
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json-mb", type=float, default=1.5, help="size of the hostile JSON bodies")
    args = parser.parse_args(argv)
    index = Index.load(args.run, bits=args.bits, verify=False)
    ids = [str(i) for i in index.tables["image"].meta["ids"][:500]]
    bomb = tiff_bomb()
    body = json.dumps({"text": "a", "label": [1] * int(args.json_mb * 2**20 / 3)}).encode()
    # name -> (cli.py, extra options); "after, no fairness": this checkout without its refusal rule
    clis = {**({"before": (args.before.resolve(), [])} if args.before else {}),
            "after, no fairness": (ROOT / "cli.py", ["--refusal-rate", "0"]), "after": (ROOT / "cli.py", [])}
    result = {"run": str(args.run), "seconds": args.seconds, "bomb_bytes": len(bomb), "json_bytes": len(body),
              "loadavg_start": os.getloadavg(), "servers": {}}
    print(f"bomb {len(bomb) / 1e3:.0f} KB on the wire (9000 x 9000 x 8 decoded: 648 MB), JSON {len(body) / 1e6:.1f} MB")
    print(f"{'server':<18} {'cell':<8} {'id q/s':>8} {'healthz p50 ms':>15} {'healthz p99 ms':>15} {'RSS MB':>8} "
          f"{'server cpu':>10} {'hostile cpu':>10} {'refused':>8} {'load':>5}")
    for j, (name, (cli, extra)) in enumerate(clis.items()):
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_hostile-{j}-{os.getpid()}.log"
        server = Server(args.run, args.bits, extra, log, cli=cli)
        try:
            cell(server.port, ids, 2.0, None, None)  # warm-up
            rows = {}
            for kind, hostile in (("quiet", False), ("hostile", True)):
                cpu = server.cpu_s()
                rows[kind] = cell(server.port, ids, args.seconds, bomb if hostile else None,
                                  body if hostile else None)
                rows[kind]["server_cpu_s"] = round(server.cpu_s() - cpu, 2)
                rows[kind]["rss_mb"] = round(server.rss_mb(), 1)
                rows[kind]["loadavg_1min"] = round(os.getloadavg()[0], 2)
                r = rows[kind]
                refused = (sum(r["big_json"]["status_other"].values()) + sum(r["bomb"]["status_other"].values())
                           if hostile else 0)
                print(f"{name:<18} {kind:<8} {r['id']['qps']:>8.1f} {r['healthz']['p50_ms']:>15.2f} "
                      f"{r['healthz']['p99_ms']:>15.2f} {r['rss_mb']:>8.1f} {r['server_cpu_s']:>10.2f} "
                      f"{r.get('hostile_cpu_s', 0):>10.2f} {refused:>8} {r['loadavg_1min']:>5.2f}", flush=True)
            rows["id_qps_ratio"] = round(rows["hostile"]["id"]["qps"] / max(rows["quiet"]["id"]["qps"], 1e-9), 3)
            rows["healthz_p50_ratio"] = round(rows["hostile"]["healthz"]["p50_ms"] /
                                              max(rows["quiet"]["healthz"]["p50_ms"], 1e-9), 3)
            print(f"{name}: hostile / quiet: id q/s x{rows['id_qps_ratio']}, healthz p50 x{rows['healthz_p50_ratio']}")
            result["servers"][name] = rows
        finally:
            server.stop()
    result["loadavg_end"] = os.getloadavg()
    path = save("serve_hostile", result)
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
