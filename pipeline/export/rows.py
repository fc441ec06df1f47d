"""An archive's current generation read row by row for export: every live item (removed ones left out) of every
segment, in archive order, a bounded batch at a time, straight from the code files (and the extract shards, for
the embeddings): memory flat in the archive's size.

Each batch holds rows of one modality of one segment. `archive_row` is the row's place among its modality's rows
in the generation (what `ties="order"` orders equal distances by): ORDER BY distance, archive_row in SQL is duch's
own order.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from duch.pipeline import DuchError
from duch.pipeline.archive.parts import shard_rows
from duch.pipeline.archive.segments import among, model_sha256, open_archive_codes
from duch.pipeline.formats.codes import META, MODALITIES, PLACES, codes_name
from duch.pipeline.run.artifacts import verify_listed
from duch.pipeline.run.records import ExtractRun

PLACE_COLUMNS = ("scene", "window", "crs", "lonlat", "bounds", "date")  # what an export keeps of a tile's place


@dataclass
class Batch:
    """Rows of one modality of one segment: numpy arrays (strings as object arrays), one row per item."""

    modality: str
    segment: str
    archive_row: np.ndarray  # [n] int64
    columns: dict[str, np.ndarray]  # ids/path/label or image_id/caption_index/text, codes, places...
    captions: list[list[str]] | None = None  # an image's captions, in archive order (None: text rows)
    continuous: np.ndarray | None = None  # [n, K] float
    embedding: np.ndarray | None = None  # [n, D] float

    def __len__(self) -> int:
        return len(self.archive_row)

    @property
    def ids(self) -> np.ndarray:
        if self.modality == "image":
            return self.columns["ids"]
        return np.array([f"{i}#{int(c)}" for i, c in zip(self.columns["image_id"], self.columns["caption_index"])],
                        dtype=object)

    @property
    def image_ids(self) -> np.ndarray:
        return self.columns["ids" if self.modality == "image" else "image_id"]


@dataclass
class ShardStream:
    """One modality's extract shards read in order, any number of rows at a time (one shard in memory)."""

    folder: Path
    outputs: list
    held: np.ndarray | None = None
    taken: int = 0

    def take(self, n: int) -> np.ndarray:
        pieces = []
        while n:
            if self.held is None or self.taken == len(self.held):
                if not self.outputs:
                    raise DuchError(f"{self.folder}: its shards hold fewer rows than the code file; redo the "
                                    "encode-archive stage with `force`")
                self.held, self.taken = shard_rows(self.folder, self.outputs.pop(0), ("emb",))["emb"], 0
            part = self.held[self.taken:self.taken + n]
            pieces.append(part)
            self.taken += len(part)
            n -= len(part)
        return np.concatenate(pieces) if len(pieces) != 1 else pieces[0]


@dataclass
class Segment:
    name: str
    codes: Path  # its codes-K.h5
    removed: set[str]
    extract: ExtractRun
    rows: dict[str, int] = field(default_factory=dict)


