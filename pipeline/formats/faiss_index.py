"""faiss index files for an encoded archive (`encode-archive --index KIND`), loaded by `search` on CPU.

- flat: IndexBinaryFlat, exact (the same rows as duch's own scan); worth storing only to skip the copy at load.
- ivf: IndexBinaryIVF, codes bucketed around sqrt(N)-ish centroids; a query visits `nprobe` buckets. For archives
  far past what an exact scan serves interactively (~100M codes and up on CPU); approximate.
- hnsw: IndexBinaryHNSW graph; fast and approximate, memory ~ N * (code + 2M links).
Approximate kinds return true Hamming distances for the rows they find; their recall@10 against the exact scan
is measured by bench/search_speed_cpu.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from duch.pipeline import DuchError
from duch.pipeline.run.storage import atomic_write

KINDS = ("flat", "ivf", "hnsw")


def index_name(bits: int, modality: str) -> str:
    return f"index-{bits}-{modality}.faiss"


def installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


def _faiss():
    try:
        import faiss
    except ImportError:
        raise DuchError("faiss indexes need faiss: pip install faiss-cpu") from None
    return faiss


def build(codes: np.ndarray, kind: str, nlist: int | None = None, hnsw_m: int = 32, seed: int = 0,
          chunk: int = 1 << 22):
    """A faiss binary index over packed codes [N, K/8] (memory-mapped is fine: added chunk by chunk)."""
    faiss = _faiss()
    bits = codes.shape[1] * 8
    n = len(codes)
    if kind == "flat":
        index = faiss.IndexBinaryFlat(bits)
    elif kind == "ivf":
        nlist = nlist or int(min(65536, max(1, 4 * np.sqrt(n))))
        quantizer = faiss.IndexBinaryFlat(bits)
        # The Python wrapper keeps `quantizer` alive with the index; setting own_fields as well would free it
        # twice (a crash when the index is dropped).
        index = faiss.IndexBinaryIVF(quantizer, bits, nlist)
        train = np.random.default_rng(seed).choice(n, size=min(n, 40 * nlist), replace=False)
        index.train(np.ascontiguousarray(codes[np.sort(train)]))
        index.nprobe = max(1, nlist // 64)
    elif kind == "hnsw":
        index = faiss.IndexBinaryHNSW(bits, hnsw_m)
        index.hnsw.efSearch = 128
    else:
        raise DuchError(f"`index` must be one of {', '.join(KINDS)}, got {kind!r}")
    add(index, codes, chunk=chunk)
    return index


def add(index, codes: np.ndarray, start: int = 0, chunk: int = 1 << 22) -> None:
    """codes[start:] appended to an index, chunk by chunk (memory-mapped codes are never read whole)."""
    for s in range(start, len(codes), chunk):
        index.add(np.ascontiguousarray(codes[s:s + chunk]))


def search(index, packed: np.ndarray, k: int, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(distances, rows) of the k nearest codes for each query row, on `threads` OpenMP threads (None: one for a
    single query, else as many as there are queries up to the cores this process may use). A single query's scan
    is memory-bound and short: a second thread buys little, and on a busy CPU faiss' OpenMP team spin-waits for a
    core (measured over 1M 64-bit codes with a competing process: p50 75 ms on 2 threads, 1.7 ms on 1). OpenMP's
    thread count is per calling thread, so concurrent searches (the service's) each keep their own."""
    from duch.pipeline.compute.device import available_cores

    faiss = _faiss()
    n = threads or max(1, min(len(packed), available_cores()))
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        return index.search(packed, k)
    finally:
        faiss.omp_set_num_threads(before)


def write(index, path: Path) -> None:
    faiss = _faiss()
    with atomic_write(path) as tmp:
        faiss.write_index_binary(index, str(tmp))


def read(path: Path):
    return _faiss().read_index_binary(str(path))
