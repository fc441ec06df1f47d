"""Exact Hamming top-k on a GPU over packed codes held at their packed size (8 bytes per 64-bit code).

Two passes, both exact:
1. a threshold per query: the k-th smallest distance over a strided sample of the archive. The sample is a subset,
   so its k-th distance is >= the archive's: every true top-k item lies within it.
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

from pipeline.hamming import hamming_topk_torch, to_int64_words

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the torch scan serves
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def to_int32_words(codes: np.ndarray | torch.Tensor, device: torch.device | str = "cuda") -> torch.Tensor:
    """uint8 [N, B] -> int32 [N, ceil(B/4)] on `device`, zero-padded: the layout the kernel reads."""
    codes = torch.as_tensor(np.asarray(codes, dtype=np.uint8))
    pad = (-codes.shape[1]) % 4
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    return codes.contiguous().view(torch.int32).to(device)


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
        qs = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        q_ok, r_ok = qs < Q, rows < N
        distance = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.int32)
        for w in tl.static_range(W):
            a = tl.load(query_ptr + qs * W + w, mask=q_ok, other=0)
            b = tl.load(db_ptr + rows.to(tl.int64) * W + w, mask=r_ok, other=0)
            distance += _popcount32(a[:, None] ^ b[None, :], USE_POPC)
        threshold = tl.load(threshold_ptr + qs, mask=q_ok, other=-1)
        keep = (distance <= threshold[:, None]) & r_ok[None, :] & q_ok[:, None]
        kept = keep.to(tl.int32)
        # Reserve one contiguous range per query with a single atomic, then place each kept row by prefix sum.
        base = tl.atomic_add(count_ptr + qs, tl.sum(kept, axis=1), mask=q_ok)
        slot = base[:, None] + tl.cumsum(kept, axis=1) - 1
        key = distance.to(tl.int64) * N + rows.to(tl.int64)[None, :]
        tl.store(out_ptr + qs.to(tl.int64)[:, None] * CAP + slot, key, mask=keep & (slot < CAP))


def thresholds(query64: torch.Tensor, db64: torch.Tensor, k: int, sample: int) -> torch.Tensor:
    """Per query, the k-th smallest distance over every (N // sample)-th row: an upper bound of the true one."""
    stride = max(1, len(db64) // sample)
    return hamming_topk_torch(query64, db64[::stride], k)[0][:, -1]


def hamming_topk_triton(query: np.ndarray | torch.Tensor, db32: torch.Tensor, k: int, db64: torch.Tensor | None = None,
                        capacity: int = 4096, sample: int = 1 << 16, block_q: int = 32,
                        block_n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k ([Q, k] int32 distances, [Q, k] int64 rows) of packed `query` codes over `db32`
    (`to_int32_words`). `db64` (the same codes as `to_int64_words`) is used for the sample pass and for overflow;
    without it a view of db32 is taken when the row has an even number of words."""
    device = db32.device
    n, words = db32.shape
    k = min(k, n)
    q32 = query if isinstance(query, torch.Tensor) else to_int32_words(query, device)
    if db64 is None:
        db64 = db32.view(torch.int64) if words % 2 == 0 else to_int64_words(db32.cpu().view(torch.uint8), device)
    q64 = q32.view(torch.int64) if words % 2 == 0 else to_int64_words(q32.cpu().view(torch.uint8), device)
    limit = thresholds(q64, db64, k, sample).to(torch.int32).contiguous()
    counts = torch.zeros(len(q32), dtype=torch.int32, device=device)
    out = torch.full((len(q32), capacity), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    grid = (triton.cdiv(len(q32), block_q), triton.cdiv(n, block_n))
    _within_threshold[grid](q32.contiguous(), db32, limit, counts, out, len(q32), n, capacity, W=words,
                            BLOCK_Q=block_q, BLOCK_N=block_n, USE_POPC=not INTERPRET)
    keys = torch.sort(out, dim=1).values[:, :k]
    distances, rows = (keys // n).to(torch.int32), keys % n
    overflow = torch.nonzero(counts > capacity).flatten()
    if len(overflow):
        distances[overflow], rows[overflow] = hamming_topk_torch(q64[overflow], db64, k)
    return distances, rows


def available(device: torch.device) -> bool:
    return triton is not None and (device.type == "cuda" or INTERPRET)
