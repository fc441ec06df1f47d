"""The search over an archive's packed codes: exact Hamming top-k (XOR + popcount: faiss' IndexBinaryFlat or a
numpy scan over the memory-mapped file on CPU, a Triton kernel on a GPU; all return the same rows), nearest first,
within the rows a filter lets through and never among removed items; then equal distances ordered by the query's
confidence (`ties="adaptive"`) or kept in archive order, or a shortlist re-ranked by cosine (`rerank_top`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from duch.pipeline import DuchError
from duch.pipeline.archive.generation import BASE
from duch.pipeline.archive.segments import ArchiveCodes, verify_generation_index
from duch.pipeline.formats import faiss_index
from duch.pipeline.formats.codes import CodeTable
from duch.pipeline.retrieval.hamming import hamming_topk, hamming_topk_torch, to_int64_words
from duch.pipeline.retrieval.hamming_gpu import available as gpu_kernel_available
from duch.pipeline.retrieval.hamming_gpu import hamming_topk_triton, to_int32_words
from duch.pipeline.retrieval.queries import Query
from duch.pipeline.retrieval.ranking import TIES, adaptive_topk, rerank
from duch.pipeline.run.artifacts import stage_file, verify_listed

BACKENDS = ("auto", "faiss", "numpy")  # the CPU scan: faiss when installed (auto), faiss, or numpy


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise DuchError(f"`backend` must be {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}, got {backend!r}")


def faiss_file(run: Path, codes: ArchiveCodes, bits: int, modality: str, checksum: bool = True) -> Path | None:
    """The faiss index over the whole archive for this code length and modality, checked against the record that
    lists it (None: none was written). The generation says which: the run's own archive has the one its
    encode-archive manifest lists (written with `index`; a file of that folder only, whatever name the manifest
    gives), a grown one (archive/growth.py) the generation's own, listed in RUN/archive.json."""
    generation = codes.generation
    if generation.segments != (BASE,):
        listed = generation.indexes.get(str(bits), {}).get(modality)
        return verify_generation_index(run, listed, checksum) if listed else None
    own = codes.encoded[0]
    name = own.index_files(bits).get(modality)
    if name is None:
        return None
    stage_file(own.folder, name)  # a name leading out of the folder is refused before anything else
    return verify_listed(own.folder, own.manifest, name, checksum=checksum)


