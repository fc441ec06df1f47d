"""Stage one's plan: the archive cut into fixed shards in dataset order (image shard k holds images [k*S, (k+1)*S),
text shard k caption rows [k*S, (k+1)*S) of the images the image shards kept), and which of them a resumed run
still has to make."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py

from duch.data import Dataset
from duch.data.augment import augment_caption, view_rng
from duch.data.stac import UNREACHABLE
from duch.pipeline.config import ExtractConfig
from duch.pipeline.formats.shards import read_attrs, read_shard, shard_name


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


def text_rows(dataset: Dataset, cfg: ExtractConfig, rejected: frozenset[str] = frozenset()) -> list[TextRow]:
    """Every caption row of the archive but those of `rejected` images: a caption goes with its image."""
    rows = []
    for item in dataset.items:
        if item.id in rejected:
            continue
        for k, caption in enumerate(item.captions):
            rows.append(TextRow(item.id, k, caption, False))
        if len(item.captions) == 1:
            rewrite = augment_caption(item.captions[0], view_rng(cfg.seed, item.id, 1), cfg.text_augment)
            rows.append(TextRow(item.id, 1, rewrite, True))
    return rows


def image_plans(dataset: Dataset, cfg: ExtractConfig) -> list[ShardPlan]:
    """Shards of `shard_size` items in dataset order; of a STAC catalog, one shard per item (numbered by its place
    in the catalog), so that a rerun makes only the items that failed, and a cluster runs one task per item."""
    if dataset.catalog:
        by_slot: dict[int, list] = {}
        for item in dataset.items:
            by_slot.setdefault(item.tile.scene.slot, []).append(item)
        return [ShardPlan("image", slot, rows) for slot, rows in by_slot.items()]
    size = cfg.shard_size
    return [ShardPlan("image", k, dataset.items[s:s + size]) for k, s in enumerate(range(0, len(dataset.items), size))]


def text_plans(dataset: Dataset, cfg: ExtractConfig, rejected: frozenset[str] = frozenset()) -> list[ShardPlan]:
    """The caption shards, planned once the image shards are made: the captions of the images they rejected are
    left out, so that every caption row has its image."""
    size, rows = cfg.shard_size, text_rows(dataset, cfg, rejected)
    return [ShardPlan("text", k, rows[s:s + size]) for k, s in enumerate(range(0, len(rows), size))]


def plan_shards(dataset: Dataset, cfg: ExtractConfig, with_text: bool,
                rejected: frozenset[str] = frozenset()) -> list[ShardPlan]:
    return image_plans(dataset, cfg) + (text_plans(dataset, cfg, rejected) if with_text else [])


class ForeignShards(Exception):
    """A finished shard made from other settings or inputs is in the stage folder."""


class ExtractPlan:
    """The shards of one extract and which are still to make: the image shards at once, the caption shards once
    the image shards are made (`pending_texts`), without the captions of the images those rejected."""

    def __init__(self, dataset: Dataset, cfg: ExtractConfig, out_dir: Path, fingerprint: str, with_text: bool):
        self.dataset, self.cfg, self.out_dir, self.fingerprint = dataset, cfg, out_dir, fingerprint
        self.with_text = with_text
        self.images = image_plans(dataset, cfg)
        self.texts: list[ShardPlan] | None = None
        self._pending_texts: list[ShardPlan] = []

    def pending_images(self) -> list[ShardPlan]:
        pending, foreign = pending_shards(self.images, self.out_dir, self.fingerprint)
        if foreign or foreign_shards(self.out_dir, "text", self.fingerprint):
            raise ForeignShards()
        return pending

    def pending_texts(self) -> list[ShardPlan]:
        """The caption shards still to make; planned on the first call, which must come after the image shards."""
        if self.texts is None:
            rejected = rejected_images(self.images, self.out_dir)
            self.texts = text_plans(self.dataset, self.cfg, rejected) if self.with_text else []
            self._pending_texts, foreign = pending_shards(self.texts, self.out_dir, self.fingerprint)
            if foreign:
                raise ForeignShards()
        return self._pending_texts

    def resume_note(self, pending_images: list[ShardPlan]) -> str | None:
        """What a resumed run says it keeps. While image shards are pending the captions' count assumes the images
        still to make are kept (their rejects, if any, leave out a few caption shards)."""
        total = len(self.images)
        finished = total - len(pending_images)
        if not pending_images:
            pending_texts = self.pending_texts()
            total += len(self.texts)
            finished += len(self.texts) - len(pending_texts)
        elif self.with_text:
            finished += len(list(self.out_dir.glob("text-*.h5")))
            if finished == 0:  # a fresh run says nothing: no need to plan every caption row to count its shards
                return None
            total += len(text_plans(self.dataset, self.cfg, rejected_images(self.images, self.out_dir)))
        if finished == 0:
            return None
        return f"resuming, {finished} of {total} shards already finished"

    @property
    def shards(self) -> list[ShardPlan]:
        return self.images + (self.texts or [])


def rejected_images(plans: list[ShardPlan], out_dir: Path) -> frozenset[str]:
    """The ids of the images that the finished image shards among `plans` rejected."""
    rejected: set[str] = set()
    for plan in plans:
        if (out_dir / plan.name).exists():
            rejected.update(read_shard(out_dir / plan.name, ("reject_id",))["reject_id"])
    return frozenset(rejected)


def pending_shards(plans: list[ShardPlan], out_dir: Path, fingerprint: str) -> tuple[list[ShardPlan], bool]:
    """(the shards still to make, whether a finished shard of other settings or inputs is in the way): a shard
    on disk is kept when it carries this fingerprint (and, for captions, holds the planned rows); an unreadable one
    is removed and made again."""
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
        if plan.modality == "image" and retriable(read_shard(path, ("reject_reason",))["reject_reason"]):
            path.unlink()  # a tile the server failed to serve: the shard is made again
            pending.append(plan)
            continue
        if plan.modality == "text" and not _holds_rows(path, plan, attrs):
            # a caption shard written before captions followed their image: its rows are shifted
            path.unlink()
            pending.append(plan)
    return pending, False


def retriable(reasons) -> bool:
    """Whether rejects include one a rerun tries again: a file the server failed to serve (data/windows.py)."""
    return any(str(r).startswith(UNREACHABLE) for r in reasons)


def foreign_shards(out_dir: Path, modality: str, fingerprint: str) -> bool:
    """Whether a shard of `modality` in the folder was made from other settings or inputs."""
    for path in sorted(out_dir.glob(f"{modality}-*.h5")):
        try:
            if read_attrs(path).get("fingerprint") != fingerprint:
                return True
        except OSError:  # unreadable: pending_shards removes it when its turn comes
            continue
    return False


def made_runtime(out_dir: Path, manifest: dict | None) -> str | None:
    """The one runtime the extraction in `out_dir` was made with: its manifest's, else its shards' (torch where
    none is recorded, as before runtimes were); None for an empty folder or one of two runtimes."""
    if manifest is not None:
        made = set((manifest.get("runtime") or {"image": "torch"}).values())
    else:
        made = set()
        for path in sorted(out_dir.glob("*-*.h5")):
            try:
                made.add(read_attrs(path).get("runtime", "torch"))
            except OSError:
                continue
    return made.pop() if len(made) == 1 else None


def mixed_runtime(out_dir: Path, runtimes: dict[str, str]) -> str | None:
    """What a shard of the folder made by another runtime than `runtimes` (modality -> "torch"/"onnx") gives for
    this run, as a refusal's words; None if none was."""
    for modality, runtime in runtimes.items():
        for path in sorted(out_dir.glob(f"{modality}-*.h5")):
            try:
                made = read_attrs(path).get("runtime", "torch")
            except OSError:
                continue
            if made != runtime:
                return (f"{out_dir} holds {modality} shards embedded with the {made} runtime, and this run would "
                        f"embed the rest with {runtime}; one run's embeddings come from one runtime, so they are not "
                        f"mixed: resume with `runtime` {made}, or redo the stage with `force`")
    return None


def _holds_rows(path: Path, plan: ShardPlan, attrs: dict) -> bool:
    """Whether a caption shard holds the plan's rows: rows are a contiguous run of one ordered list that later
    plans only leave rows out of, so the same count and the same first and last rows mean the same rows."""
    if int(attrs.get("rows", -1)) != len(plan.rows):
        return False
    with h5py.File(path, "r") as f:
        ends = [(f["image_id"].asstr()[i], int(f["caption_index"][i])) for i in (0, -1)]
    return ends == [(plan.rows[i].image_id, plan.rows[i].caption_index) for i in (0, -1)]
