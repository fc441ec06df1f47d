"""Wrong captions: made on purpose for a robustness study (CHNR, Mikriukov et al., ICIP 2022, reports DUCH's mAP
as a share of UCM's training captions is swapped for wrong ones), and told from right ones while training."""
from __future__ import annotations

import numpy as np
import torch


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


def clean_probability(agreement: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """[n] image-caption agreements -> [n] probabilities that each pair is right: the posterior of the higher of a
    two-component 1-D Gaussian mixture fitted by EM (started at the quartiles), as NCR (Huang et al., NeurIPS 2021)
    splits clean from noisy pairs by their losses. Networks fit right pairs before they memorise wrong ones, so
    after a few epochs wrong pairs agree less. On the device, no host synchronisation (a CUDA graph run beside it)."""
    x = agreement.double()
    mean = torch.stack([x.quantile(0.25), x.quantile(0.75)])
    var = x.var().expand(2).clone() + 1e-6
    share = torch.full((2,), 0.5, dtype=x.dtype, device=x.device)
    for _ in range(iterations):
        log_density = -0.5 * ((x[:, None] - mean) ** 2 / var + var.log()) + share.log()
        posterior = torch.softmax(log_density, dim=1)
        mass = posterior.sum(0) + 1e-9
        share, mean = mass / len(x), (posterior * x[:, None]).sum(0) / mass
        var = (posterior * (x[:, None] - mean) ** 2).sum(0) / mass + 1e-6
    log_density = -0.5 * ((x[:, None] - mean) ** 2 / var + var.log()) + share.log()
    return torch.softmax(log_density, dim=1).gather(1, mean.argmax().expand(len(x), 1)).squeeze(1).float()
