"""One training step of DUCH: a discriminator step, then a head step on the loss terms (docs/design.md,
"The losses"), written so that a GPU can capture it once as a CUDA graph and replay it (every update in place)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from duch.pipeline.compute.device import autocast_for
from duch.pipeline.config import TrainConfig
from duch.pipeline.model.heads import CodeDiscriminator, DuchHeads
from duch.pipeline.model.losses import (
    all_captions_contrastive,
    bank_contrastive,
    binary_nt_xent,
    bit_balance,
    bit_balance_groups,
    discriminator_loss,
    fooling_loss,
    gradient_penalty,
    nt_xent,
    nt_xent_groups,
    quantization,
    quantization_groups,
    weighted_nt_xent,
)

LOSS_TERMS = ("inter", "inter_extra", "image", "text", "adversarial", "quantization", "balance", "total",
              "discriminator")


def head_codes(heads: DuchHeads, batch, precision: str = "fp32"):
    """The four continuous codes of a batch; the two views of a modality go through their head together."""
    x, xa, t, ta = batch
    n = len(x)
    with autocast_for(x.device, precision):
        image = heads.image(torch.cat([x, xa])).float()
        text = heads.text(torch.cat([t, ta])).float()
    return image[:n], image[n:], text[:n], text[n:]


@torch.no_grad()
def binary_targets(heads: DuchHeads, views, chunk: int = 65536) -> torch.Tensor:
    """sign(sum of the four codes) per item, in chunks: a whole archive at once would not fit on a GPU."""
    heads.eval()
    totals = []
    for start in range(0, len(views[0]), chunk):
        codes = head_codes(heads, [v[start:start + chunk] for v in views])
        totals.append(codes[0] + codes[1] + codes[2] + codes[3])
    heads.train()
    return torch.where(torch.cat(totals) >= 0, 1.0, -1.0)


@dataclass
class StepState:
    """What a training step reads and updates. Every update is in place, so that a step captured once as a CUDA
    graph keeps reading and writing the same memory."""

    heads: DuchHeads
    disc: CodeDiscriminator
    opt: torch.optim.Optimizer
    disc_opt: torch.optim.Optimizer
    views: list[torch.Tensor]  # this epoch's image, augmented view, caption, second caption: [n, D] each
    targets: torch.Tensor  # [n, K] binary targets B, refreshed every epoch
    code_sums: torch.Tensor  # [n, K] each item's four codes summed as last seen: the next epoch's B
    banks: dict | None
    sums: torch.Tensor  # float64 [len(LOSS_TERMS)]: the epoch's loss sums, read once per epoch
    # For w_inter_all: every caption's text-row index per training position [n, C], and the text features.
    caption_rows: torch.Tensor | None = None
    text: torch.Tensor | None = None
    # For robust_inter: each training item's image-caption code cosine as last seen, and its pair's weight.
    agreement: torch.Tensor | None = None
    clean: torch.Tensor | None = None


def paper_terms(codes: tuple[torch.Tensor, ...], b: torch.Tensor, tau: float,
                adversarial: Callable[[], torch.Tensor]) -> dict:
    """DUCH's loss terms of the codes (image, its view, caption, second caption). The adversarial term is made
    where it always was, between the contrastive and the quantization terms: autograd adds a tensor's gradients in
    the order their uses were made, so moving it would change the trained weights' last bits."""
    hi, hia, ht, hta = codes
    return {
        "inter": nt_xent(hi, ht, tau),
        "image": nt_xent(hi, hia, tau),
        "text": nt_xent(ht, hta, tau),
        "adversarial": adversarial(),
        "quantization": sum(quantization(h, b) for h in codes),
        "balance": sum(bit_balance(h) for h in codes),
    }


def fused_paper_terms(codes: tuple[torch.Tensor, ...], b: torch.Tensor, tau: float) -> dict:
    """paper_terms but the adversarial one, from three batched computations instead of eleven (the same values up
    to rounding): the GPU path, whose step time is its kernel count. The CPU keeps paper_terms, so its results stay
    as they were."""
    hi, hia, ht, hta = codes
    inter, image, text = nt_xent_groups(torch.stack([hi, hi, ht]), torch.stack([ht, hia, hta]), tau).unbind()
    stacked = torch.stack(codes)
    return {"inter": inter, "image": image, "text": text,
            "quantization": quantization_groups(stacked, b).sum(), "balance": bit_balance_groups(stacked).sum()}


