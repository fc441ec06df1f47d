"""Validation during training: the held-out split's codes ranked by Hamming distance, mAP@K of the four
directions, on the training device (the same codes and metric functions as the evaluate stage)."""
from __future__ import annotations

import numpy as np
import torch

from duch.data.splits import Split
from duch.pipeline.model.coding import encode, image_codes
from duch.pipeline.model.heads import DuchHeads
from duch.pipeline.retrieval.metrics import CONFIDENCE_STEPS, DIRECTIONS, map_of_ranking
from duch.pipeline.train.data import TrainData


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
