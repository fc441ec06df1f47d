"""What a training step reads, prepared once from the extract stage's features: the split, the tensors on the
training device, and each epoch's pairs (an image and one of its cached augmented views, a caption and another)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from duch.data.splits import Split, dataset_split, paper_split
from duch.pipeline import DuchError
from duch.pipeline.config import TrainConfig
from duch.pipeline.formats.features import Features
from duch.pipeline.model.noise import swap_captions


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
            raise DuchError("`split` dataset: the dataset has no 'split' field; use `split` paper or all")
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
                            "redo the extract stage with `force`")
    if features.views is None or features.views.shape[1] == 0:
        raise DuchError("the extract run has no augmented image views; redo the extract stage with `image_views` 1 "
                        "or more")
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
