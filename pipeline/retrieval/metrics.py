"""Retrieval metrics over a score matrix (higher = more similar; for codes, minus the Hamming distance).

Ties are broken by database order (a stable sort), so every figure is deterministic. `query_adaptive_ranking`
breaks equal Hamming distances by the query's own continuous code instead, still deterministically.

Two mAP@K definitions (docs/design.md, 4.3):
- "textbook": AP@K over the top K retrieved only: the precision at each relevant rank within K, summed and
  divided by min(K, R), R = relevant items in the database (so a query that could have filled its top K
  with relevant items and did not is penalised).
- "reference": DUCH's public code: the first min(K, R) relevant items anywhere in the full ranking
  (R = relevant items in the database), averaging the precision at their ranks.
"""
from __future__ import annotations

import numpy as np

# The retrieval directions, query modality -> database modality, in the published tables' order.
DIRECTIONS = ("I->T", "T->I", "I->I", "T->T")


def ranking(scores: np.ndarray) -> np.ndarray:
    """[Q, N] scores -> [Q, N] database indices, best first, ties in database order."""
    return np.argsort(-np.asarray(scores), axis=1, kind="stable")


def relevance(order: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """[Q, N] bool: is the item at each rank of the same class as the query."""
    return np.asarray(db_labels)[order] == np.asarray(query_labels)[:, None]


def map_at_k(scores: np.ndarray, query_labels, db_labels, k: int, definition: str = "textbook") -> float:
    return map_of_ranking(ranking(scores), query_labels, db_labels, k, definition)


def map_of_ranking(order: np.ndarray, query_labels, db_labels, k: int, definition: str = "textbook") -> float:
    """mAP@k of a ranking ([Q, N] database indices, best first) under one of the two definitions."""
    return float(average_precisions(order, query_labels, db_labels, k, definition).mean())


def average_precisions(order: np.ndarray, query_labels, db_labels, k: int, definition: str = "textbook") -> np.ndarray:
    """AP@k of each query [Q] (float64): map_of_ranking before its mean."""
    rel = relevance(order, query_labels, db_labels)
    if definition == "textbook":
        top = rel[:, :k].astype(np.float64)
        precision = top.cumsum(axis=1) / np.arange(1, top.shape[1] + 1)
        possible = np.minimum(rel.sum(axis=1), k).astype(np.float64)
        return np.divide((precision * top).sum(axis=1), possible, out=np.zeros_like(possible), where=possible > 0)
    if definition == "reference":
        aps = np.zeros(len(rel))
        for q, row in enumerate(rel):
            ranks = np.flatnonzero(row)[: k] + 1  # 1-based ranks of the first min(K, R) relevant items
            if len(ranks):
                aps[q] = np.mean(np.arange(1, len(ranks) + 1) / ranks)
        return aps
    raise ValueError(f"unknown mAP definition {definition!r}; use 'textbook' or 'reference'")


def per_class_mean(values: np.ndarray, labels) -> dict[str, float]:
    """The mean of per-query values by query class, lowest first (ties by name): which classes retrieval misses."""
    labels = np.asarray(labels)
    means = {str(c): float(np.mean(values[labels == c])) for c in np.unique(labels)}
    return dict(sorted(means.items(), key=lambda kv: (kv[1], kv[0])))


def precision_at_k(scores: np.ndarray, query_labels, db_labels, ks) -> np.ndarray:
    """Mean precision within the top K of the ranking, for each K in `ks` (K beyond N counts N)."""
    rel = relevance(ranking(scores), query_labels, db_labels)
    hits = rel.cumsum(axis=1)
    ks = np.minimum(np.asarray(ks), rel.shape[1])
    return hits[:, ks - 1].mean(axis=0) / ks


def radius_curves(distances: np.ndarray, query_labels, db_labels, bits: int) -> dict[str, np.ndarray]:
    """Everything within Hamming radius r = 0..bits retrieved, for every r:
    - precision: relevant retrieved / retrieved, averaged over the queries that retrieve anything;
    - recall: relevant retrieved / relevant in the database, averaged over queries with any relevant;
    - precision_all: the same precision averaged over all queries, an empty result counting 0 (the "P@H<=r" of
      the hashing literature, which penalises radii too small to return anything);
    - empty: the share of queries that retrieve nothing."""
    distances = np.asarray(distances)
    rel = np.asarray(db_labels)[None, :] == np.asarray(query_labels)[:, None]
    out = {name: np.zeros(bits + 1) for name in ("precision", "recall", "precision_all", "empty")}
    n_rel = rel.sum(axis=1)
    # Per query, how many items (and how many relevant) sit at each exact distance; cumulative sums give radii.
    at = np.stack([np.bincount(d, minlength=bits + 1)[: bits + 1] for d in distances])
    at_rel = np.stack([np.bincount(d[r], minlength=bits + 1)[: bits + 1] for d, r in zip(distances, rel)])
    retrieved, relevant = at.cumsum(axis=1), at_rel.cumsum(axis=1)
    for r in range(bits + 1):
        got = retrieved[:, r] > 0
        precision = np.divide(relevant[:, r], retrieved[:, r], out=np.zeros(len(got)), where=got)
        out["precision"][r] = precision[got].mean() if got.any() else 0.0
        out["precision_all"][r] = precision.mean()
        out["empty"][r] = 1.0 - got.mean()
        has = n_rel > 0
        out["recall"][r] = (relevant[has, r] / n_rel[has]).mean() if has.any() else 0.0
    return out


def recall_at_k(order: np.ndarray, positive: np.ndarray, ks) -> dict[int, float]:
    """Instance-level Recall@K: the share of queries with at least one of their own positives (an image's
    captions, a caption's image) in the top K of `order` ([Q, N] database indices, best first)."""
    hits = np.take_along_axis(np.asarray(positive), order, axis=1)
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), hits.shape[1])  # rank of the first positive
    return {int(k): float((first < k).mean()) for k in ks}


