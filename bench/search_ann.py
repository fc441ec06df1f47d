"""Approximate faiss indexes (`encode-archive --index ivf|hnsw`) against the exact scan: recall@10 and speed.

    python bench/search_ann.py                   # 1M clustered 64-bit codes, 1000 queries
    python bench/search_ann.py --n 100000        # quicker

Codes are clustered like real hash codes (random centres, each bit flipped with --flip probability), since on
uniformly random codes no index can beat a scan. Recall@10 counts a returned item as right when its distance is
within the exact 10th distance (so ties at the boundary are not penalised). Build time, queries/s (all threads) and
index size are reported side by side with the exact IndexBinaryFlat.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import save  # noqa: E402
from duch.pipeline.formats import faiss_index  # noqa: E402
from duch.pipeline.retrieval.hamming import hamming_topk  # noqa: E402


def clustered(n: int, bits: int, centres: int, flip: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centre_bits = rng.integers(0, 2, (centres, bits), dtype=np.uint8)
    out = np.empty((n, bits // 8), np.uint8)
    for s in range(0, n, 1 << 18):
        m = min(n, s + (1 << 18)) - s
        b = centre_bits[rng.integers(0, centres, m)] ^ (rng.random((m, bits)) < flip).astype(np.uint8)
        out[s:s + m] = np.packbits(b, axis=1)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--flip", type=float, default=0.1)
    args = parser.parse_args(argv)
    db = clustered(args.n, args.bits, max(10, args.n // 1000), args.flip, 0)
    queries = clustered(args.queries, args.bits, max(10, args.n // 1000), args.flip, 0)  # same centres
    exact_d, _ = hamming_topk(queries, db, args.k)
    kth = exact_d[:, -1:]
    rows = []
    for kind, settings in (("flat", [None]), ("ivf", [1, 4, 16, 64]), ("hnsw", [16, 64, 256])):
        t = time.perf_counter()
        index = faiss_index.build(db, kind)
        build_s = time.perf_counter() - t
        for setting in settings:
            if kind == "ivf":
                index.nprobe = setting
            elif kind == "hnsw":
                index.hnsw.efSearch = setting
            t = time.perf_counter()
            d, found = index.search(queries, args.k)
            seconds = time.perf_counter() - t
            recall = float(((d <= kth) & (found >= 0)).sum() / (len(queries) * args.k))
            rows.append({"index": kind, "setting": {"ivf": "nprobe", "hnsw": "efSearch"}.get(kind, "-")
                         + (f"={setting}" if setting else ""), "build_s": round(build_s, 2),
                         "queries_per_s": round(args.queries / seconds), f"recall@{args.k}": round(recall, 4)})
            print(rows[-1], flush=True)
    print(f"\n{args.n:,} clustered {args.bits}-bit codes, {args.queries} queries, {os.cpu_count()} threads")
    print(f"{'index':<8}{'setting':<16}{'build s':>10}{'queries/s':>12}{'recall@' + str(args.k):>12}")
    for r in rows:
        print(f"{r['index']:<8}{r['setting']:<16}{r['build_s']:>10}{r['queries_per_s']:>12}{r[f'recall@{args.k}']:>12}")
    path = save("search_ann", {"n": args.n, "bits": args.bits, "queries": args.queries, "flip": args.flip,
                               "rows": rows})
    print(f"saved {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
