"""Stage one's plan: the archive cut into fixed shards in dataset order (image shard k holds images [k*S, (k+1)*S),
text shard k caption rows [k*S, (k+1)*S)), and which of them a resumed run still has to make."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from duch.data import Dataset
from duch.data.augment import augment_caption, view_rng
from duch.pipeline.config import ExtractConfig
from duch.pipeline.formats.shards import read_attrs, shard_name


@dataclass(frozen=True)
class TextRow:
    image_id: str
    caption_index: int
    text: str
    augmented: bool  # a rule-based rewrite standing in for a missing second caption


@dataclass
class ShardPlan:
    modality: str  # "image" | "text"
    index: int
    rows: list  # Items for image shards, TextRows for text shards

    @property
    def name(self) -> str:
        return shard_name(self.modality, self.index)


def text_rows(dataset: Dataset, cfg: ExtractConfig) -> list[TextRow]:
    rows = []
    for item in dataset.items:
        for k, caption in enumerate(item.captions):
            rows.append(TextRow(item.id, k, caption, False))
        if len(item.captions) == 1:
            rewrite = augment_caption(item.captions[0], view_rng(cfg.seed, item.id, 1), cfg.text_augment)
            rows.append(TextRow(item.id, 1, rewrite, True))
    return rows


def plan_shards(dataset: Dataset, cfg: ExtractConfig, with_text: bool) -> list[ShardPlan]:
    size = cfg.shard_size
    plans = [ShardPlan("image", k, dataset.items[s:s + size]) for k, s in enumerate(range(0, len(dataset.items), size))]
    if with_text:
        rows = text_rows(dataset, cfg)
        plans += [ShardPlan("text", k, rows[s:s + size]) for k, s in enumerate(range(0, len(rows), size))]
    return plans


def pending_shards(plans: list[ShardPlan], out_dir: Path, fingerprint: str) -> tuple[list[ShardPlan], bool]:
    """(the shards still to make, whether a finished shard of other settings or inputs is in the way): a shard
    on disk is kept when it carries this fingerprint; an unreadable one is removed and made again."""
    pending = []
    for plan in plans:
        path = out_dir / plan.name
        if not path.exists():
            pending.append(plan)
            continue
        try:
            attrs = read_attrs(path)
        except OSError:  # unreadable: treat as not done
            path.unlink()
            pending.append(plan)
            continue
        if attrs.get("fingerprint") != fingerprint:
            return pending, True
    return pending, False
