"""The in-memory form every dataset reader produces."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class DatasetError(ValueError):
    """A dataset file that cannot be read at all; the message names the file and the line or key."""


@dataclass(frozen=True)
class Item:
    """One archive image and its captions. `image` is relative to the dataset's images folder."""

    id: str
    image: str
    captions: tuple[str, ...] = ()
    split: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class Reject:
    """An item (or caption, `id#k`, or input row) left out of the run, and why."""

    id: str
    reason: str


@dataclass
class Dataset:
    kind: str  # "caption-json", "pairs-jsonl", "pairs-csv", "image-folder"
    source: Path  # the annotation file, or the folder for an image folder
    images_dir: Path
    items: list[Item]
    rejects: list[Reject] = field(default_factory=list)
    # What the caption rules (data/text.py) changed: {"cleaned_captions": n, "capped_captions": m}
    caption_counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_captions(self) -> int:
        return sum(len(item.captions) for item in self.items)

    @property
    def has_captions(self) -> bool:
        return any(item.captions for item in self.items)
