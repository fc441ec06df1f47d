"""Stage 2: DUCH's hashing heads trained from the cached features, one model per code length.

Per epoch: every training item gets fresh views (one of its cached augmented image views, two of its captions;
seeded), its binary target B = sign(sum of its four continuous codes) is refreshed, then for each batch one
discriminator step and one head step on L = contrastive + alpha adversarial + beta quantization + gamma balance.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data.splits import Split, dataset_split, paper_split
from pipeline import DuchError
from pipeline.config import TrainConfig, digest
from pipeline.checkpoint import load_checkpoint, remove_checkpoint, save_checkpoint
from pipeline.features import Features, load_features, stage_file
from pipeline.hashing import CodeDiscriminator, DuchHeads
from pipeline.encoders.base import autocast_for
from pipeline.losses import (all_captions_contrastive, bank_contrastive, binary_nt_xent, bit_balance,
                             bit_balance_groups, discriminator_loss, fooling_loss, gradient_penalty, nt_xent,
                             nt_xent_groups, quantization, quantization_groups, weighted_nt_xent)
from pipeline.lock import run_lock
from pipeline.manifest import library_versions, now_iso, read_manifest, sha256_file, write_json_atomic, write_manifest
from pipeline.metrics import CONFIDENCE_STEPS, DIRECTIONS, map_of_ranking
from pipeline.noise import clean_probability, swap_captions
from pipeline.rundir import stage_dir
from pipeline.storage import write_errors

STAGE = "train-hash"
LOSS_TERMS = ("inter", "inter_extra", "image", "text", "adversarial", "quantization", "balance", "total",
              "discriminator")


@dataclass
class TrainData:
    """Everything a step needs, as tensors on the training device."""

    image: torch.Tensor  # [N, Di]
    views: torch.Tensor  # [N, V, Di]
    text: torch.Tensor  # [M, Dt]
    captions: torch.Tensor  # [N, C] text-row indices, padded by repeating
    n_captions: torch.Tensor  # [N]


def choose_split(features: Features, cfg: TrainConfig) -> Split:
    n = len(features.ids)
    if cfg.split == "paper":
        split = paper_split(n, cfg.split_seed)
    elif cfg.split == "dataset":
        if (features.splits == "").all():
            raise DuchError("--split dataset: the dataset has no 'split' field; use --split paper or all")
        split = dataset_split(features.splits)
    else:
        split = Split(np.arange(n), np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    if len(split.train) < 2:
        raise DuchError(f"the training split holds {len(split.train)} items; at least 2 are needed")
    return split


def check_features(features: Features) -> None:
    """Refuse what would silently poison training, before any of it starts."""
    for name, array in (("image embeddings", features.image), ("image views", features.views),
                        ("text embeddings", features.text_emb)):
        if array is not None and array.size and not np.isfinite(array).all():
            bad = np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))
            ids = features.ids[bad[:3]] if name != "text embeddings" else features.text_image_id[bad[:3]]
            raise DuchError(f"{name} hold NaN or Inf ({len(bad)} rows, e.g. items {', '.join(map(str, ids))}); "
                            "redo the extract stage with --force")
    if features.views is None or features.views.shape[1] == 0:
        raise DuchError("the extract run has no augmented image views; rerun extract with --image-views 1 or more")
    if not len(features.text_emb):
        raise DuchError("the extract run has no captions; train-hash needs image-caption pairs")


def prepare(features: Features, device: torch.device) -> TrainData:
    rows = features.caption_rows()
    missing = [features.ids[i] for i, r in enumerate(rows) if not len(r)]
    if missing:
        raise DuchError(f"{len(missing)} images have no caption (e.g. {missing[0]!r}); every item needs one")
    width = max(len(r) for r in rows)
    padded = np.stack([np.resize(r, width) for r in rows])
    as_tensor = lambda a, dtype=torch.float32: torch.as_tensor(np.asarray(a), dtype=dtype, device=device)  # noqa: E731
    return TrainData(as_tensor(features.image), as_tensor(features.views), as_tensor(features.text_emb),
                     as_tensor(padded, torch.long), as_tensor([len(r) for r in rows], torch.long))


def with_caption_noise(data: TrainData, split: Split, cfg: TrainConfig) -> tuple[TrainData, np.ndarray]:
    """The data with cfg.caption_noise of the training items given another's captions (pipeline.noise), and
    owner: whose captions each item now has. The text features stay: only which rows an item samples changes."""
    owner = swap_captions(len(data.captions), split.train, cfg.caption_noise, cfg.split_seed)
    if (owner == np.arange(len(owner))).all():
        return data, owner
    rows = torch.as_tensor(owner, device=data.captions.device)
    return dataclasses.replace(data, captions=data.captions[rows], n_captions=data.n_captions[rows]), owner


def _distinct_pair(rand_a: torch.Tensor, rand_b: torch.Tensor, count: torch.Tensor):
    """Two different indices in [0, count) per item (the same one where count is 1)."""
    first = (rand_a * count).long()
    second = (first + 1 + (rand_b * (count - 1).clamp(min=0)).long()) % count
    return first, second


def sample_views(data: TrainData, items: torch.Tensor, gen: torch.Generator, quirks: bool,
                 augment_anchor: bool = False):
    """This epoch's pairs for `items`: image and an augmented view of it, a caption and a different second one.
    With `augment_anchor` the image pair is any two distinct of the original and its cached views."""
    n = len(items)
    device = data.image.device
    rand = torch.rand(5, n, generator=gen).to(device)
    n_views = data.views.shape[1]
    if augment_anchor:
        a, b = _distinct_pair(rand[0], rand[3], torch.full((n,), n_views + 1, device=device))
        stack = lambda k: torch.where((k == 0)[:, None], data.image[items],  # noqa: E731
                                      data.views[items, (k - 1).clamp(min=0)])
        image, view = stack(a), stack(b)
    else:
        image, view = data.image[items], data.views[items, (rand[0] * n_views).long()]
    first, second = _distinct_pair(rand[1], rand[2], data.n_captions[items])
    text1 = data.captions[items, first]
    text2 = text1 if quirks else data.captions[items, second]
    return image, view, data.text[text1], data.text[text2]


def head_codes(heads: DuchHeads, batch, precision: str = "fp32"):
    """The four continuous codes of a batch; the two views of a modality go through their head together."""
    x, xa, t, ta = batch
    n = len(x)
    with autocast_for(x.device, precision):
        image = heads.image(torch.cat([x, xa])).float()
        text = heads.text(torch.cat([t, ta])).float()
    return image[:n], image[n:], text[:n], text[n:]


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "bf16" if native else "fp32"


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


@torch.no_grad()
def encode(head: torch.nn.Module, x: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """The head's outputs in eval mode (BatchNorm's running statistics), leaving the head in the mode it was."""
    was_training = head.training
    head.eval()
    out = torch.cat([head(x[s:s + batch]) for s in range(0, len(x), batch)])
    head.train(was_training)
    return out


@torch.no_grad()
def image_codes(head: torch.nn.Module, image: torch.Tensor, views: torch.Tensor | None) -> torch.Tensor:
    """Continuous codes of images [n, D]: the head's output, or with `views` [n, V, D] its mean over the image and
    the views (TrainConfig.view_ensemble), whose sign is the code. encode-archive calls this too."""
    codes = encode(head, image)
    if views is None or views.shape[1] == 0:
        return codes
    for v in range(views.shape[1]):
        codes += encode(head, views[:, v])
    return codes / (1 + views.shape[1])


def hamming_rankings(query: torch.Tensor, database: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[Q, K] and [N, K] continuous codes -> two [Q, N] rankings of database indices, nearest first in the Hamming
    distance of their bits (1 where h >= 0, as pack_codes): equal distances in database order, and by
    pipeline.metrics.weighted_distances (query-adaptive, as evaluate's query_adaptive_ranking: the same
    whole-number weights, so the same order). The distance (K - q.d) / 2 of the +-1 codes is an exact integer in
    float32, so this ranks as hamming() of the packed codes does, as one matrix product on the codes' device
    instead of a byte-table lookup per pair on the CPU (validation runs every few epochs)."""
    q, d = (torch.where(h >= 0, 1.0, -1.0) for h in (query, database))
    distance = (q.shape[1] - q @ d.T) / 2
    w = torch.round(query.half().abs().float() * CONFIDENCE_STEPS)
    weighted = (w.sum(dim=1, keepdim=True) - (w * q) @ d.T) / 2
    by_weight = torch.argsort(weighted, dim=1, stable=True)
    then_distance = torch.argsort(distance.gather(1, by_weight), dim=1, stable=True)
    return (torch.argsort(distance, dim=1, stable=True).cpu().numpy(),
            by_weight.gather(1, then_distance).cpu().numpy())


