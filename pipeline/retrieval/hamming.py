"""Exact Hamming top-k over packed binary codes (uint8 [N, K/8], big-endian bits): XOR + popcount.

Ties in distance are ordered by archive order (the lower row first), on every path: the order is part of
the result, so numpy, torch and any later kernel agree item for item. Each candidate is ranked by the key
`distance * N + row`, unique per row, which makes "smallest k keys" exactly "top k, ties by archive order".
"""
from __future__ import annotations

import numpy as np
import torch

# Rows of the archive scored at once: [queries x rows] distances stay within a few tens of MB.
_CELLS_PER_CHUNK = 1 << 24


def as_words(codes: np.ndarray) -> np.ndarray:
    """Packed codes as the widest unsigned words that divide the row: 8 bytes -> one uint64 per row."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    for width, dtype in ((8, np.uint64), (4, np.uint32), (2, np.uint16)):
        if codes.shape[1] % width == 0:
            return codes.view(dtype)
    return codes


def hamming(query: np.ndarray, database: np.ndarray) -> np.ndarray:
    """[Q, B] x [N, B] packed codes -> [Q, N] Hamming distances (uint16: codes of up to 65,535 bits)."""
    if query.shape[1] != database.shape[1]:
        raise ValueError(f"codes of {query.shape[1] * 8} and {database.shape[1] * 8} bits cannot be compared")
    q, db = as_words(query), as_words(database)
    out = np.bitwise_count(q[:, 0, None] ^ db[None, :, 0]).astype(np.uint16)
    for w in range(1, q.shape[1]):  # word by word: no [Q, N, W] temporary
        out += np.bitwise_count(q[:, w, None] ^ db[None, :, w])
    return out


def row_topk(distances: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k smallest of one query's distances, ties in row order, in O(N): distances are small
    integers, so a histogram gives the cut-off distance and only the rows up to it are sorted."""
    k = min(k, len(distances))
    cumulative = np.cumsum(np.bincount(distances))
    cut = int(np.searchsorted(cumulative, k))  # the first distance at which k rows are reached
    rows = np.flatnonzero(distances <= cut)
    return rows[np.argsort(distances[rows], kind="stable")[:k]]


def hamming_topk(query: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k: ([Q, k] int32 distances, [Q, k] int64 rows), nearest first, ties by archive order.
    The archive is scanned in chunks, so a memory-mapped one is never read whole into memory."""
    query = np.atleast_2d(query)
    n = len(database)
    k = max(0, min(k, n))
    chunk = max(k, _CELLS_PER_CHUNK // max(len(query), 1))
    best = np.zeros((len(query), 0), np.int64)  # keys distance * n + row, sorted
    for start in range(0, n, chunk):
        distances = hamming(query, database[start:start + chunk])
        keys = np.stack([distances[i, rows].astype(np.int64) * n + start + rows
                         for i, rows in enumerate(row_topk(d, k) for d in distances)])
        best = np.sort(np.concatenate([best, keys], axis=1), axis=1)[:, :k]
    return (best // n).astype(np.int32), best % n


# ---------------------------------------------------------------------------------------------- torch
_M1, _M2, _M4, _H01 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, 0x0101010101010101


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def popcount64(x: torch.Tensor) -> torch.Tensor:
    """Bits set per int64 word (SWAR: torch has no popcount). Arithmetic shifts are harmless: every
    shifted value is masked, and the final byte sum (<= 64) never reaches the sign bit."""
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    return (x * _signed(_H01)) >> 56


def to_words(codes: np.ndarray | torch.Tensor, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [N, B] -> [N, ceil(B / width)] words of `dtype` on `device`, zero-padded (a copy: memory-mapped
    codes are read-only)."""
    width = torch.iinfo(dtype).bits // 8
    codes = torch.from_numpy(np.array(codes, dtype=np.uint8))
    pad = (-codes.shape[1]) % width
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    return codes.contiguous().view(dtype).to(device)


def to_int64_words(codes: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """The layout the torch scan works on."""
    return to_words(codes, torch.int64, device)


def hamming_torch(query: torch.Tensor, database: torch.Tensor) -> torch.Tensor:
    """int64 words [Q, W] x [N, W] -> [Q, N] int64 distances."""
    out = torch.zeros(len(query), len(database), dtype=torch.int64, device=database.device)
    for w in range(query.shape[1]):
        out += popcount64(query[:, w, None] ^ database[None, :, w])
    return out


def hamming_topk_torch(query: torch.Tensor, database: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same exact top-k as `hamming_topk` over int64 words (`to_int64_words`), on the tensors' device."""
    n = len(database)
    k = min(k, n)
    chunk = max(k, _CELLS_PER_CHUNK // max(len(query), 1))
    best = None
    for start in range(0, n, chunk):
        part = database[start:start + chunk]
        rows = torch.arange(start, start + len(part), device=database.device)
        keys = hamming_torch(query, part) * n + rows
        keys = torch.topk(keys, min(k, len(part)), dim=1, largest=False, sorted=True).values
        best = keys if best is None else torch.sort(torch.cat([best, keys], 1), 1).values[:, :k]
    assert best is not None, "an empty database has no top k"
    return (best // n).to(torch.int32), best % n
