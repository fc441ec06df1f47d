"""Retrieval metrics over a score matrix (higher = more similar; for codes, minus the Hamming distance).

Ties are broken by database order (a stable sort), so every figure is deterministic.

Two mAP@K definitions (DESIGN.md section 2):
- "textbook": AP@K over the top K retrieved only: the precision at each relevant rank within K, summed and
  divided by min(K, R), R = relevant items in the database (so a query that could have filled its top K
  with relevant items and did not is penalised).
- "reference": DUCH's public code: the first min(K, R) relevant items anywhere in the full ranking
  (R = relevant items in the database), averaging the precision at their ranks.
"""
from __future__ import annotations

import numpy as np


def ranking(scores: np.ndarray) -> np.ndarray:
    """[Q, N] scores -> [Q, N] database indices, best first, ties in database order."""
    return np.argsort(-np.asarray(scores), axis=1, kind="stable")


def relevance(order: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """[Q, N] bool: is the item at each rank of the same class as the query."""
    return np.asarray(db_labels)[order] == np.asarray(query_labels)[:, None]


def map_at_k(scores: np.ndarray, query_labels, db_labels, k: int, definition: str = "textbook") -> float:
    rel = relevance(ranking(scores), query_labels, db_labels)
    if definition == "textbook":
        top = rel[:, :k].astype(np.float64)
        precision = top.cumsum(axis=1) / np.arange(1, top.shape[1] + 1)
        possible = np.minimum(rel.sum(axis=1), k).astype(np.float64)
        ap = np.divide((precision * top).sum(axis=1), possible, out=np.zeros_like(possible), where=possible > 0)
        return float(ap.mean())
    if definition == "reference":
        aps = []
        for row in rel:
            ranks = np.flatnonzero(row)[: k] + 1  # 1-based ranks of the first min(K, R) relevant items
            aps.append(0.0 if len(ranks) == 0 else float(np.mean(np.arange(1, len(ranks) + 1) / ranks)))
        return float(np.mean(aps))
    raise ValueError(f"unknown mAP definition {definition!r}; use 'textbook' or 'reference'")