def split_codes(heads: DuchHeads, data: TrainData, split: Split, eval_text: torch.Tensor,
                view_ensemble: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Continuous codes of the query and database items, per modality: {"I": (query, database), "T": ...}; an
    item's text is its evaluation caption (eval_text)."""
    device = data.image.device
    q, db = torch.as_tensor(split.query, device=device), torch.as_tensor(split.database, device=device)
    images = lambda rows: image_codes(heads.image, data.image[rows],  # noqa: E731
                                      data.views[rows] if view_ensemble else None)
    return {
        "I": (images(q), images(db)),
        "T": (encode(heads.text, data.text[eval_text[q]]), encode(heads.text, data.text[eval_text[db]])),
    }


def evaluate_codes(heads: DuchHeads, data: TrainData, split: Split, eval_text: torch.Tensor, labels: np.ndarray,
                   k: int, view_ensemble: bool = False) -> dict:
    """mAP@k of the four directions under both definitions, Hamming ranking: "map" with ties in database order,
    "map_adaptive" with ties by the query's confidence (query-adaptive, as `search` ranks)."""
    codes = split_codes(heads, data, split, eval_text, view_ensemble)
    out = {"map": {}, "map_adaptive": {}}
    for direction in DIRECTIONS:
        src, dst = direction.split("->")
        for key, order in zip(("map", "map_adaptive"), hamming_rankings(codes[src][0], codes[dst][1])):
            out[key][direction] = {d: map_of_ranking(order, labels[split.query], labels[split.database], k, d)
                                   for d in ("reference", "textbook")}
    return out


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


class GraphedSteps:
    """`count` consecutive training steps on batches of `size` items, replayed as one CUDA graph: a Python step
    launches hundreds of small kernels, a replay one (a few steps per replay spare the host some launches; on an
    H100 the step is bound by its kernels on the GPU, so 8 steps per replay measured the same as 1). The first
    `warmup` calls run eagerly on a side stream (Adam's state, cuBLAS handles, autograd's buffers and any
    compilation happen there, outside the capture); the next call captures and replays. Every call trains on the
    items it is given: [count x size] positions in the training set, taken in order."""

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], None], count: int, size: int,
                 device: torch.device, warmup: int = 2):
        self.step, self.count, self.size, self.warmup, self.calls, self.graph = step, count, size, warmup, 0, None
        self.idx = torch.zeros(count * size, dtype=torch.long, device=device)
        self.eps = torch.zeros(count * size, 1, device=device)

    def steps(self) -> None:
        for start in range(0, self.count * self.size, self.size):
            self.step(self.idx[start:start + self.size], self.eps[start:start + self.size])

    def __call__(self, idx: torch.Tensor, eps: torch.Tensor) -> None:
        self.idx.copy_(idx)
        self.eps.copy_(eps)
        if self.graph is None and self.calls < self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.steps()
            torch.cuda.current_stream().wait_stream(side)
        elif self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.steps()
        if self.graph is not None:
            self.graph.replay()
        self.calls += 1


