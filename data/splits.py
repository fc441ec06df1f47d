"""The evaluation protocol's split (docs/design.md, 4.1)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    query: np.ndarray
    database: np.ndarray


def paper_split(n: int, seed: int = 42, train_share: float = 0.5, query_share: float = 0.2) -> Split:
    """Random split of DUCH's papers: 50% train; of the rest 20% query, 80% database (UCM: 1050 / 210 / 840)."""
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(round(n * train_share))
    rest = order[n_train:]
    n_query = int(round(len(rest) * query_share))
    return Split(np.sort(order[:n_train]), np.sort(rest[:n_query]), np.sort(rest[n_query:]))


def dataset_split(splits: np.ndarray) -> Split:
    """The dataset's own `split` field: train+val to train on; test as both query and database
    (UCM-captions: 1890 / 210 / 210, the instance-level protocol)."""
    splits = np.asarray(splits)
    train = np.flatnonzero((splits == "train") | (splits == "val"))
    test = np.flatnonzero(splits == "test")
    return Split(train, test, test)
