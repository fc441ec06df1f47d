"""Retrieval quality of an encoded run on its own held-out split, in the published tables' terms.

Class level (when items have labels): the run's query items against its database items, Hamming ranking with
ties in database order, for I->T, T->I, I->I, T->T: mAP@K under both definitions (retrieval/metrics.py),
precision@K, and precision/recall within every Hamming radius. Each image is represented on the text side by
the one caption train-hash drew for it (split.json), as in the paper's protocol.

Instance level: the query items' images against all their captions: Recall@1/5/10 of an image's own captions
(I->T) and of a caption's own image (T->I), by Hamming, by Hamming re-ranked with the continuous outputs
(`rerank` shortlist), and by the continuous outputs alone. With `train-hash --split dataset` the query items are
the dataset's official test split.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from duch.pipeline import DuchError
from duch.pipeline.formats.codes import CodeTable, caption_key
from duch.pipeline.model.coding import unpack_codes
from duch.pipeline.retrieval.hamming import hamming
from duch.pipeline.retrieval.metrics import (
    DIRECTIONS,
    average_precisions,
    cosine,
    map_of_ranking,
    per_class_mean,
    precision_at_k,
    query_adaptive_ranking,
    radius_curves,
    ranking,
    recall_at_k,
    rerank_order,
    weighted_distances,
)

RECALL_KS = (1, 5, 10)


@dataclass
class Side:
    """The codes of one side (query or database) of one modality."""

    codes: np.ndarray  # packed [n, K/8]
    continuous: np.ndarray | None  # [n, K]
    labels: np.ndarray  # [n]
    image_ids: np.ndarray  # [n]

    def signs(self) -> np.ndarray:
        """The codes as +-1 [n, K]."""
        return unpack_codes(self.codes, self.codes.shape[1] * 8)


def _side(table: CodeTable, rows: np.ndarray, labels: np.ndarray, image_ids: np.ndarray) -> Side:
    cont = None if table.continuous is None else np.asarray(table.continuous[rows], np.float32)
    return Side(np.asarray(table.codes[rows]), cont, labels, image_ids)


def _rows(keys: list[str], index: dict[str, int], what: str, run: Path) -> np.ndarray:
    missing = [k for k in keys if k not in index]
    if missing:
        raise DuchError(f"{run}: {len(missing)} {what} of the split have no code (e.g. {missing[0]!r}); the codes "
                        "come from another archive: redo the encode-archive stage with `force`")
    return np.array([index[k] for k in keys], dtype=np.int64)


def live_split(split: dict, tables: dict[str, CodeTable], removed: dict[str, np.ndarray]) -> dict:
    """split.json without the items removed from the archive (`duch remove`): they are never evaluated."""
    row_of = tables["image"].row_of
    gone = {i for i, r in row_of.items() if removed["image"][r]}
    if not gone:
        return split
    keep = {side: [i for i in split[side] if str(i) not in gone] for side in ("train", "query", "database")}
    return {**split, **keep, "eval_caption": [e for e in split["eval_caption"] or [] if str(e[0]) not in gone]}


def gather(tables: dict[str, CodeTable], split: dict, run: Path, removed: dict[str, np.ndarray] | None = None) -> dict:
    """Query/database sides per modality for class level, and the instance-level sets, from split.json; rows of
    removed items (`removed`, per modality) are never taken."""
    images = tables["image"].meta
    image_row, text_row = tables["image"].row_of, tables["text"].row_of
    labels = np.asarray(images["label"]).astype(str)
    text = tables["text"].meta
    eval_caption = {str(i): caption_key(i, c) for i, c in split["eval_caption"] or []}
    out = {}
    for side in ("query", "database"):
        ids = [str(i) for i in split[side]]
        img = _rows(ids, image_row, "images", run)
        cap = _rows([eval_caption.get(i, f"{i}#?") for i in ids], text_row, "captions", run)
        out[side] = {"I": _side(tables["image"], img, labels[img], np.array(ids)),
                     "T": _side(tables["text"], cap, labels[img], np.array(ids))}
    # Instance level: the query images and every real caption of theirs.
    query_ids = set(map(str, split["query"]))
    dead = removed["text"] if removed is not None else np.zeros(len(text["image_id"]), bool)
    caption_rows = np.array([r for r, i in enumerate(text["image_id"]) if str(i) in query_ids and not dead[r]],
                            dtype=np.int64)
    caption_images = np.asarray(text["image_id"])[caption_rows].astype(str)
    img_rows = _rows([str(i) for i in split["query"]], image_row, "images", run)
    caption_labels = labels[[image_row[i] for i in caption_images]] if len(caption_rows) else labels[:0]
    out["instance"] = {"I": _side(tables["image"], img_rows, labels[img_rows], np.array(split["query"]).astype(str)),
                       "T": _side(tables["text"], caption_rows, caption_labels, caption_images)}
    return out


def class_metrics(sides: dict, bits: int, k: int, shortlist: int, ks: list[int]) -> dict:
    out = {}
    for direction in DIRECTIONS:
        src, dst = direction.split("->")
        q, db = sides["query"][src], sides["database"][dst]
        d = hamming(q.codes, db.codes).astype(np.int32)  # signed: negated as scores below
        order = ranking(-d)
        curves = radius_curves(d, q.labels, db.labels, bits)
        aps = {definition: average_precisions(order, q.labels, db.labels, k, definition)
               for definition in ("reference", "textbook")}
        entry = {
            "map": {definition: float(values.mean()) for definition, values in aps.items()},
            # Lowest first: the classes a user should look at (on UCM, medium- against dense-residential).
            "map_per_class": {definition: per_class_mean(values, q.labels) for definition, values in aps.items()},
            "precision_at_k": {"k": ks, "precision": precision_at_k(-d, q.labels, db.labels, ks).tolist()},
            "radius": {name: curve.tolist() for name, curve in curves.items()},
            "precision_within_radius": {str(r): float(curves["precision_all"][r]) for r in range(min(3, bits) + 1)},
        }
        if q.continuous is not None:  # the query's confidence orders equal distances: the database stays binary
            adaptive = query_adaptive_ranking(d, weighted_distances(q.continuous, db.signs()))
            entry["map_adaptive"] = {definition: map_of_ranking(adaptive, q.labels, db.labels, k, definition)
                                     for definition in ("reference", "textbook")}
        if shortlist and q.continuous is not None and db.continuous is not None:
            reranked = rerank_order(d, cosine(q.continuous, db.continuous), shortlist)
            entry["map_rerank"] = {definition: map_of_ranking(reranked, q.labels, db.labels, k, definition)
                                   for definition in ("reference", "textbook")}
        out[direction] = entry
    return out


def instance_metrics(sides: dict, shortlist: int) -> dict:
    images, captions = sides["instance"]["I"], sides["instance"]["T"]
    positive = captions.image_ids[None, :] == images.image_ids[:, None]  # [images, captions]
    d = hamming(images.codes, captions.codes).astype(np.int32)  # signed: negated as scores below
    orders = {"hamming": (ranking(-d), ranking(-d.T))}
    if images.continuous is not None and captions.continuous is not None:
        orders["adaptive"] = (query_adaptive_ranking(d, weighted_distances(images.continuous, captions.signs())),
                              query_adaptive_ranking(d.T, weighted_distances(captions.continuous, images.signs())))
    if shortlist and images.continuous is not None and captions.continuous is not None:
        sim = cosine(images.continuous, captions.continuous)
        orders["rerank"] = (rerank_order(d, sim, shortlist), rerank_order(d.T, sim.T, shortlist))
        orders["continuous"] = (ranking(sim), ranking(sim.T))
    out: dict[str, object] = {"images": len(images.codes), "captions": len(captions.codes)}
    for name, (i2t, t2i) in orders.items():
        recalls = {"I->T": recall_at_k(i2t, positive, RECALL_KS), "T->I": recall_at_k(t2i, positive.T, RECALL_KS)}
        mean = float(np.mean([v for r in recalls.values() for v in r.values()]))
        out[name] = {**recalls, "mean_recall": mean}
    return out


def p_at_k_grid(n: int) -> list[int]:
    grid = [1, 5, 10, 20, 30, 40, 50, 75, 100, 200, 500, 1000, 2000, 5000, 10000]
    return [k for k in grid if k < n] + [n]