STEPS_PER_GRAPH = 8


def graph_chunks(batches: list[tuple[int, int]], most: int = STEPS_PER_GRAPH) -> list[list[tuple[int, int]]]:
    """The epoch's batches in runs of up to `most` consecutive batches of one size: one CUDA graph replay each.
    Batches are contiguous, so a run's items are one slice of the epoch's order."""
    chunks: list[list[tuple[int, int]]] = []
    for a, b in batches:
        last = chunks[-1] if chunks else None
        if last and len(last) < most and last[0][1] - last[0][0] == b - a:
            last.append((a, b))
        else:
            chunks.append([(a, b)])
    return chunks


EpochRunner = Callable[[torch.Tensor, torch.Tensor, list], None]


def epoch_runner(state: StepState, cfg: TrainConfig, graphs: bool, compile_terms: bool = False,
                 terms_of: Callable[..., dict] | None = None) -> EpochRunner:
    """run(order, eps, batches): the epoch's steps, batch (a, b) on the items at order[a:b] with eps[a:b]. Eagerly
    with train_step, or on a GPU as CUDA graphs (one per run length and batch size) of the step with fused loss
    terms, optionally compiled by torch.compile into a few kernels (the discriminator step cannot be: its gradient
    penalty differentiates twice, which torch.compile does not support). terms_of: paper_terms' stand-in on
    either path (bench/closed_routes.py adds terms to DUCH's), None for DUCH's own."""
    if not graphs:
        step = functools.partial(train_step, state, cfg, terms_of=terms_of or paper_terms)

        def run_eager(order: torch.Tensor, eps: torch.Tensor, batches: list) -> None:
            for a, b in batches:
                step(order[a:b], eps[a:b])

        return run_eager
    if terms_of is None:
        fused = torch.compile(fused_paper_terms, dynamic=False, fullgraph=True) if compile_terms else fused_paper_terms
        terms_of = fused_terms(fused)
    step = functools.partial(train_step, state, cfg, terms_of=terms_of)
    captured: dict[tuple[int, int], GraphedSteps] = {}

    def run_graphs(order: torch.Tensor, eps: torch.Tensor, batches: list) -> None:
        for chunk in graph_chunks(batches):
            (a, b), stop = chunk[0], chunk[-1][1]
            key = (len(chunk), b - a)
            if key not in captured:
                captured[key] = GraphedSteps(step, *key, order.device)
            captured[key](order[a:stop], eps[a:stop])

    return run_graphs


