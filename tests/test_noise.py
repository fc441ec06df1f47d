import numpy as np
import pytest

from pipeline.noise import swap_captions


def test_no_share_keeps_every_caption_with_its_image():
    assert swap_captions(6, np.arange(4), 0.0, seed=0).tolist() == [0, 1, 2, 3, 4, 5]
    assert swap_captions(6, np.arange(4), 0.1, seed=0).tolist() == [0, 1, 2, 3, 4, 5]  # rounds to none


@pytest.mark.parametrize("share, count", [(0.5, 5), (1.0, 10), (0.25, 2), (0.06, 2)])
def test_the_share_of_training_items_gets_another_items_captions(share, count):
    train = np.array([1, 3, 4, 6, 7, 9, 11, 12, 14, 15])
    owner = swap_captions(16, train, share, seed=3)
    moved = np.flatnonzero(owner != np.arange(16))
    assert len(moved) == count and set(moved) <= set(train)  # rounded (one would be none: two), training only
    assert sorted(owner[moved]) == sorted(moved)  # captions change hands among the chosen: none lost or doubled
    assert np.array_equal(owner, swap_captions(16, train, share, seed=3))
    assert not np.array_equal(owner, swap_captions(16, train, share, seed=4))


def test_the_cycle_hands_captions_on_in_the_drawn_order():
    owner = swap_captions(4, np.arange(4), 1.0, seed=0)
    order = np.random.default_rng(0).permutation(4)
    for i in range(4):  # item order[i] trains with the captions of order[i - 1]
        assert owner[order[i]] == order[i - 1]