@dataclass
class ExportSource:
    """One code length of a run's current generation, checked as search checks it (manifests, checksums)."""

    run: Path
    bits: int
    generation: int
    segments: list[Segment]
    modalities: tuple[str, ...]
    places: bool  # scene tiles: each image row has a footprint
    continuous: bool  # every segment stored the heads' outputs
    dims: dict[str, int]  # embedding dimension per modality
    model_sha256: str | None
    removed: int  # items removed (images; their captions go with them)
    fingerprints: list[str]  # each segment's encode-archive fingerprint

    @classmethod
    def open(cls, run: str | Path, bits: int, verify: bool = True) -> ExportSource:
        run = Path(run)
        archive = open_archive_codes(run, bits, verify, with_meta=False)
        removed = archive.generation.removed_ids()
        segments = []
        for name, record in zip(archive.generation.segments, archive.encoded):
            path = verify_listed(record.folder, record.manifest, codes_name(bits), checksum=False)
            segments.append(Segment(name, path, removed.get(name, set()), ExtractRun.read(record.archive_run),
                                    dict(record.rows)))
        tables = archive.tables
        return cls(run, bits, archive.generation.number, segments, tuple(m for m in MODALITIES if m in tables),
                   all(_has_places(s.codes) for s in segments),
                   all(t.continuous is not None for t in tables.values()),
                   {m: e.dim for m, e in archive.encoded[0].encoders.items()},
                   model_sha256(archive.encoded[0], bits), len(archive.generation.removed),
                   [e.fingerprint for e in archive.encoded])

    def check_include(self, include: tuple[str, ...]) -> None:
        if "continuous" in include and not self.continuous:
            raise DuchError(f"{self.run}: `include` continuous needs the heads' outputs, and the archive was encoded "
                            "without them; encode it again with `continuous` and `force`, or leave it out")

    def census(self, rows: int = 1 << 16) -> tuple[dict[str, int], list[float] | None]:
        """({modality: live rows}, the lon/lat bbox of every live tile's footprint, None without one), read a
        column or two at a time: what a file's metadata says before its rows are written."""
        counts = dict.fromkeys(self.modalities, 0)
        box = np.array([np.inf, np.inf, -np.inf, -np.inf])
        for segment in self.segments:
            with h5py.File(segment.codes, "r") as f:
                for modality in (m for m in self.modalities if m in f):
                    group = f[modality]
                    owner = group["ids" if modality == "image" else "image_id"]
                    for start in range(0, len(owner), rows):
                        live = ~among(owner.asstr()[start:start + rows], segment.removed) if segment.removed else \
                            np.ones(len(owner[start:start + rows]), bool)
                        counts[modality] += int(live.sum())
                        if modality == "image" and self.places:
                            bounds = group["bounds"][start:start + rows][live]
                            bounds = bounds[np.isfinite(bounds).all(axis=1)]
                            if len(bounds):
                                box = np.concatenate([np.minimum(box[:2], bounds[:, :2].min(0)),
                                                      np.maximum(box[2:], bounds[:, 2:].max(0))])
        return counts, [float(v) for v in box] if np.isfinite(box).all() else None

    def batches(self, rows: int, include: tuple[str, ...] = ()) -> Iterator[Batch]:
        """Every live row, modality by modality (images first), segment by segment, `rows` at most per batch."""
        for modality in self.modalities:
            base = 0
            for segment in self.segments:
                with h5py.File(segment.codes, "r") as f:
                    if modality in f:
                        yield from self._segment(f, segment, modality, base, rows, include)
                        base += len(f[modality]["codes"])

    def _segment(self, f: h5py.File, segment: Segment, modality: str, base: int, rows: int,
                 include: tuple[str, ...]) -> Iterator[Batch]:
        group = f[modality]
        n = len(group["codes"])
        names = (*META[modality], *(PLACE_COLUMNS if modality == "image" and self.places else ()))
        embeddings = (ShardStream(segment.extract.folder, list(segment.extract.shards(modality)))
                      if "embeddings" in include else None)
        captions = _CaptionCursor(f["text"]) if modality == "image" and "text" in f else None
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            columns = {name: _read(group[name], start, stop) for name in names}
            columns["codes"] = group["codes"][start:stop]
            owner = columns["ids" if modality == "image" else "image_id"]
            keep = ~among(owner, segment.removed) if segment.removed else np.ones(stop - start, bool)
            batch = Batch(modality, segment.name, base + np.arange(start, stop, dtype=np.int64),
                          columns, captions.of(owner) if captions else None,
                          group["continuous"][start:stop] if "continuous" in include else None,
                          embeddings.take(stop - start) if embeddings else None)
            yield _select(batch, keep)


def _read(dataset: h5py.Dataset, start: int, stop: int) -> np.ndarray:
    if h5py.check_string_dtype(dataset.dtype):
        return dataset.asstr()[start:stop].astype(object)
    return dataset[start:stop]


def _select(batch: Batch, keep: np.ndarray) -> Batch:
    if keep.all():
        return batch
    return Batch(batch.modality, batch.segment, batch.archive_row[keep], {k: v[keep] for k, v in batch.columns.items()},
                 None if batch.captions is None else [c for c, k in zip(batch.captions, keep) if k],
                 None if batch.continuous is None else batch.continuous[keep],
                 None if batch.embedding is None else batch.embedding[keep])


class _CaptionCursor:
    """Each image's captions, read alongside the images: extract writes a segment's captions in its images' order
    (plan.text_plans), so the captions of a batch of images are the next rows of the caption table."""

    def __init__(self, group: h5py.Group):
        self.image_id, self.text = group["image_id"], group["text"]
        self.at, self.n = 0, len(self.image_id)

    def of(self, ids: np.ndarray) -> list[list[str]]:
        wanted = {str(i): [] for i in ids}  # type: dict[str, list[str]]
        while self.at < self.n:
            stop = min(self.n, self.at + 4 * len(ids) + 64)
            owners = self.image_id.asstr()[self.at:stop]
            inside = np.fromiter((o in wanted for o in owners), bool, len(owners))
            count = len(owners) if inside.all() else int(np.argmin(inside))
            for owner, text in zip(owners[:count], self.text.asstr()[self.at:self.at + count]):
                wanted[owner].append(text)
            self.at += count
            if count < len(owners):
                break
        return [wanted[str(i)] for i in ids]


def _has_places(path: Path) -> bool:
    """Whether a code file's images are scene tiles with a place (read without reading the rows)."""
    with h5py.File(path, "r") as f:
        return "image" in f and all(name in f["image"] for name in PLACES)
