"""`duch export` at archive scale: rows/s and peak memory of the Parquet and PostgreSQL exports, then a Hamming
top-10 over the exported rows in DuckDB and in PostgreSQL beside duch's own search, all in one run.

    python bench/export_speed.py                        # 100k and 1M tiles
    python bench/export_speed.py --sizes 100000 --queries 5

The archive: a synthetic extract run of N scene tiles (random 16-d embeddings; footprints on a 0.001-degree grid,
bench/synthetic.py) coded at 64 bits by a real model (train-hash on 2000 synthetic items, one epoch) through the
real encode-archive stage. Each export runs in this process after resetting the peak RSS (VmHWM): "peak MB" is
the export's own peak over what the process held before (the PostgreSQL server's memory is not counted). The
server is Debian's PostgreSQL 15 with PostGIS in a temporary cluster (tests/pgkit.py; fsync off).

Queries: --queries archive items' own codes, top-10, equal distances in archive order; duch: Index.search(id=...,
ties="order") (numpy scan of the memory-mapped codes, and faiss' flat index where installed, each timed); DuckDB:
read_parquet, bit_count(xor(code_int, q)); PostgreSQL: bit_count(code # q) over bit(64). Answers are checked equal
(ids and distances) before they are timed; latency is the median of the queries, each run after one warm-up.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
_links = Path(tempfile.mkdtemp(prefix="duch-checkout-"))  # `duch` is this checkout, installed or not
(_links / "duch").symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
sys.path.insert(0, str(_links))

from bench.common import log, reset_peak_rss, rss_mb, save  # noqa: E402
from bench.synthetic import make_extract_run  # noqa: E402
from duch.pipeline.config import EncodeConfig, TrainConfig  # noqa: E402
from duch.pipeline.config.export import ExportConfig  # noqa: E402
from duch.pipeline.export.columns import bit_strings, code_ints  # noqa: E402
from duch.pipeline.retrieval.search import Index  # noqa: E402
from duch.stages.encode_archive import encode_archive  # noqa: E402
from duch.stages.export import export  # noqa: E402
from duch.stages.train_hash import train_hash  # noqa: E402
from tests import pgkit  # noqa: E402

BITS = 64
K = 10


def quiet(_):
    pass


def make_model(scratch: Path) -> Path:
    model = scratch / "model"
    if not (model / "train-hash" / "manifest.json").exists():
        make_extract_run(model, 2000, dim=16, captions=2, views=2)
        train_hash(TrainConfig(run=str(model), bits=(BITS,), epochs=1, hidden=256, split="all", device="cpu"),
                   progress=False, echo=quiet)
    return model


def make_archive(scratch: Path, n: int, model: Path) -> Path:
    """The N-tile archive (kept in --scratch: made once, by --prepare-only outside the bench lock)."""
    run = scratch / f"tiles-{n}"
    if (run / "encode-archive" / "manifest.json").exists():
        return run
    make_extract_run(run, n, dim=16, shard_size=65536, places=True, seed=1)
    encode_archive(EncodeConfig(run=str(model), archive=str(run), device="cpu"), progress=False, echo=quiet)
    return run


def measured(fn) -> tuple[dict, float, float]:
    """(result, seconds, peak MB over the RSS before) of fn()."""
    before = rss_mb()
    reset_peak_rss()
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t, rss_mb("VmHWM:") - before


def latency(fn, items: list) -> tuple[float, list]:
    fn(items[0])
    times, answers = [], []
    for item in items:
        t = time.perf_counter()
        answers.append(fn(item))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000, answers


def measure(scratch: Path, n: int, model: Path, url: str, queries: int) -> dict:
    import duckdb
    import psycopg

    run = make_archive(scratch, n, model)
    log(f"{n} tiles")
    file = scratch / f"tiles-{n}.parquet"
    table = f"tiles_{n}"
    _, pq_s, pq_mb = measured(lambda: export(ExportConfig(run=str(run), bits=BITS, to=str(file), verify=False),
                                             echo=quiet))
    _, pg_s, pg_mb = measured(lambda: export(ExportConfig(run=str(run), bits=BITS, to=url, table=table,
                                                          verify=False), echo=quiet))
    log(f"  parquet: {n / pq_s:,.0f} rows/s ({pq_s:.1f} s), peak +{pq_mb:.0f} MB, {file.stat().st_size / 1e6:.0f} MB")
    log(f"  postgresql: {n / pg_s:,.0f} rows/s ({pg_s:.1f} s), peak +{pg_mb:.0f} MB")
    index = Index.load(run, bits=BITS, device="cpu", verify=False)
    ids = [str(index.tables["image"].meta["ids"][i]) for i in range(0, n, max(1, n // queries))][:queries]
    codes = {i: index.id_query(i).packed for i in ids}
    db = duckdb.connect()
    duck_sql = (f"SELECT id, bit_count(xor(code_int, ?::UBIGINT)) AS d FROM read_parquet('{file}') "
                f"ORDER BY d, archive_row LIMIT {K}")
    pg_sql = (f"SELECT id, bit_count(code # %s::bit({BITS})) AS d FROM {table} "
              f"ORDER BY d, archive_row LIMIT {K}")
    with psycopg.connect(url) as conn:
        routes = {
            "duch numpy": lambda i: [(h.id, h.distance) for h in index.search(id=i, k=K, ties="order")],
            "duckdb": lambda i: [(r, int(d)) for r, d in
                                 db.execute(duck_sql, [int(code_ints(codes[i])[0])]).fetchall()],
            "postgresql": lambda i: [(r, int(d)) for r, d in
                                     conn.execute(pg_sql, (bit_strings(codes[i])[0],)).fetchall()],
        }
        index.backend = "numpy"
        timings, answers = {}, {}
        for name, fn in routes.items():
            timings[name], answers[name] = latency(fn, ids)
        index.backend = "auto"
        timings["duch faiss"], answers["duch faiss"] = latency(routes["duch numpy"], ids)
    agree = {name: a == answers["duch numpy"] for name, a in answers.items()}
    log(f"  top-10 ms (median of {len(ids)}): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
        + f"; equal to duch: {agree}")
    out = {"items": n, "parquet": {"rows_per_s": n / pq_s, "seconds": pq_s, "peak_mb": pq_mb,
                                   "file_mb": file.stat().st_size / 1e6},
           "postgresql": {"rows_per_s": n / pg_s, "seconds": pg_s, "peak_mb": pg_mb},
           "top10_ms": timings, "answers_equal": agree, "queries": len(ids)}
    file.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--scratch", default=None, help="Folder for the runs, kept [default: a temporary one].")
    ap.add_argument("--prepare-only", action="store_true",
                    help="Make the model and archives in --scratch and stop (no timing: run it outside the lock).")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="duch-export-bench-"))
    results = []
    import psycopg  # noqa: F401  (imported, and the CRS database read, before any peak is measured)

    from duch.pipeline.export.parquet_file import geo_metadata
    geo_metadata(None)
    try:
        model = make_model(scratch)
        if args.prepare_only:
            for n in sizes:
                t = time.perf_counter()
                make_archive(scratch, n, model)
                log(f"{n} tiles: synthetic archive made in {time.perf_counter() - t:.0f} s")
            return
        with pgkit.server() as url:
            for n in sizes:
                results.append(measure(scratch, n, model, url, args.queries))
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{'items':>9} {'parquet rows/s':>15} {'MB':>5} {'pg rows/s':>10} {'MB':>5}  top-10 ms: "
          + "  ".join(results[0]["top10_ms"]) if results else "")
    for r in results:
        print(f"{r['items']:>9} {r['parquet']['rows_per_s']:>15,.0f} {r['parquet']['peak_mb']:>5.0f} "
              f"{r['postgresql']['rows_per_s']:>10,.0f} {r['postgresql']['peak_mb']:>5.0f}  "
              + "  ".join(f"{v:.1f}" for v in r["top10_ms"].values()))
    path = save("export_speed", {"bits": BITS, "k": K, "results": results,
                                 "note": "shared 2-core CPU (cpu2), other sessions' work running"})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
