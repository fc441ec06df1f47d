"""DUCH's losses as pure functions of tensors (docs/design.md, 2.4), each pinned by a hand-computed test."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """SimCLR's NT-Xent over N pairs (a_i, b_i): each of the 2N codes is an anchor whose positive is its pair
    and whose negatives are the other 2N - 2; cosine similarity over temperature tau, mean over anchors."""
    return F.cross_entropy(*_nt_xent_logits(a, b, tau))


def weighted_nt_xent(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """nt_xent with pair i's two anchors (a_i and b_i) weighted by weights[i]: the sum of the 2N weighted anchor
    losses over 2N, so weights of one give nt_xent. A pair of weight 0 still serves the others as negatives."""
    losses = F.cross_entropy(*_nt_xent_logits(a, b, tau), reduction="none")
    return (losses * torch.cat([weights, weights])).mean()


def _nt_xent_logits(a: torch.Tensor, b: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = (z @ z.T) / tau
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    # Made on the device: a host-to-device copy would synchronise every step and cannot be graph-captured.
    positives = torch.cat([torch.arange(n, 2 * n, device=sim.device), torch.arange(0, n, device=sim.device)])
    return sim, positives


def all_captions_contrastive(image: torch.Tensor, captions: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Cross-modal InfoNCE with every caption of an item as a positive. image [n, K], captions [n, C, K]. Each
    image is an anchor over the n x C captions with its own C as positives (their probabilities summed inside the
    log); each caption is an anchor over the n images with its own image as the positive. The mean of the two
    directions' mean anchor losses; with C = 1 it is CLIP's symmetric loss on cosines over tau."""
    n, c, k = captions.shape
    zi = F.normalize(image, dim=1)
    zt = F.normalize(captions.reshape(n * c, k), dim=1)
    sim = (zi @ zt.T) / tau  # [n, n x C]
    owner = torch.arange(n, device=sim.device).repeat_interleave(c)
    own = owner[None, :] == torch.arange(n, device=sim.device)[:, None]
    image_to_text = (torch.logsumexp(sim, dim=1) - torch.logsumexp(sim.masked_fill(~own, float("-inf")), dim=1))
    text_to_image = F.cross_entropy(sim.T, owner)
    return (image_to_text.mean() + text_to_image) / 2


def straight_through_sign(h: torch.Tensor) -> torch.Tensor:
    """The bits as retrieval reads them (+1 where h >= 0, as pack_codes), -1/+1, with the identity's gradient:
    the straight-through estimator."""
    return h + ((h >= 0).to(h.dtype) * 2 - 1 - h).detach()


def binary_nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """NT-Xent of the codes' signs: between +-1 codes the cosine is 1 - 2 x Hamming / K, the distance search ranks
    by, where nt_xent sees the continuous codes. Gradients pass the sign straight through, as Greedy Hash (Su et
    al., NeurIPS 2018) trains through sign and CIBHash (Qiu et al., IJCAI 2021) puts its contrastive loss on
    binary codes."""
    return nt_xent(straight_through_sign(a), straight_through_sign(b), tau)


def quantization(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared distance of continuous codes to their binary targets, per bit (/ (batch x K), as the reference)."""
    return ((h - target) ** 2).mean()


def bit_balance(h: torch.Tensor) -> torch.Tensor:
    """(sum_k h_k)^2 per code, / (batch x K): pushes every code to as many +1 as -1 bits."""
    return (h.sum(dim=1) ** 2).mean() / h.shape[1]


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """WGAN-GP term: (||grad critic(x)||_2 - 1)^2 at random interpolates x = eps * real + (1 - eps) * fake."""
    x = (eps * real + (1 - eps) * fake).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    return ((grad.norm(2, dim=1) - 1) ** 2).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy: 'real' codes labelled 1, 'fake' codes 0."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def fooling_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's side: make the discriminator call the fake codes real."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def bank_contrastive(h: torch.Tensor, bank: torch.Tensor, positives: torch.Tensor, tau: float) -> torch.Tensor:
    """Cross-entropy of codes against a bank of binary codes: row i of `h` should pick bank row positives[i].
    Both sides are scaled to unit length, so the logits are cosines over tau."""
    logits = F.normalize(h, dim=1) @ (torch.sign(bank) / bank.shape[1] ** 0.5).T / tau
    return F.cross_entropy(logits, positives)


# Batched forms for the GPU: G losses of one kind in one pass, so a step launches a few larger kernels instead of
# many tiny ones (a step of small matrices on a GPU takes as long as its kernel count). Each equals its single
# form group by group, up to rounding.
def nt_xent_groups(a: torch.Tensor, b: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """[G, N, K] pairs -> [G]: entry g is nt_xent(a[g], b[g], tau)."""
    g, n, _ = a.shape
    z = F.normalize(torch.cat([a, b], dim=1), dim=2)
    sim = (z @ z.transpose(1, 2)) / tau
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n, device=sim.device), torch.arange(0, n, device=sim.device)])
    losses = F.cross_entropy(sim.reshape(g * 2 * n, 2 * n), positives.repeat(g), reduction="none")
    return losses.view(g, 2 * n).mean(dim=1)


def quantization_groups(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[G, N, K] codes, [N, K] targets -> [G]: entry g is quantization(h[g], target)."""
    return ((h - target) ** 2).mean(dim=(1, 2))


def bit_balance_groups(h: torch.Tensor) -> torch.Tensor:
    """[G, N, K] -> [G]: entry g is bit_balance(h[g])."""
    return (h.sum(dim=2) ** 2).mean(dim=1) / h.shape[2]
