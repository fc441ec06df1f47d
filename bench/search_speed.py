"""Exact Hamming top-k at archive scale on a GPU (and faiss on the CPU): queries per second and memory.

    python bench/search_speed.py                          # GPU: 10M codes side by side, then 100M and 1B
    python bench/search_speed.py --sizes 10000000 --quick # one size, fewer repeats

Side by side in one process on the same random 64-bit codes and 1000 queries, top-20, median of --repeats
timed runs after a warm-up:
- "matmul": the dense route, codes unpacked to fp16 +-1 vectors (128 bytes per code), distance from one
  matrix product, torch.topk (the anchor measured at 11,987 queries/s on 10M codes, docs/results.md 7);
- "triton": duch's kernel (pipeline/hamming_gpu.py) over the packed codes (8 bytes per code), exact, ties in
  archive order;
- "faiss-cpu": IndexBinaryFlat on all CPU cores.
Results are checked against each other (distances equal) before timing. The triton kernel alone runs the larger
sizes (1B 64-bit codes are 8 GB packed; as fp16 +-1 they would be 128 GB).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import save  # noqa: E402
from duch.pipeline.retrieval.hamming import hamming_topk_torch  # noqa: E402
from duch.pipeline.retrieval.hamming_gpu import hamming_topk_triton  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_codes(n: int, words32: int, seed: int) -> torch.Tensor:
    """[n, words32] int32 random codes made on the GPU in slices (no host copy of a billion codes)."""
    out = torch.empty((n, words32), dtype=torch.int32, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for s in range(0, n, 1 << 26):
        part = out[s:s + (1 << 26)]
        part.copy_(torch.randint(-2**31, 2**31 - 1, part.shape, generator=gen, device="cuda", dtype=torch.int32))
    return out


def unpack_pm1(db32: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words -> fp16 +-1 [n, bits] in the same bit order as the packed bytes."""
    as_bytes = db32.view(torch.uint8)
    shifts = torch.arange(7, -1, -1, device=db32.device, dtype=torch.uint8)
    bits_ = (as_bytes[:, :, None] >> shifts) & 1
    return (bits_.reshape(len(db32), -1)[:, :bits].half() * 2 - 1)


def matmul_topk(q_pm1: torch.Tensor, db_pm1: torch.Tensor, k: int, chunk: int = 1 << 22):
    """Hamming = (bits - <q, x>) / 2 on +-1 vectors; top-k per chunk, merged (the dense anchor)."""
    bits = q_pm1.shape[1]
    best_d = best_i = None
    for s in range(0, len(db_pm1), chunk):
        dots = q_pm1 @ db_pm1[s:s + chunk].T
        vals, idx = torch.topk(dots, k, dim=1)
        d, i = ((bits - vals.float()) / 2).round().int(), idx + s
        if best_d is None:
            best_d, best_i = d, i
        else:
            cat_d, cat_i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
            order = torch.topk(-cat_d, k, dim=1).indices
            best_d, best_i = cat_d.gather(1, order), cat_i.gather(1, order)
    return torch.sort(best_d, 1).values, best_i


