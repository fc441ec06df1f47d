import numpy as np
import pytest

from duch.data.splits import paper_split
from duch.pipeline.retrieval.metrics import average_precisions, map_at_k, per_class_mean, ranking

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


def test_per_query_aps_and_their_class_means():
    # Query "a" as above; query "b" ranks 0, 1, 2, 4, 3 too -> relevance 0 1 0 1 0 (R = 2): (1/2 + 2/4) / 2.
    order = ranking(np.vstack([SCORES, SCORES, SCORES]))
    aps = average_precisions(order, np.array(["a", "b", "a"]), DB_LABELS, 5, "reference")
    assert aps == pytest.approx([(1 + 2 / 3 + 3 / 5) / 3, (1 / 2 + 2 / 4) / 2, (1 + 2 / 3 + 3 / 5) / 3])
    means = per_class_mean(aps, np.array(["a", "b", "a"]))
    assert list(means) == ["b", "a"]  # lowest first
    assert means == pytest.approx({"a": aps[0], "b": 0.5})


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


def test_precision_at_k_on_the_hand_made_ranking():
    from duch.pipeline.retrieval.metrics import precision_at_k

    # relevance in rank order: 1 0 1 0 1
    assert precision_at_k(SCORES, np.array(["a"]), DB_LABELS, [1, 2, 3, 5, 9]).tolist() == pytest.approx(
        [1, 1 / 2, 2 / 3, 3 / 5, 3 / 5])


def test_radius_curves_by_hand():
    from duch.pipeline.retrieval.metrics import radius_curves

    # Query "a" (relevant: 0, 2, 3); query "b" (relevant: 1, 4). Distances to the five database items:
    distances = np.array([[0, 1, 1, 2, 3], [2, 2, 3, 3, 3]])
    curves = radius_curves(distances, np.array(["a", "b"]), DB_LABELS, bits=3)
    # r=0: query a retrieves {0} (1 relevant); query b retrieves nothing.
    assert curves["precision"][0] == pytest.approx(1.0)
    assert curves["precision_all"][0] == pytest.approx(0.5) and curves["empty"][0] == pytest.approx(0.5)
    assert curves["recall"][0] == pytest.approx((1 / 3 + 0) / 2)
    # r=2: a retrieves {0, 1, 2, 3} (3 relevant), b retrieves {0, 1} (1 relevant).
    assert curves["precision"][2] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert curves["recall"][2] == pytest.approx((1 + 1 / 2) / 2)
    # r=3: everything: precision is the share of relevant items, recall 1.
    assert curves["precision"][3] == pytest.approx((3 / 5 + 2 / 5) / 2) and curves["recall"][3] == 1.0


def test_instance_recall_and_rerank_order():
    from duch.pipeline.retrieval.metrics import recall_at_k, rerank_order

    order = np.array([[2, 0, 1], [1, 2, 0]])
    positive = np.array([[True, False, False], [False, False, False]])  # query 1 has no positive at all
    assert recall_at_k(order, positive, (1, 2, 3)) == {1: 0.0, 2: 0.5, 3: 0.5}
    distances = np.array([[1, 0, 0, 2]])  # Hamming order 1, 2, 0, 3
    similarity = np.array([[0.9, 0.1, 0.5, 1.0]])
    assert rerank_order(distances, similarity, 3).tolist() == [[0, 2, 1, 3]]  # item 3 is outside the shortlist
    tie = np.array([[0.5, 0.5, 0.5, 0.5]])
    assert rerank_order(distances, tie, 4).tolist() == [[1, 2, 0, 3]]  # equal cosine: Hamming order kept


def test_weighted_distances_and_query_adaptive_ranking_by_hand():
    from duch.pipeline.retrieval.metrics import query_adaptive_ranking, weighted_distances

    # The query's bits are 1 0 1 with confidences |q| in 1/1024 steps of its float16 value: 0.9 -> 921.5 -> 922
    # (half to even), 0.1 -> 102.375 -> 102, 0.5 -> 512.
    query = np.array([[0.9, -0.1, 0.5]])
    database = np.array([[1, -1, 1], [1, 1, 1], [-1, -1, 1], [1, -1, -1], [-1, 1, -1], [1, 1, 1]])
    weighted = weighted_distances(query, database)
    assert weighted.tolist() == [[0, 102, 922, 512, 1536, 102]]  # the confidences of the bits that differ
    distances = np.array([[0, 1, 1, 1, 3, 1]])
    # Distance 1: item 1 (the query's least sure bit differs), then 5 (the same code: database order), 3, 2.
    assert query_adaptive_ranking(distances, weighted).tolist() == [[0, 1, 5, 3, 2, 4]]
    # A zero output is bit 1 and weighs nothing either way.
    assert weighted_distances(np.array([[0.0, 1.0]]), np.array([[-1, 1], [1, 1]])).tolist() == [[0, 0]]
