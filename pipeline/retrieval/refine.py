"""Refining a search with examples: archive images marked right (`positives`) or wrong (`negatives`), alone or
with a caption or image, form one query in the heads' continuous space (Rocchio's rule), which is then coded and
searched as any other query (the filters, generations and admission control unchanged).

    q' = alpha * q/|q| + beta * mean(p/|p| for p in positives) - gamma * mean(n/|n| for n in negatives)

Each vector is scaled to unit length first, so that a caption's (text head) and the images' (image head) outputs
weigh by the weights alone; q' is coded by its signs as any query is (and its magnitudes order equal distances,
adaptive ties). Without a query the formula runs with q = 0. Where the archive stored no continuous outputs
(encode-archive without `continuous`), every vector is its code as -1/+1 (the caption or image query's too): q'
is then a weighted bitwise majority vote of the query's and the examples' codes, and a bit whose vote is 0 is set,
as the sign of 0 is everywhere in duch (model/coding.pack_codes). bench/refine_quality.py measures the weights.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from duch.pipeline import DuchError

# alpha, beta, gamma: the query's weight, the positives' and the negatives'. Rocchio's usual shape: the examples
# weigh as much as the query, wrong ones a quarter (wrong in many ways). On UCM every weighting measured is at the
# ceiling alike (docs/results.md, 17), so these are not tuned.
ROCCHIO = (1.0, 1.0, 0.25)
MOST_EXAMPLES = 500  # positives and negatives together, per query


def unit(rows: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (a row of zeros stays zeros)."""
    rows = np.asarray(rows, np.float64)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def rocchio(query: np.ndarray | None, positives: np.ndarray, negatives: np.ndarray,
            weights: tuple[float, float, float] = ROCCHIO) -> np.ndarray:
    """The refined continuous query [K]: alpha * unit(query) + beta * mean(unit(positives)) - gamma *
    mean(unit(negatives)); a missing query or an empty set of examples adds nothing."""
    alpha, beta, gamma = weights
    dim = len(query) if query is not None else (positives.shape[1] if len(positives) else negatives.shape[1])
    out = np.zeros(dim, np.float64)
    if query is not None:
        out += alpha * unit(np.asarray(query)[None])[0]
    if len(positives):
        out += beta * unit(positives).mean(axis=0)
    if len(negatives):
        out -= gamma * unit(negatives).mean(axis=0)
    return out.astype(np.float32)


def id_list(value) -> tuple[str, ...]:
    """Ids from a CLI option (repeatable, each maybe a comma list), a form field or a JSON list: stripped, empty
    ones dropped, duplicates kept once, in order."""
    if value is None:
        return ()
    items: Iterable = [value] if isinstance(value, str) else value
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if part and part not in out:
                out.append(part)
    return tuple(out)


@dataclass(frozen=True)
class Feedback:
    """Archive images marked right (`positives`) and wrong (`negatives`), the Rocchio weights, and whether the
    marked images are left out of the results (`exclude_marked`)."""

    positives: tuple[str, ...] = ()
    negatives: tuple[str, ...] = ()
    weights: tuple[float, float, float] = ROCCHIO
    exclude_marked: bool = False

    @classmethod
    def parse(cls, positives=None, negatives=None, weights=None, exclude_marked: bool = False) -> Feedback:
        """From the CLI's, the API's or a caller's lists; each mistake one DuchError naming the parameter."""
        pos, neg = id_list(positives), id_list(negatives)
        both = [i for i in pos if i in neg]
        if both:
            raise DuchError(f"{', '.join(map(repr, both[:10]))} marked both right and wrong: give each image in "
                            "`positives` or in `negatives`, not both")
        if len(pos) + len(neg) > MOST_EXAMPLES:
            raise DuchError(f"{len(pos) + len(neg)} examples in `positives` and `negatives`: give at most "
                            f"{MOST_EXAMPLES}")
        if exclude_marked and not (pos or neg):
            raise DuchError("`exclude_marked` leaves the marked images out of the results; give `positives` or "
                            "`negatives` too")
        w = ROCCHIO if weights is None else tuple(float(v) for v in weights)
        if len(w) != 3 or not all(np.isfinite(w)) or min(w) < 0:
            raise DuchError(f"`rocchio` {weights!r}: give three weights ALPHA,BETA,GAMMA, each 0 or more")
        return cls(pos, neg, (w[0], w[1], w[2]), exclude_marked)

    @property
    def active(self) -> bool:
        return bool(self.positives or self.negatives)

    @property
    def marked(self) -> tuple[str, ...]:
        return self.positives + self.negatives


def refined_query(query: np.ndarray | None, query_bits: np.ndarray | None, positives: np.ndarray | None,
                  negatives: np.ndarray | None, positive_bits: np.ndarray, negative_bits: np.ndarray,
                  weights: tuple[float, float, float] = ROCCHIO) -> tuple[np.ndarray, str]:
    """(the refined continuous query [K], the rule used: "continuous" or "codes"). The continuous outputs of the
    examples when stored (`positives`, `negatives` [n, K], None when not), else every vector as its -1/+1 code
    (`query_bits` [K] for the query, `*_bits` [n, K]): the weighted majority vote."""
    if positives is not None and negatives is not None and (query is not None or query_bits is None):
        return rocchio(query, positives, negatives, weights), "continuous"
    as_float = lambda bits: np.asarray(bits, np.float32)  # noqa: E731
    return rocchio(None if query_bits is None else as_float(query_bits), as_float(positive_bits),
                   as_float(negative_bits), weights), "codes"
