import numpy as np
import pytest

from data.splits import paper_split
from pipeline.metrics import map_at_k, ranking

DB_LABELS = np.array(["a", "b", "a", "a", "b"])
# Query "a" ranks the database 0, 1, 2 (1 and 2 tie: database order), 4, 3 -> relevance 1 0 1 0 1, R = 3.
SCORES = np.array([[0.9, 0.8, 0.8, 0.1, 0.5]])


def test_ties_are_broken_by_database_order():
    assert ranking(SCORES).tolist() == [[0, 1, 2, 4, 3]]


@pytest.mark.parametrize("k, definition, expected", [
    (2, "textbook", 1.0 / 2),  # precision 1 at rank 1; min(K, R) = 2
    (5, "textbook", (1 + 2 / 3 + 3 / 5) / 3),
    (2, "reference", (1 + 2 / 3) / 2),  # first two relevant anywhere: ranks 1 and 3
    (5, "reference", (1 + 2 / 3 + 3 / 5) / 3),
])
def test_map_on_a_hand_made_ranking(k, definition, expected):
    assert map_at_k(SCORES, np.array(["a"]), DB_LABELS, k, definition) == pytest.approx(expected)


def test_a_query_with_no_relevant_item_scores_zero_and_is_averaged_in():
    scores = np.vstack([SCORES, SCORES])
    value = map_at_k(scores, np.array(["a", "zzz"]), DB_LABELS, 5, "textbook")
    assert value == pytest.approx((1 + 2 / 3 + 3 / 5) / 3 / 2)


def test_unknown_definition():
    with pytest.raises(ValueError, match="unknown mAP definition"):
        map_at_k(SCORES, np.array(["a"]), DB_LABELS, 5, "median")


def test_paper_split_sizes_and_determinism():
    split = paper_split(2100)
    assert (len(split.train), len(split.query), len(split.database)) == (1050, 210, 840)
    every = np.concatenate([split.train, split.query, split.database])
    assert sorted(every.tolist()) == list(range(2100))
    assert np.array_equal(paper_split(2100).query, split.query)
    assert not np.array_equal(paper_split(2100, seed=1).query, split.query)
