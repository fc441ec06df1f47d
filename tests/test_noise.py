import numpy as np
import pytest
import torch

from duch.pipeline.model.noise import clean_probability, swap_captions


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


def test_clean_probability_splits_low_agreement_from_high():
    g = torch.Generator().manual_seed(0)
    right = 0.7 + 0.1 * torch.randn(800, generator=g)
    wrong = 0.1 + 0.1 * torch.randn(200, generator=g)
    p = clean_probability(torch.cat([wrong, right]))
    assert p.shape == (1000,) and p.dtype == torch.float32
    assert float(p[:200].mean()) < 0.03 and float(p[200:].mean()) > 0.99
    # Monotone in the agreement where the two groups meet, and independent of the items' order.
    x = torch.tensor([0.1, 0.3, 0.4, 0.5, 0.7])
    assert torch.all(torch.diff(clean_probability(torch.cat([x, wrong, right]))[:5]) > 0)
    order = torch.randperm(1000, generator=g)
    assert torch.allclose(clean_probability(torch.cat([wrong, right])[order]), p[order], atol=1e-6)