def rerank_order(distances: np.ndarray, similarity: np.ndarray, shortlist: int) -> np.ndarray:
    """[Q, N] ranking: the `shortlist` nearest by Hamming (ties in database order) re-ordered by similarity
    (higher first, ties in Hamming order), then the rest in Hamming order."""
    order = ranking(-np.asarray(distances))
    head = order[:, :shortlist]
    sims = np.take_along_axis(np.asarray(similarity), head, axis=1)
    resorted = np.take_along_axis(head, np.argsort(-sims, axis=1, kind="stable"), axis=1)
    return np.concatenate([resorted, order[:, shortlist:]], axis=1)


# A query bit's confidence |q_i| in steps of 1/1024, from its float16 value (as encode-archive stores it): whole
# numbers, so sums of them are exact in float32 whatever the summation order, and every path agrees to the bit.
CONFIDENCE_STEPS = 1024


def confidence_weights(query: np.ndarray) -> np.ndarray:
    """[Q, K] continuous query codes -> [Q, K] float32 whole numbers: |q_i| in 1/1024 steps."""
    return np.rint(np.abs(np.asarray(query, np.float16)).astype(np.float32) * CONFIDENCE_STEPS)


def weighted_distances(query: np.ndarray, database: np.ndarray) -> np.ndarray:
    """[Q, K] continuous query codes and [N, K] +-1 database codes (pipeline.hashing.unpack_codes) -> [Q, N]
    float32: the sum of the query's confidence_weights over the bits where the item's code differs from the
    query's (bit 1 where q >= 0, as pack_codes). Among equal Hamming distances, the items that differ only on the
    bits the query is least sure of come first (query-adaptive Hamming ranking, Jiang, Wang and Chang, IEEE TMM
    2013). Computed as (sum w - (w s) . d) / 2, s and d the +-1 codes of query and item: one matrix product,
    exact in float32."""
    q = np.asarray(query, np.float32)
    w = confidence_weights(q)
    signed = np.where(q >= 0, w, -w)
    return (w.sum(axis=1, keepdims=True) - signed @ np.asarray(database, np.float32).T) / 2


def query_adaptive_ranking(distances: np.ndarray, weighted: np.ndarray) -> np.ndarray:
    """[Q, N] database indices nearest first by Hamming distance; equal distances by `weighted_distances`
    (smaller first); then database order."""
    return np.lexsort((np.asarray(weighted), np.asarray(distances)), axis=-1)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    a = a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-12)
    b = b / (np.linalg.norm(b, axis=1, keepdims=True) + 1e-12)
    return a @ b.T