class CodeScan:
    """Exact Hamming top-k over one code length of an archive's codes, on the device and CPU backend asked for
    (each built once per modality, on first use)."""

    def __init__(self, run: Path, bits: int, codes: ArchiveCodes, device: torch.device, backend: str = "auto",
                 verify: bool = True):
        check_backend(backend)
        self.run, self.bits, self.codes, self.device, self.backend = run, bits, codes, device, backend
        self.verify = verify  # the faiss files' SHA-256 against their record (sizes are always checked)
        self._built: dict[str, object] = {}

    def table(self, modality: str) -> CodeTable:
        if modality not in self.codes.tables:
            raise DuchError(f"the archive holds no {modality} codes (it was extracted without captions)")
        return self.codes.tables[modality]

    def topk(self, packed: np.ndarray, modality: str, k: int,
             within: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Packed query codes [Q, K/8] -> ([Q, k] distances, [Q, k] rows) over `modality`'s codes: exact, ties
        in archive order, whichever backend runs (each is tested equal to the numpy scan). `within`: the only rows
        to consider (ascending), scanned exactly whatever the backend, so that a filter never shrinks k."""
        packed = np.asarray(packed, np.uint8)
        removed = self.codes.removed.get(modality)
        if within is not None:
            return self._within(packed, modality, k, within[~removed[within]] if removed is not None else within)
        gone = self.codes.removed_count.get(modality, 0)
        # The top k + (items removed) holds the top k of the live ones: ask for that many, drop the rest.
        if gone and removed is not None:
            d, rows = self._all(packed, modality, k + gone)
            keep = ~removed[rows]
            return (np.stack([r[m][:k] for r, m in zip(d, keep)]), np.stack([r[m][:k] for r, m in zip(rows, keep)]))
        return self._all(packed, modality, k)

    def ranked(self, query: Query, target: str, k: int, rerank_top: int = 0, ties: str = "adaptive",
               where: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(distances, rows, scores) of the top k of `target`'s items for a coded query, the filter `where` ([N]
        bool) applied first; scores: the cosine when re-ranked, the query's confidence with adaptive ties, or None
        (archive order)."""
        if ties not in TIES:
            raise DuchError(f"`ties` must be one of {', '.join(TIES)}, got {ties!r}")
        packed, h = query.packed, query.continuous
        within = self.rows_where(target, where)
        scores = None
        if ties == "adaptive" and h is not None and not rerank_top:
            scan = lambda n: tuple(a[0] for a in self.topk(packed, target, n, within))  # noqa: E731
            distances, rows, scores = adaptive_topk(scan, self.table(target).codes, h, k)
        else:
            distances, rows = (a[0] for a in self.topk(packed, target, max(k, rerank_top), within))
        if rerank_top:
            table = self.table(target)
            if table.continuous is None or h is None:
                raise DuchError("`rerank_top` needs the continuous outputs; encode the archive again with "
                                "`continuous` and `force`")
            order, all_scores = rerank(h, np.asarray(table.continuous[rows]))
            distances, rows, scores = distances[order], rows[order], all_scores[order]
        return distances[:k], rows[:k], None if scores is None else scores[:k]

    def rows_where(self, modality: str, mask: np.ndarray | None) -> np.ndarray | None:
        """A filter as the ascending rows it lets through (None: no filter); `mask` is [N] bool over the rows."""
        if mask is None:
            return None
        mask = np.asarray(mask, bool)
        if mask.shape != (len(self.table(modality)),):
            raise DuchError(f"a filter over {modality} items needs one value per item "
                            f"({len(self.table(modality))}), got {mask.shape}")
        return np.flatnonzero(mask)

    def faiss_file(self, modality: str) -> Path | None:
        return faiss_file(self.run, self.codes, self.bits, modality, self.verify)

    def _all(self, packed: np.ndarray, modality: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        backend = self._backend(modality)
        if isinstance(backend, torch.Tensor):
            return self._gpu_topk(packed, backend, k)
        if backend is not None:  # faiss: flat gives the numpy scan's rows, faster on batches; ivf/hnsw approximate
            d, rows = faiss_index.search(backend, packed, min(k, len(self.codes.tables[modality])))
            if (rows < 0).any():  # an approximate index may find fewer than k
                found = (rows >= 0).all(axis=0)
                d, rows = d[:, found], rows[:, found]
            return d.astype(np.int32), rows.astype(np.int64)
        return hamming_topk(packed, self.codes.tables[modality].codes, k)

    def _gpu_topk(self, packed: np.ndarray, words: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """GPU: the Triton kernel over int32 words, or the torch scan over int64 words."""
        if words.dtype == torch.int32:
            d, rows = hamming_topk_triton(packed, words, k)
        else:
            d, rows = hamming_topk_torch(to_int64_words(packed, self.device), words, k)
        return d.cpu().numpy(), rows.cpu().numpy()

    def _within(self, packed: np.ndarray, modality: str, k: int,
                within: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        backend = self._backend(modality)
        if isinstance(backend, torch.Tensor):  # the subset's words gathered on the GPU, then the same scan
            d, rows = self._gpu_topk(packed, backend[torch.as_tensor(within, device=self.device)].contiguous(), k)
        else:
            d, rows = hamming_topk(packed, np.asarray(self.codes.tables[modality].codes[within]), k)
        return d, within[rows]

    def _backend(self, modality: str):
        """Built once per modality: the codes on the GPU, or a faiss index in memory (the archive's own file, else
        a flat one built from the codes), or None (numpy scan over the memory-mapped file)."""
        if modality in self._built:
            return self._built[modality]
        table = self.table(modality)
        backend = None
        if self.device.type == "cuda":
            # One copy at packed size: the kernel's int32 words (viewed as int64 where it needs them), or the
            # int64 words of the torch scan where Triton is missing.
            words = to_int32_words if gpu_kernel_available(self.device) else to_int64_words
            backend = words(table.codes[:], self.device)
        elif self.backend in ("auto", "faiss"):
            if index_file := self.faiss_file(modality):
                backend = faiss_index.read(index_file)
            elif self.backend == "faiss" or faiss_index.installed():  # "faiss" without it: the install hint
                backend = faiss_index.build(table.codes, "flat")
        self._built[modality] = backend
        return backend