def use_graphs(device: torch.device, cfg: TrainConfig) -> bool:
    """CUDA graphs on a GPU unless the config turns them off (a switch for comparisons and debugging)."""
    return device.type == "cuda" and cfg.cuda_graphs


def use_compile(graphs: bool, cfg: TrainConfig) -> bool:
    """torch.compile of the loss terms, with the CUDA graphs only: 10% more steps per second on an H100, after
    some 20 s of compilation per code length, so off by default (it pays off only for long runs)."""
    return graphs and cfg.compile_terms


def make_optimizers(heads: DuchHeads, disc: CodeDiscriminator, cfg: TrainConfig, device: torch.device,
                    graphs: bool) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """DUCH's two Adams. Replayed in a CUDA graph they must be capturable and read the learning rate from a device
    tensor, which StepLR then updates in place (a Python float would be frozen into the graph)."""
    if graphs:
        lr = lambda value: torch.tensor(value, device=device)  # noqa: E731
        extra = {"capturable": True, "fused": True}
    else:
        lr, extra = float, {}
    opt = torch.optim.Adam(heads.parameters(), lr=lr(cfg.lr), weight_decay=cfg.weight_decay, **extra)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=lr(cfg.disc_lr), betas=cfg.disc_betas,
                                weight_decay=cfg.disc_weight_decay, **extra)
    return opt, disc_opt


def epoch_batches(n: int, batch_size: int, drop_last: bool) -> list[tuple[int, int]]:
    """(start, stop) of each batch an epoch trains on, in order: BatchNorm needs 2 items, and drop_last skips a
    short last batch. Only the last batch can be skipped, so the batches trained on cover [0, stop of the last)."""
    batches = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    return [(a, b) for a, b in batches if b - a >= 2 and not (drop_last and b - a < batch_size)]


def epoch_row(epoch: int, sums: torch.Tensor, steps: int) -> dict:
    """The epoch's mean loss terms: the one read of the device per epoch."""
    return {"epoch": epoch, **{k: v / max(steps, 1) for k, v in zip(LOSS_TERMS, sums.tolist())}}


@dataclass
class Checkpoints:
    """Where and under which fingerprint a code length saves its checkpoints, every cfg.checkpoint_every epochs."""

    folder: Path
    fingerprint: str
    echo: Callable[[str], None] = print


def training_state(state: StepState, schedules: list, gen: torch.Generator, log: dict) -> dict:
    """Everything the next epoch reads: weights, BatchNorm statistics, both optimizers' moments and steps, the
    schedules, the random generators, the binary targets and code sums, the banks, and the history so far."""
    return {"heads": state.heads.state_dict(), "disc": state.disc.state_dict(), "opt": state.opt.state_dict(),
            "disc_opt": state.disc_opt.state_dict(), "schedules": [s.state_dict() for s in schedules],
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "targets": state.targets,
            "code_sums": state.code_sums, "banks": state.banks, "agreement": state.agreement, "clean": state.clean,
            "log": log}