def measure_size(n: int, args, blocks: list[tuple[int, ...]], best_block: tuple[int, ...], first: bool
                 ) -> tuple[dict, tuple[int, ...]]:
    """One archive size's row, and the kernel tile chosen (on the `first` size); its codes are freed on return."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    db32 = random_codes(n, args.bits // 32, seed=n % 1000)
    queries = db32[torch.randint(0, n, (args.queries,), device="cuda")].clone()
    row = {"n": n, "queries": args.queries, "k": args.k, "bits": args.bits,
           "packed_gb": db32.numel() * 4 / 1e9}
    if first:  # pick the kernel's tile on the first size, report them all
        tiles = {}
        for bq, bn in blocks:
            t = timed(lambda bq=bq, bn=bn: hamming_topk_triton(queries, db32, args.k, block_q=bq, block_n=bn),
                      max(3, args.repeats // 2))
            tiles[f"{bq}x{bn}"] = args.queries / t
        best_block = tuple(int(x) for x in max(tiles, key=tiles.get).split("x"))
        row["triton_tiles_qps"] = tiles
    run = lambda: hamming_topk_triton(queries, db32, args.k, block_q=best_block[0], block_n=best_block[1])  # noqa: E731
    d_triton, i_triton = run()
    check = min(50 if n <= 10**8 else 8, args.queries)
    d_ref, i_ref = hamming_topk_torch(queries[:check].contiguous().view(torch.int64), db32.view(torch.int64),
                                      args.k)
    row["exact_equal_torch"] = bool(torch.equal(d_ref.int(), d_triton[:check]) and
                                    torch.equal(i_ref, i_triton[:check]))
    row["triton_qps"] = args.queries / timed(run, args.repeats)
    row["triton_block"] = f"{best_block[0]}x{best_block[1]}"
    row["triton_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if n <= 10**7 * 2:
        db_pm1 = unpack_pm1(db32, args.bits)
        q_pm1 = unpack_pm1(queries, args.bits)
        d_mm, _ = matmul_topk(q_pm1, db_pm1, args.k)
        row["matmul_equal_distances"] = bool(torch.equal(d_mm, d_triton))
        row["matmul_qps"] = args.queries / timed(lambda: matmul_topk(q_pm1, db_pm1, args.k), args.repeats)
        row["triton_vs_matmul"] = row["triton_qps"] / row["matmul_qps"]
        row["matmul_gb"] = db_pm1.numel() * 2 / 1e9
        del db_pm1, q_pm1
        try:
            import faiss

            faiss.omp_set_num_threads(os.cpu_count() or 1)
            host = db32.cpu().numpy().view(np.uint8)
            index = faiss.IndexBinaryFlat(args.bits)
            index.add(host)
            qh = queries.cpu().numpy().view(np.uint8)
            fd, _ = index.search(qh[:check], args.k)
            row["faiss_equal_distances"] = bool((fd == d_triton[:check].cpu().numpy()).all())
            t = time.perf_counter()
            index.search(qh, args.k)
            row["faiss_cpu_qps"] = args.queries / (time.perf_counter() - t)
            row["triton_vs_faiss_cpu"] = row["triton_qps"] / row["faiss_cpu_qps"]
            row["faiss_one_query_ms"] = 1000 * statistics.median(
                [_time(lambda: index.search(qh[:1], args.k)) for _ in range(5)])
            del index, host
        except ImportError:
            pass
    one = queries[:1]
    row["triton_one_query_ms"] = 1000 * timed(lambda: hamming_topk_triton(
        one, db32, args.k, block_q=best_block[0], block_n=best_block[1]), args.repeats)
    return row, best_block


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000000,100000000,1000000000")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--blocks", default="32x256,64x256,64x512,128x128,128x256", help="BLOCK_Q x BLOCK_N to try")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("search_speed.py needs a CUDA GPU; bench/search_latency.py is the CPU benchmark")
    if args.bits % 64:
        raise SystemExit("--bits must be a multiple of 64 here")
    sizes = [int(s) for s in args.sizes.split(",")]
    rows, blocks = [], [tuple(int(x) for x in b.split("x")) for b in args.blocks.split(",")]
    best_block = blocks[0]
    for n in sizes:
        row, best_block = measure_size(n, args, blocks, best_block, first=n == sizes[0])
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    print(f"\nexact Hamming top-{args.k}, {args.bits}-bit codes, {args.queries} queries, "
          f"{torch.cuda.get_device_name()}")
    keys = ["triton_qps", "matmul_qps", "faiss_cpu_qps", "triton_vs_matmul", "triton_vs_faiss_cpu",
            "triton_one_query_ms", "packed_gb", "triton_peak_gb"]
    print(f"{'codes':>14}" + "".join(f"{k:>20}" for k in keys))
    for r in rows:
        print(f"{r['n']:>14,}" + "".join(f"{r.get(k, float('nan')):>20.2f}" for k in keys))
    path = save("search_speed", {"rows": rows})
    print(f"saved {path}")
    return {"rows": rows}


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
