"""Ordering a Hamming shortlist: equal distances by the query's confidence (query-adaptive ties), or the shortlist
re-ranked by the cosine of the continuous outputs."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from duch.pipeline.model.coding import unpack_codes
from duch.pipeline.retrieval.metrics import CONFIDENCE_STEPS, cosine, query_adaptive_ranking, weighted_distances

TIES = ("adaptive", "order")
# Adaptive ties read every item at the k-th hit's distance; past this many candidates the rest of that distance's
# items stay in archive order (a 16-bit code of a billion-item archive can share its distance with millions).
MOST_TIE_CANDIDATES = 1 << 16
# The first scan's length: past k, so that it usually holds every item at the k-th hit's distance already.
ADAPTIVE_SHORTLIST = 256


def adaptive_topk(scan: Callable[[int], tuple[np.ndarray, np.ndarray]], codes: np.ndarray, query: np.ndarray,
                  k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top k by Hamming distance, equal distances by the query's confidence on the differing bits, then archive
    order: (distances, rows, weighted distances in units of |output|). scan(n) is the exact top-n of the archive
    (distances, rows; ties in archive order); codes the archive's packed codes; query its continuous [K] code.
    Every item at the k-th hit's distance is a candidate: while the scan's farthest hit is still at that
    distance, it is asked for 4 times more (up to the whole archive, or MOST_TIE_CANDIDATES)."""
    n = len(codes)
    distances, rows = scan(min(max(k, ADAPTIVE_SHORTLIST), n))
    if not len(rows):
        return distances, rows, np.zeros(0, np.float32)
    last = distances[min(k, len(distances)) - 1]
    while distances[-1] == last and len(rows) < min(n, MOST_TIE_CANDIDATES):
        want = min(4 * len(rows), n, MOST_TIE_CANDIDATES)
        distances, rows = scan(want)
        if len(rows) < want:  # an approximate index found fewer: these are all there are
            break
    keep = distances <= last
    distances, rows = distances[keep], rows[keep]
    weighted = weighted_distances(query[None], unpack_codes(np.asarray(codes[rows]), codes.shape[1] * 8))
    order = query_adaptive_ranking(distances[None], weighted)[0][:k]
    return distances[order], rows[order], weighted[0, order] / CONFIDENCE_STEPS


def rerank(query: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity of one continuous query [K] to candidates [n, K] -> (order, best first, ties in
    shortlist order, which is Hamming order; the similarities)."""
    scores = cosine(np.asarray(query)[None], candidates)[0]
    return np.argsort(-scores, kind="stable"), scores