def restore_training_state(saved: dict, state: StepState, schedules: list, gen: torch.Generator) -> dict:
    """Put a checkpoint back into the live objects, in place where a CUDA graph may later capture them; returns
    its log (history, evaluations, timings)."""
    state.heads.load_state_dict(saved["heads"])
    state.disc.load_state_dict(saved["disc"])
    for opt, saved_opt in ((state.opt, saved["opt"]), (state.disc_opt, saved["disc_opt"])):
        _load_optimizer(opt, saved_opt)
    for schedule, saved_schedule in zip(schedules, saved["schedules"]):
        schedule.load_state_dict(saved_schedule)
    gen.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    state.targets.copy_(saved["targets"])
    state.code_sums.copy_(saved["code_sums"])
    if state.banks is not None:
        for name, bank in state.banks.items():
            bank.copy_(saved["banks"][name])
    if state.clean is not None:
        state.agreement.copy_(saved["agreement"])
        state.clean.copy_(saved["clean"])
    return saved["log"]


def _load_optimizer(opt: torch.optim.Optimizer, saved: dict) -> None:
    """load_state_dict, keeping learning rates that are device tensors (CUDA-graph Adam) the same tensors: a
    graph reads the lr at the address it was captured with, and StepLR updates it in place."""
    live = [{k: v for k, v in group.items() if isinstance(v, torch.Tensor)} for group in opt.param_groups]
    opt.load_state_dict(saved)
    for group, tensors in zip(opt.param_groups, live):
        for key, tensor in tensors.items():
            tensor.copy_(torch.as_tensor(group[key]))
            group[key] = tensor


