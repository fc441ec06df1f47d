"""The code files of a generation's segments read as one archive: rows in segment order, the removed items
marked, each row's segment known (its images' folder)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from duch.pipeline import DuchError
from duch.pipeline.archive.generation import Generation, read_generation
from duch.pipeline.formats.codes import META, MODALITIES, PLACE_EXTRAS, PLACES, CodeTable, codes_name, open_codes
from duch.pipeline.run.artifacts import verify_listed, verify_output
from duch.pipeline.run.layout import stage_dir
from duch.pipeline.run.manifest import read_manifest
from duch.pipeline.run.records import EncodedRun, ExtractRun


class Stacked:
    """Arrays of equal trailing shape (memory-mapped code files, say) read as one, row after row: len, shape,
    slices and integer or boolean row selections. Nothing is copied until rows are asked for."""

    def __init__(self, parts: list):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.offsets[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            pieces = [p[max(start - a, 0):max(min(stop, b) - a, 0)]
                      for p, a, b in zip(self.parts, self.offsets[:-1], self.offsets[1:]) if a < stop and b > start]
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else self.parts[0][:0]
        if isinstance(key, (int, np.integer)):
            key = int(key) + (len(self) if key < 0 else 0)
            part = int(np.searchsorted(self.offsets, key, side="right")) - 1
            return self.parts[part][key - self.offsets[part]]
        rows = np.asarray(key)
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        part_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for part in np.unique(part_of):
            mask = part_of == part
            out[mask] = np.asarray(self.parts[part][rows[mask] - self.offsets[part]])
        return out


def stack(parts: list):
    return parts[0] if len(parts) == 1 else Stacked(parts)


@dataclass
class ArchiveCodes:
    """One code length of a generation: the tables of every segment as one per modality."""

    generation: Generation
    encoded: list[EncodedRun]  # each segment's encode-archive stage, in segment order (the run's own first)
    tables: dict[str, CodeTable]
    removed: dict[str, np.ndarray]  # [rows] bool per modality: tombstoned (an image and its captions)
    segment_of: dict[str, np.ndarray]  # [rows] int: the segment each row belongs to
    images_dirs: list[Path]  # each segment's images folder (from its extract manifest)

    @functools.cached_property
    def removed_count(self) -> dict[str, int]:
        """Removed rows per modality: counted once, as the generation never changes under a reader."""
        return {modality: int(np.count_nonzero(mask)) for modality, mask in self.removed.items()}

    def image_path(self, row: int) -> Path:
        """The file of the image at `row`, in its segment's images folder."""
        return self.images_dirs[self.segment_of["image"][row]] / self.tables["image"].meta["path"][row]


def open_archive_codes(run: str | Path, bits: int, verify: bool = True, generation: Generation | None = None,
                       with_meta: bool = True, modalities: tuple[str, ...] = MODALITIES) -> ArchiveCodes:
    """Every segment's `codes-{bits}.h5`, checked against its manifest (`verify=False`: sizes only);
    `with_meta=False`: the codes alone (no ids, paths, captions, tombstones), for building an index."""
    run = Path(run)
    generation = generation or read_generation(run)
    removed_ids = generation.removed_ids()
    encoded: list[EncodedRun] = []
    per_segment, images_dirs = [], []
    for segment in generation.segments:
        folder = stage_dir(run / segment, "encode-archive")
        manifest = read_manifest(folder)
        if manifest is None:
            raise DuchError(f"{folder}: no finished encode-archive stage for segment {segment!r} of "
                            f"{run / 'archive.json'}; run the add (or the encode-archive) stage on {run} again")
        record = EncodedRun.of(folder, manifest)
        if encoded and model_sha256(record, bits) != model_sha256(encoded[0], bits):
            raise DuchError(f"{record.folder}: segment {segment!r} was coded by another {bits}-bit model than the "
                            f"rest of the archive; run the encode-archive stage on {run} again to code every "
                            "segment with one")
        listed = verify_listed(record.folder, record.manifest, codes_name(bits), checksum=verify)
        _, tables = open_codes(listed, with_meta, modalities)
        encoded.append(record)
        per_segment.append(tables)
        images_dirs.append(images_dir_of(record.archive_run))
    tables, removed, segment_of = {}, {}, {}
    for modality in [m for m in MODALITIES if any(m in t for t in per_segment)]:
        parts = [t.get(modality) or empty_table(modality, bits, any_continuous(per_segment, modality))
                 for t in per_segment]
        owner_key = "ids" if modality == "image" else "image_id"
        tables[modality] = CodeTable(
            modality, stack([p.codes for p in parts]),
            stack([p.continuous for p in parts]) if all(p.continuous is not None for p in parts) else None,
            {name: np.concatenate([p.meta[name] for p in parts]) for name in meta_names(parts, modality)}
            if with_meta else {})
        segment_of[modality] = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
        removed[modality] = np.zeros(len(segment_of[modality]), bool) if not with_meta else np.concatenate([
            among(p.meta[owner_key], removed_ids.get(segment, ())) for p, segment in zip(parts, generation.segments)])
    return ArchiveCodes(generation, encoded, tables, removed, segment_of, images_dirs)


def model_sha256(encoded: EncodedRun, bits: int) -> str | None:
    model = encoded.models.get(bits)
    return model.sha256 if model else None


def images_dir_of(archive_run: Path) -> Path:
    """The images folder of an extract run ("." where it records none: runs made before it was recorded)."""
    manifest = read_manifest(stage_dir(archive_run, "extract"))
    images_dir = ExtractRun.of(stage_dir(archive_run, "extract"), manifest).images_dir if manifest else None
    return images_dir or Path(".")


def among(ids, removed) -> np.ndarray:
    """[rows] bool: whether each row's id (an image's, or a caption's image's) is one of `removed`."""
    return np.isin(np.asarray(ids).astype(str), sorted(removed))


def verify_generation_index(run: Path, listed: dict, checksum: bool = True) -> Path:
    """A generation's index file, as archive.json lists it ({file, bytes, sha256}: a file of RUN/segments/)."""
    return verify_output(Path(run) / "segments", listed, checksum)


def any_continuous(per_segment: list[dict], modality: str) -> bool:
    return any(t[modality].continuous is not None for t in per_segment if modality in t)


def empty_table(modality: str, bits: int, continuous: bool) -> CodeTable:
    """A segment without items of a modality (images added without captions, say)."""
    meta = {name: np.zeros(0, np.int32 if name == "caption_index" else object) for name in META[modality]}
    return CodeTable(modality, np.zeros((0, bits // 8), np.uint8),
                     np.zeros((0, bits), np.float16) if continuous else None, meta)


def meta_names(parts: list[CodeTable], modality: str) -> list[str]:
    """The metadata every part has: the modality's own, and a scene tile's place where every segment keeps it."""
    extra = [name for name in (*PLACES, *PLACE_EXTRAS) if modality == "image" and all(name in p.meta for p in parts)]
    return [*META[modality], *extra]
