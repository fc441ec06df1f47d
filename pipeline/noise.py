"""Wrong captions on purpose: the noisy image-caption pairs of a robustness study (CHNR, Mikriukov et al.,
ICIP 2022, reports DUCH's mAP as a share of UCM's training captions is swapped for wrong ones)."""
from __future__ import annotations

import numpy as np


def swap_captions(n_items: int, train: np.ndarray, share: float, seed: int) -> np.ndarray:
    """owner [n_items]: whose captions each item trains with. round(share x len(train)) training items, drawn at
    random, pass their captions on in a cycle (the first's go to the second, ..., the last's to the first), so each
    of them gets another item's captions and no caption is lost or doubled; every other item keeps its own. One
    item alone cannot take another's captions without giving its own away, so a share that rounds to one swaps two."""
    owner = np.arange(n_items)
    train = np.asarray(train)
    count = int(round(share * len(train)))
    if count == 1 and len(train) >= 2:
        count = 2
    if count < 2:
        return owner
    chosen = np.random.default_rng(seed).permutation(train)[:count]
    owner[chosen] = np.roll(chosen, 1)
    return owner