def train_bits(bits: int, cfg: TrainConfig, data: TrainData, split: Split, eval_text: torch.Tensor | None,
               labels: np.ndarray, progress: bool, graphs: bool | None = None,
               compile_terms: bool | None = None, checkpoints: Checkpoints | None = None,
               terms_of: Callable[..., dict] | None = None) -> dict:
    """graphs: replay the steps as CUDA graphs (default: on a GPU, see use_graphs); compile_terms: with graphs,
    torch.compile the loss terms (default: see use_compile); checkpoints: save one every cfg.checkpoint_every
    epochs there, and resume from the one found there (None: neither); terms_of: see epoch_runner."""
    device = data.image.device
    graphs = use_graphs(device, cfg) if graphs is None else graphs
    compile_terms = use_compile(graphs, cfg) if compile_terms is None else compile_terms
    torch.manual_seed(cfg.seed)  # weight init
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # views, batches, interpolates
    heads = DuchHeads(data.image.shape[1], data.text.shape[1], bits, cfg.hidden).to(device)
    disc = CodeDiscriminator(bits).to(device)
    opt, disc_opt = make_optimizers(heads, disc, cfg, device, graphs)
    schedules = [torch.optim.lr_scheduler.StepLR(o, cfg.lr_step, cfg.lr_decay) for o in (opt, disc_opt)]
    train = torch.as_tensor(split.train, device=device)
    n = len(train)
    history, evals, epoch_seconds = [], [], []
    evaluate = eval_text is not None and len(split.query) and (labels != "").all()
    t0 = time.perf_counter()
    # B for the first epoch from the initial heads; after that from the codes the heads produced while
    # training the previous epoch (as the reference code does): no extra forward pass over the archive.
    views = sample_views(data, train, gen, cfg.reference_quirks, cfg.augment_anchor)
    targets = binary_targets(heads, views)
    # Banks indexed by position in the training set, started from the first targets.
    banks = {"image": targets.clone(), "text": targets.clone()} if cfg.w_bank else None
    state = StepState(heads, disc, opt, disc_opt, list(views), targets, torch.zeros_like(targets), banks,
                      torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=device),
                      *((data.captions[train], data.text) if cfg.w_inter_all else ()))
    if cfg.robust_inter:
        state.agreement, state.clean = torch.zeros(n, device=device), torch.ones(n, device=device)
    done = 0
    if checkpoints is not None:
        # Everything above is rebuilt as an uninterrupted run builds it (the same draws from the same seeds), then
        # the checkpoint overwrites it with the state after its epoch: the epochs after it run as they would have.
        done, saved = load_checkpoint(checkpoints.folder, checkpoints.fingerprint)
        if done is None:
            if saved != "no checkpoint":
                checkpoints.echo(f"train-hash: {bits} bits: not resuming ({saved}); training from the start")
            done = 0
        else:
            log = restore_training_state(saved, state, schedules, gen)
            history, evals, epoch_seconds = log["history"], log["evals"], log["epoch_seconds"]
            t0 -= log["seconds"]
            checkpoints.echo(f"train-hash: {bits} bits: resuming from the checkpoint after epoch {done} of "
                             f"{cfg.epochs}")
    run_epoch = epoch_runner(state, cfg, graphs, compile_terms, terms_of)
    batches = epoch_batches(n, cfg.batch_size, cfg.drop_last)
    covered = batches[-1][1] if batches else 0
    bar = tqdm(range(done + 1, cfg.epochs + 1), desc=f"{bits} bits", unit="epoch", disable=not progress,
               dynamic_ncols=True, initial=done, total=cfg.epochs)
    for epoch in bar:
        started = time.perf_counter()
        for buffer, view in zip(state.views, sample_views(data, train, gen, cfg.reference_quirks,
                                                          cfg.augment_anchor)):
            buffer.copy_(view)
        order = torch.randperm(n, generator=gen).to(device)
        # The epoch's interpolation weights in one draw: the same numbers, in the same order, as one draw per step.
        eps = torch.rand(covered, 1, generator=gen).to(device)
        state.sums.zero_()
        run_epoch(order, eps, batches)
        for schedule in schedules:
            schedule.step()
        state.targets.copy_(torch.where(state.code_sums >= 0, 1.0, -1.0))
        if cfg.robust_inter and epoch >= cfg.robust_warmup:
            state.clean.copy_(clean_probability(state.agreement))
        row = epoch_row(epoch, state.sums, len(batches))
        epoch_seconds.append(time.perf_counter() - started)
        if not all(math.isfinite(v) for v in row.values()):
            raise DuchError(f"{bits} bits: the loss became NaN/Inf at epoch {epoch}; lower --lr or check features")
        history.append(row)
        if evaluate and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            evals.append({"epoch": epoch, **evaluate_codes(heads, data, split, eval_text, labels, cfg.map_k,
                                                           cfg.view_ensemble)})
        bar.set_postfix(loss=f"{row['total']:.3f}", inter=f"{row['inter']:.3f}", disc=f"{row['discriminator']:.3f}",
                        items_s=f"{epoch * n / (time.perf_counter() - t0):.0f}")
        if checkpoints is not None and cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0 \
                and epoch < cfg.epochs:
            log = {"history": history, "evals": evals, "epoch_seconds": epoch_seconds,
                   "seconds": time.perf_counter() - t0}
            save_checkpoint(checkpoints.folder, epoch, checkpoints.fingerprint,
                            training_state(state, schedules, gen, log))
    bar.close()
    return {"heads": heads, "disc": disc, "history": history, "evals": evals, "seconds": time.perf_counter() - t0,
            "epoch_seconds": epoch_seconds}


