"""Exact Hamming top-k on a GPU over packed codes held at their packed size (8 bytes per 64-bit code).

Two passes, both exact:
1. a threshold per query: the k-th smallest distance over every r-th row of the archive (found the same way,
   recursively, down to a size the plain scan handles). The sample is a subset, so its k-th distance is >= the
   archive's: every true top-k item lies within it.
2. one Triton kernel scans the whole archive (XOR + popcount on 32-bit words, in registers) and appends only the
   rows within the threshold to a small per-query buffer (a few thousand candidates instead of N distances).
The candidates are then sorted by `distance * N + row`, which gives the top k with ties in archive order, exactly
as `pipeline.hamming.hamming_topk`. A query whose candidates overflow its buffer (a huge tie at the threshold)
is redone by the plain torch scan, so the result never depends on the buffer size.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from duch.pipeline.retrieval.hamming import hamming_topk_torch, to_words

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the torch scan serves
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def to_int32_words(codes: np.ndarray | torch.Tensor, device: torch.device | str = "cuda") -> torch.Tensor:
    """The layout the kernel reads: popcount is one instruction on 32-bit words."""
    return to_words(codes, torch.int32, device)


if triton is not None:

    @triton.jit
    def _popcount32(x, USE_POPC: tl.constexpr):
        if USE_POPC:
            return tl.extra.cuda.libdevice.popc(x)
        # SWAR on 32-bit words (the interpreter has no popc); arithmetic shifts are masked off at every step.
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        return ((x * 0x01010101) >> 24) & 0xFF

    @triton.jit
    def _within_threshold(query_ptr, db_ptr, threshold_ptr, count_ptr, out_ptr, Q, N, CAP,
                          W: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, USE_POPC: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        qs = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_ok, r_ok = qs < Q, rows < N
        distance = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.int32)
        for w in tl.static_range(W):
            a = tl.load(query_ptr + qs * W + w, mask=q_ok, other=0)
            b = tl.load(db_ptr + rows * W + w, mask=r_ok, other=0)
            distance += _popcount32(a[:, None] ^ b[None, :], USE_POPC)
        threshold = tl.load(threshold_ptr + qs, mask=q_ok, other=-1)
        keep = (distance <= threshold[:, None]) & r_ok[None, :] & q_ok[:, None]
        kept = keep.to(tl.int32)
        # Reserve one contiguous range per query with a single atomic, then place each kept row by prefix sum.
        base = tl.atomic_add(count_ptr + qs, tl.sum(kept, axis=1), mask=q_ok)
        slot = base[:, None] + tl.cumsum(kept, axis=1) - 1
        key = distance.to(tl.int64) * N + rows[None, :]
        tl.store(out_ptr + qs.to(tl.int64)[:, None] * CAP + slot, key, mask=keep & (slot < CAP))


def _as_int64(words32: torch.Tensor) -> torch.Tensor:
    """The same codes as int64 words, for the torch scan: a view, or one zero word padded on the device (the
    layout `to_int64_words` gives the bytes)."""
    if words32.shape[1] % 2:
        words32 = torch.nn.functional.pad(words32, (0, 1))
    return words32.contiguous().view(torch.int64)


def hamming_topk_triton(query: np.ndarray | torch.Tensor, db32: torch.Tensor, k: int, capacity: int = 8192,
                        block_q: int = 32, block_n: int = 256,
                        direct_below: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k ([Q, k] int32 distances, [Q, k] int64 rows) of packed `query` codes (uint8 [Q, B], or int32
    words) over `db32` (`to_int32_words`), ties in archive order. Small archives, huge k and overflowing queries
    go to the torch scan over the same codes viewed as int64 words."""
    device = db32.device
    n, words = db32.shape
    k = min(k, n)
    q32 = (query if isinstance(query, torch.Tensor) else to_int32_words(query, device)).contiguous()
    if n <= direct_below or 4 * k > capacity:  # small archives or huge k: the plain scan is the right tool
        return hamming_topk_torch(_as_int64(q32), _as_int64(db32), k)
    # The threshold comes from every ratio-th row: about k * ratio candidates per query, well within capacity.
    ratio = max(2, capacity // (16 * k))
    sample = db32[::ratio].contiguous()
    limit = hamming_topk_triton(q32, sample, k, capacity=capacity, block_q=block_q, block_n=block_n,
                                direct_below=direct_below)[0][:, -1].to(torch.int32).contiguous()
    # A tile's query rows beyond Q are wasted work: one query gets a one-row tile over more archive rows.
    block_q = max(1, min(block_q, triton.next_power_of_2(len(q32))))
    if block_q < 8:
        block_n = max(block_n, 1024)
    counts = torch.zeros(len(q32), dtype=torch.int32, device=device)
    out = torch.full((len(q32), capacity), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    # Archive blocks on grid axis 0 (up to 2^31 - 1 of them), query blocks on axis 1 (at most 65,535).
    grid = (triton.cdiv(n, block_n), triton.cdiv(len(q32), block_q))
    _within_threshold[grid](q32, db32, limit, counts, out, len(q32), n, capacity, W=words,
                            BLOCK_Q=block_q, BLOCK_N=block_n, USE_POPC=not INTERPRET)
    keys = torch.sort(out, dim=1).values[:, :k]
    distances, rows = (keys // n).to(torch.int32), keys % n
    overflow = torch.nonzero(counts > capacity).flatten()
    if len(overflow):  # a tie too large for the buffer: this query by the plain scan
        d, r = hamming_topk_torch(_as_int64(q32[overflow]), _as_int64(db32), k)
        distances[overflow], rows[overflow] = d.to(torch.int32), r
    return distances, rows


def available(device: torch.device) -> bool:
    return triton is not None and (device.type == "cuda" or INTERPRET)
