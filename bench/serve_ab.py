"""`duch serve` of two checkouts side by side: bench/serve_load.py's cells (caption, id and image queries at 1 and 16
clients) for a service before a change and after it, alternated and repeated, so that both see the same machine;
the median of the repeats per cell, and after / before.

    python bench/serve_ab.py --run runs/ucm --before ../before/cli.py --seconds 10 --repeats 3   # ~8 minutes

Each repeat starts each service afresh (before, then after; the next repeat after, then before, so that neither is
always first), warms it for 2 s a kind, then measures every cell for --seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import save  # noqa: E402
from bench.serve_load import Server, drive, measure, query_makers, sample_queries  # noqa: E402
from duch.pipeline.retrieval.search import Index  # noqa: E402


def one_service(run: str, bits: int, cli: Path, ids, tiles, k: int, clients: list[int], seconds: float,
                log: Path) -> list[dict]:
    server = Server(run, bits, [], log, cli=cli)
    try:
        makers = query_makers(server.port, ids, tiles, k)
        for make in makers.values():
            asyncio.run(drive(server.port, make, 4, 2.0))
        return [{"kind": kind, **measure(server, make, n, seconds)} for kind, make in makers.items() for n in clients]
    finally:
        server.stop()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a finished run (encode-archive), e.g. runs/ucm")
    parser.add_argument("--before", type=Path, required=True, help="the other checkout's cli.py")
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--seconds", type=float, default=10.0, help="per cell")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    ids, tiles = sample_queries(Index.load(args.run, bits=args.bits, verify=False))
    clis = {"before": args.before.resolve(), "after": ROOT / "cli.py"}
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_ab-{os.getpid()}.log"
    result = {"run": str(args.run), "clis": {k: str(v) for k, v in clis.items()}, "bits": args.bits,
              "seconds_per_cell": args.seconds, "repeats": args.repeats, "loadavg_start": os.getloadavg(),
              "rounds": []}
    for r in range(args.repeats):
        order = list(clis) if r % 2 == 0 else list(reversed(clis))
        for name in order:
            rows = one_service(args.run, args.bits, clis[name], ids, tiles, args.k, clients, args.seconds, log)
            result["rounds"].append({"repeat": r, "service": name, "cells": rows})
            print(f"repeat {r} {name:<6} " + "  ".join(f"{row['kind']}@{row['clients']} {row['qps']:.1f}"
                                                       for row in rows), flush=True)
    summary = {}
    print(f"{'kind':<8} {'clients':>7} {'before q/s':>11} {'after q/s':>10} {'after/before':>12} "
          f"{'before p50':>10} {'after p50':>9}")
    for kind in ("caption", "id", "image"):
        for n in clients:
            cell = {}
            for name in clis:
                rows = [row for rnd in result["rounds"] if rnd["service"] == name for row in rnd["cells"]
                        if row["kind"] == kind and row["clients"] == n]
                qps = [row["qps"] for row in rows]
                cell[name] = {"qps": qps, "qps_median": float(np.median(qps)),
                              "p50_median_ms": float(np.median([row["p50_ms"] for row in rows])),
                              "cpu_ms_per_query_median": float(np.median([row["server_cpu_ms_per_query"]
                                                                          for row in rows]))}
            cell["ratio"] = round(cell["after"]["qps_median"] / cell["before"]["qps_median"], 3)
            summary[f"{kind}@{n}"] = cell
            print(f"{kind:<8} {n:>7} {cell['before']['qps_median']:>11.1f} {cell['after']['qps_median']:>10.1f} "
                  f"{cell['ratio']:>12.3f} {cell['before']['p50_median_ms']:>10.2f} "
                  f"{cell['after']['p50_median_ms']:>9.2f}")
    result["summary"] = summary
    result["loadavg_end"] = os.getloadavg()
    path = save("serve_ab", result)
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