def fused_terms(terms_of: Callable[..., dict]) -> Callable[..., dict]:
    """paper_terms' interface for fused_paper_terms (or its compiled form, which must not see the discriminator)."""
    def terms(codes, b, tau, adversarial):
        return {**terms_of(codes, b, tau), "adversarial": adversarial()}
    return terms


def with_nested_terms(terms: dict, codes: tuple[torch.Tensor, ...], prefix: int, tau: float, weight: float) -> dict:
    """`terms` with DUCH's three contrastive terms of the codes' first `prefix` bits added to theirs: the prefix is
    trained as a shorter code of its own (Matryoshka-style nested codes, TrainConfig.nested_bits)."""
    hi, hia, ht, hta = (h[:, :prefix] for h in codes)
    out = dict(terms)
    for name, (u, v) in (("inter", (hi, ht)), ("image", (hi, hia)), ("text", (ht, hta))):
        out[name] = terms[name] + weight * nt_xent(u, v, tau)
    return out


def train_step(state: StepState, cfg: TrainConfig, idx: torch.Tensor, eps: torch.Tensor,
               terms_of: Callable[..., dict] = paper_terms) -> None:
    """One discriminator step and one head step on the training items at positions `idx`. eps [len(idx), 1]: the
    gradient penalty's interpolation weights. Nothing here waits for the device: the loss terms are added to
    state.sums in float64, as Python floats were added before, so the history is the same to the bit."""
    device = idx.device
    batch = [v[idx] for v in state.views]
    hi, hia, ht, hta = head_codes(state.heads, batch, cfg.precision)
    real, fake = (hi, ht) if cfg.reference_quirks else (ht, hi)
    disc = state.disc

    d_loss = (discriminator_loss(disc(real.detach()), disc(fake.detach()))
              + cfg.gp_weight * gradient_penalty(disc, real.detach(), fake.detach(), eps))
    state.disc_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    state.disc_opt.step()

    b = state.targets[idx]
    state.code_sums[idx] = (hi + hia + ht + hta).detach()
    terms = terms_of((hi, hia, ht, hta), b, cfg.tau, lambda: fooling_loss(disc(fake)))
    if cfg.nested_bits:
        terms = with_nested_terms(terms, (hi, hia, ht, hta), cfg.nested_bits, cfg.tau, cfg.w_nested)
    if cfg.robust_inter:  # in place of the plain term (computed above with the others, in the fused GPU kernels)
        state.agreement[idx] = (F.normalize(hi.detach(), dim=1) * F.normalize(ht.detach(), dim=1)).sum(dim=1)
        terms["inter"] = weighted_nt_xent(hi, ht, state.clean[idx], cfg.tau)
    # Extra cross-modal positives, off in the paper's setting: weighted here, reported as one term.
    extra = ((cfg.w_inter_second, hi, hta), (cfg.w_inter_views, hia, hta))
    terms["inter_extra"] = sum((w * nt_xent(u, v, cfg.tau) for w, u, v in extra if w),
                               torch.zeros((), device=device))
    if cfg.w_inter_binary:
        terms["inter_extra"] = terms["inter_extra"] + cfg.w_inter_binary * binary_nt_xent(hi, ht, cfg.tau)
    if cfg.w_inter_all:
        rows = state.caption_rows[idx]
        with autocast_for(device, cfg.precision):
            every = state.heads.text(state.text[rows.flatten()]).float().view(*rows.shape, -1)
        terms["inter_extra"] = terms["inter_extra"] + cfg.w_inter_all * all_captions_contrastive(hi, every, cfg.tau)
    if state.banks is not None:
        banks = state.banks
        terms["inter_extra"] = terms["inter_extra"] + cfg.w_bank * (
            bank_contrastive(hi, banks["text"], idx, cfg.bank_tau)
            + bank_contrastive(ht, banks["image"], idx, cfg.bank_tau))
        with torch.no_grad():
            m = cfg.bank_momentum
            banks["image"][idx] = m * banks["image"][idx] + (1 - m) * torch.sign(hi + hia)
            banks["text"][idx] = m * banks["text"][idx] + (1 - m) * torch.sign(ht + hta)
    total = (cfg.w_inter * terms["inter"] + terms["inter_extra"] + cfg.w_image * terms["image"]
             + cfg.w_text * terms["text"]
             + cfg.alpha * terms["adversarial"] + cfg.quantization_weight(b.shape[1]) * terms["quantization"]
             + cfg.gamma * terms["balance"])
    state.opt.zero_grad(set_to_none=True)
    total.backward()
    state.opt.step()
    terms["total"], terms["discriminator"] = total, d_loss
    state.sums += torch.stack([terms[key].detach() for key in LOSS_TERMS]).double()
