"""Search latency: one query (and a batch) over N random packed codes, exact top-k by Hamming distance.

    python bench/search_latency.py                    # 1M x 64-bit codes, k = 10
    python bench/search_latency.py --n 10000000 --bits 64,128

Side by side in one process, median of --repeats runs after a warm-up: duch's numpy scan over codes in memory
and over a memory-mapped code file (what `search` does on CPU), faiss IndexBinaryFlat when faiss is installed,
and the torch scan on a GPU when there is one. Results are checked equal (distances) before timing. `*_adaptive_*`:
the same scans under `search`'s default query-adaptive ties (pipeline.search.adaptive_topk: a 256-item first scan,
rescans while the k-th distance goes on, the candidates' codes unpacked and weighted by the query's confidence).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import save  # noqa: E402
from duch.pipeline.formats.codes import CodeWriter, open_codes  # noqa: E402
from duch.pipeline.model.coding import unpack_codes  # noqa: E402
from duch.pipeline.retrieval.hamming import hamming_topk, hamming_topk_torch, to_int64_words  # noqa: E402
from duch.pipeline.retrieval.ranking import adaptive_topk  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, lazy initialisation
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def mapped_1q_ms(path: Path, one: np.ndarray, k: int, expected: np.ndarray, repeats: int) -> float:
    """One query's scan over the codes memory-mapped from `path`; the map is closed when this returns."""
    mapped = open_codes(path, with_meta=False)[1]["image"].codes
    assert isinstance(mapped, np.memmap) and (hamming_topk(one, mapped, k)[0] == expected).all()
    return median_ms(lambda: hamming_topk(one, mapped, k), repeats)


def bench_bits(n: int, bits: int, k: int, batch: int, repeats: int, threads: int) -> dict:
    rng = np.random.default_rng(bits)
    db = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
    one, many = db[:1].copy(), rng.integers(0, 256, (batch, bits // 8), dtype=np.uint8)
    row = {"n": n, "bits": bits, "k": k, "batch": batch}
    expected = hamming_topk(one, db, k)[0]
    # The query's continuous code: item 0's bits, with confidences in (0.05, 1).
    h = unpack_codes(one, bits)[0] * rng.uniform(0.05, 1.0, bits).astype(np.float32)
    row["numpy_1q_ms"] = median_ms(lambda: hamming_topk(one, db, k), repeats)
    numpy_scan = lambda n: tuple(a[0] for a in hamming_topk(one, db, n))  # noqa: E731
    assert (adaptive_topk(numpy_scan, db, h, k)[0] == expected[0]).all()
    row["numpy_adaptive_1q_ms"] = median_ms(lambda: adaptive_topk(numpy_scan, db, h, k), repeats)
    row["numpy_batch_qps"] = batch / (median_ms(lambda: hamming_topk(many, db, k), max(3, repeats // 2)) / 1000)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "codes.h5"
        writer = CodeWriter(path, bits, {"image": n}, continuous=False, attrs={})
        for s in range(0, n, 1 << 20):
            part = db[s:s + (1 << 20)]
            writer.append("image", {"codes": part, "ids": np.arange(s, s + len(part)).astype(str),
                                    "path": [""] * len(part), "label": [""] * len(part)})
        writer.close()
        row["numpy_mmap_1q_ms"] = mapped_1q_ms(path, one, k, expected, repeats)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
        index = faiss.IndexBinaryFlat(bits)
        index.add(db)
        assert (index.search(one, k)[0] == expected).all()
        row["faiss_1q_ms"] = median_ms(lambda: index.search(one, k), repeats)
        faiss_scan = lambda n: tuple(a[0] for a in index.search(one, n))  # noqa: E731
        row["faiss_adaptive_1q_ms"] = median_ms(lambda: adaptive_topk(faiss_scan, db, h, k), repeats)
        row["faiss_batch_qps"] = batch / (median_ms(lambda: index.search(many, k), max(3, repeats // 2)) / 1000)
        row["numpy_vs_faiss_1q"] = row["faiss_1q_ms"] / row["numpy_1q_ms"]
    except ImportError:
        pass
    if torch.cuda.is_available():
        dev_db = to_int64_words(db, "cuda")
        q1, qn = to_int64_words(one, "cuda"), to_int64_words(many, "cuda")
        assert (hamming_topk_torch(q1, dev_db, k)[0].cpu().numpy() == expected).all()

        def gpu(q):
            hamming_topk_torch(q, dev_db, k)
            torch.cuda.synchronize()

        row["torch_gpu_1q_ms"] = median_ms(lambda: gpu(q1), repeats)
        row["torch_gpu_batch_qps"] = batch / (median_ms(lambda: gpu(qn), max(3, repeats // 2)) / 1000)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--bits", default="64")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100, help="queries in the batched measurement")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    import os

    threads = os.cpu_count() or 1
    rows = [bench_bits(args.n, int(b), args.k, args.batch, args.repeats, threads) for b in args.bits.split(",")]
    keys = [k for k in rows[0] if k not in ("n", "bits", "k", "batch")]
    print(f"exact Hamming top-{args.k} over {args.n:,} codes, {threads} threads, median of {args.repeats}")
    width = {key: max(12, len(key) + 2) for key in keys}
    print(f"{'bits':<6}" + "".join(f"{key:>{width[key]}}" for key in keys))
    for r in rows:
        print(f"{r['bits']:<6}" + "".join(f"{r.get(key, float('nan')):>{width[key]}.2f}" for key in keys))
    path = save("search_latency", {"n": args.n, "k": args.k, "threads": threads, "rows": rows})
    print(f"saved {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