# ---------------------------------------------------------------------------------------------- outputs
def save_weights(path: Path, heads: DuchHeads, disc: CodeDiscriminator, metadata: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"image_head.{k}": v for k, v in heads.image.state_dict().items()}
    tensors |= {f"text_head.{k}": v for k, v in heads.text.state_dict().items()}
    tensors |= {f"discriminator.{k}": v for k, v in disc.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    with write_errors(path):
        try:
            # One metadata entry: safetensors writes a map of several in a random order, and the same weights must
            # make the same file (its SHA-256 identifies the model downstream).
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"duch": json.dumps({k: str(v) for k, v in metadata.items()}, sort_keys=True)})
            with open(tmp, "rb+") as raw:
                os.fsync(raw.fileno())
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def load_heads(path: Path, image_dim: int, text_dim: int, bits: int, hidden: int) -> DuchHeads:
    """Tensors only, through safetensors: nothing in the file can run code."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # a file that is not safetensors (a pickle put in its place, say) is refused unread
        raise DuchError(f"{path}: not a safetensors file of duch's ({type(e).__name__}: {e}); rerun "
                        "`duch train-hash --force` to remake it") from None
    heads = DuchHeads(image_dim, text_dim, bits, hidden)
    heads.image.load_state_dict({k[len("image_head."):]: v for k, v in tensors.items() if k.startswith("image_head.")})
    heads.text.load_state_dict({k[len("text_head."):]: v for k, v in tensors.items() if k.startswith("text_head.")})
    return heads.eval()


def write_history(folder: Path, history: list[dict], evals: list[dict], bits: int) -> None:
    with write_errors(folder / "losses.csv"), open(folder / "losses.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", *LOSS_TERMS])
        writer.writeheader()
        writer.writerows(history)
    write_json_atomic(folder / "history.json", {"losses": history, "validation": evals})
    with write_errors(folder / "losses.png"):
        plot_history(folder / "losses.png", history, evals, bits)


def plot_history(path: Path, history: list[dict], evals: list[dict], bits: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(15 if evals else 10, 4))
    for key in ("inter", "inter_extra", "image", "text", "total"):
        axes[0].plot(epochs, [r[key] for r in history], label=key)
    axes[0].set(title=f"{bits} bits: contrastive terms", xlabel="epoch")
    for key in ("adversarial", "quantization", "balance", "discriminator"):
        axes[1].plot(epochs, [r[key] for r in history], label=key)
    axes[1].set(title="adversarial, quantization, balance", xlabel="epoch", yscale="log")
    if evals:
        for direction in DIRECTIONS:
            axes[2].plot([e["epoch"] for e in evals], [e["map"][direction]["reference"] for e in evals],
                         marker="o", label=direction)
        axes[2].set(title="validation mAP@K (reference definition)", xlabel="epoch")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def format_table(results: dict, definition: str = "reference", k: int = 20) -> str:
    """The published tables' layout: one row per direction, one column per code length."""
    bits = sorted(results, key=int)
    lines = [f"{f'mAP@{k} ({definition})':<21}" + "".join(f"{b + ' bits':>10}" for b in map(str, bits))]
    for direction in DIRECTIONS:
        cells = "".join(f"{results[b][direction][definition]:>10.3f}" for b in bits)
        lines.append(f"{direction:<21}{cells}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the stage
@dataclass
class TrainResult:
    stage_dir: Path
    manifest: dict
    did_work: bool


BITS_FILES = ("model.safetensors", "losses.csv", "history.json", "losses.png", "result.json")  # per code length


def _damaged_outputs(out_dir: Path, manifest: dict, bits_list) -> list[tuple[int, Path]]:
    """The files of a finished run's code lengths that are missing, absent from its manifest's outputs or no longer
    match their checksum: a rerun trains those code lengths again (what the errors of later stages tell a user)."""
    listed = {o.get("file"): o for o in manifest.get("outputs", []) if isinstance(o, dict)}
    damaged = []
    for bits in bits_list:
        for name in BITS_FILES:
            path = stage_file(out_dir, f"bits-{bits}/{name}")
            out = listed.get(f"bits-{bits}/{name}")
            if not (out and path.is_file() and path.stat().st_size == out.get("bytes")
                    and sha256_file(path) == out.get("sha256")):
                damaged.append((bits, path))
    return damaged


def train_hash(cfg: TrainConfig, force: bool = False, progress: bool = True,
               echo: Callable[[str], None] = print) -> TrainResult:
    cfg.validate()
    with run_lock(cfg.run, STAGE):
        return _train_hash(cfg, force, progress, echo)


def _train_hash(cfg: TrainConfig, force: bool, progress: bool, echo: Callable[[str], None]) -> TrainResult:
    features = load_features(cfg.run)
    check_features(features)
    split = choose_split(features, cfg)
    out_dir = stage_dir(cfg.run, STAGE)
    from stages.extract import resolve_device

    device = resolve_device(cfg.device)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))
    basis = json.loads(json.dumps({"extract": features.manifest["fingerprint"], "settings": cfg.output_settings()}))
    previous = read_manifest(out_dir)
    if previous and not force and previous.get("fingerprint") == digest(basis):
        damaged = _damaged_outputs(out_dir, previous, cfg.bits)
        if not damaged:
            echo(f"train-hash: up to date in {out_dir}; nothing to do (--force redoes it)")
            echo(format_table({b: r["map"] for b, r in previous["results"].items() if r.get("map")}, k=cfg.map_k))
            return TrainResult(out_dir, previous, did_work=False)
        for bits, path in damaged:  # its code length is trained again below; the others are kept
            echo(f"train-hash: {path} is missing, unlisted or does not match its checksum; training {bits} bits "
                 "again")
            (path.parent / "result.json").unlink(missing_ok=True)
    with write_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "manifest.json").unlink(missing_ok=True)

    data, owner = with_caption_noise(prepare(features, device), split, cfg)
    swapped = np.flatnonzero(owner != np.arange(len(owner)))
    if len(swapped):
        echo(f"train-hash: caption_noise {cfg.caption_noise}: {len(swapped)} of {len(split.train)} training items "
             "train with another item's captions")
    evaluate = len(split.query) > 0 and (features.labels != "").all()
    eval_rows = features.one_caption_per_image(cfg.split_seed) if evaluate else None
    eval_text = torch.as_tensor(eval_rows, device=device) if evaluate else None
    write_json_atomic(out_dir / "split.json", {
        "mode": cfg.split, "seed": cfg.split_seed,
        **{name: features.ids[getattr(split, name)].tolist() for name in ("train", "query", "database")},
        "eval_caption": None if eval_rows is None else [
            [str(features.text_image_id[r]), int(features.text_caption_index[r])] for r in eval_rows],
        **({"captions_swapped": [[str(features.ids[i]), str(features.ids[owner[i]])] for i in swapped]}
           if len(swapped) else {}),
    })
    write_json_atomic(out_dir / "config.json", dataclasses.asdict(cfg))
    results, outputs = {}, []
    for bits in cfg.bits:
        folder = out_dir / f"bits-{bits}"
        bits_basis = {**basis, "bits": bits}
        done = folder / "result.json"
        kept = json.loads(done.read_text()) if done.exists() and not force else None
        if kept and kept.get("fingerprint") == digest(bits_basis) and all((folder / n).is_file() for n in BITS_FILES):
            echo(f"train-hash: {bits} bits already trained, kept")
            results[str(bits)] = kept
            remove_checkpoint(folder)  # left by a kill between result.json and its removal
        else:
            with write_errors(folder):
                folder.mkdir(parents=True, exist_ok=True)
                done.unlink(missing_ok=True)
            if force:
                remove_checkpoint(folder)
            run = train_bits(bits, cfg, data, split, eval_text, features.labels, progress,
                             checkpoints=Checkpoints(folder, digest(bits_basis), echo))
            save_weights(folder / "model.safetensors", run["heads"], run["disc"],
                         {"bits": bits, "hidden": cfg.hidden, "image_dim": data.image.shape[1],
                          "text_dim": data.text.shape[1], "extract_fingerprint": features.manifest["fingerprint"]})
            write_history(folder, run["history"], run["evals"], bits)
            final = run["evals"][-1]["map"] if run["evals"] else None
            results[str(bits)] = {"fingerprint": digest(bits_basis), "bits": bits, "seconds": round(run["seconds"], 2),
                                  "map": final, "map_adaptive": run["evals"][-1].get("map_adaptive") if final else None,
                                  "final_losses": run["history"][-1]}
            write_json_atomic(done, results[str(bits)])
            remove_checkpoint(folder)  # after result.json: a kill before it still finds the checkpoint
            echo(f"train-hash: {bits} bits in {run['seconds']:.1f} s"
                 + (f"; mAP@{cfg.map_k} " + ", ".join(f"{d} {final[d]['reference']:.3f}" for d in DIRECTIONS)
                    if final else ""))
        for name in BITS_FILES:
            path = folder / name
            outputs.append({"file": f"bits-{bits}/{name}", "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    manifest = {
        "stage": STAGE, "created": now_iso(), "fingerprint": digest(basis), "basis": basis,
        "config": dataclasses.asdict(cfg), "device": str(device), "versions": library_versions(),
        "split": {"mode": cfg.split, "train": len(split.train), "query": len(split.query),
                  "database": len(split.database), **({"captions_swapped": len(swapped)} if len(swapped) else {})},
        "results": results, "outputs": outputs,
    }
    write_manifest(out_dir, manifest)
    with_map = {b: r["map"] for b, r in results.items() if r.get("map")}
    if with_map:
        echo(format_table(with_map, "reference", cfg.map_k))
        echo(format_table(with_map, "textbook", cfg.map_k))
    return TrainResult(out_dir, manifest, did_work=True)
