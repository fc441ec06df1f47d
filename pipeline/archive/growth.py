"""Growing an encoded archive without coding the rest again: what `duch add`, `remove` and `compact` share.

New items are extracted with the run's recorded settings (encoders, views, seed, augmentation) into a segment
folder of their own and coded there by the run's models (the same library as the extract and encode-archive
stages); a removal is a tombstone in the generation; faiss index files over the whole archive follow. Each
operation ends with one atomic write of the generation (archive.json): the moment readers switch.
"""
from __future__ import annotations

import dataclasses
import filecmp
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from duch.pipeline.archive.generation import BASE, Generation, read_generation, write_generation
from duch.pipeline.archive.segments import ArchiveCodes, open_archive_codes
from duch.pipeline.config import EncodeConfig, ExtractConfig
from duch.pipeline.formats import faiss_index
from duch.pipeline.formats.codes import MODALITIES
from duch.pipeline.run.artifacts import output_record
from duch.pipeline.run.layout import stage_dir
from duch.pipeline.run.records import EncodedRun, ExtractRun, TrainRun

SEGMENTS = "segments"  # RUN/segments/: the segments' folders and the generation's index files


@dataclass
class Archive:
    """A run's encoded archive as the growing operations see it."""

    run: Path
    generation: Generation
    extract: ExtractRun  # the run's own extract stage: the settings new items are extracted with
    encode: EncodedRun  # the run's own encode-archive stage: models, code lengths, continuous, index kind
    model_run: TrainRun
    codes: ArchiveCodes  # images of the shortest code length: ids, paths and tombstones of every row

    @property
    def bits(self) -> list[int]:
        return self.encode.bits

    @property
    def live(self) -> dict[str, int]:
        """Image id -> its row in the archive, for every item not removed."""
        removed = self.codes.removed["image"]
        return {i: r for i, r in self.codes.tables["image"].row_of.items() if not removed[r]}


def open_archive(run: str | Path) -> Archive:
    run = Path(run)
    extract, encode = ExtractRun.read(run, " to grow"), EncodedRun.read(run, " to grow")
    model_run = TrainRun.read(encode.model_run)
    generation = read_generation(run)
    codes = open_archive_codes(run, min(encode.bits), verify=False, generation=generation, modalities=("image",))
    return Archive(run, generation, extract, encode, model_run, codes)


def unchanged(archive: Archive, row: int, new_file: Path) -> bool:
    """Whether the new file of an archived item holds the bytes of the file it was coded from."""
    old = archive.codes.image_path(row)
    return old.is_file() and filecmp.cmp(old, new_file, shallow=False)


def segment_configs(archive: Archive, data: str, images: str | None, folder: Path, runtime: dict,
                    ) -> tuple[ExtractConfig, EncodeConfig]:
    """The settings a segment is made with: the run's recorded extract settings (only where the items are, and
    how the work runs, differ) and its encode-archive's code lengths and continuous outputs (indexes are the
    whole archive's, made apart)."""
    recorded = {k: v for k, v in archive.extract.config.items() if k not in ExtractConfig.RUNTIME_FIELDS}
    how = {k: v for k, v in runtime.items() if k in ExtractConfig.RUNTIME_FIELDS and k != "run"}
    if how.get("runtime", "auto") == "auto":
        # The archive's items were embedded by one runtime (torch before runtimes were recorded): so are the new ones.
        made = set((archive.extract.manifest.get("runtime") or {"image": "torch"}).values())
        how["runtime"] = made.pop() if len(made) == 1 else "auto"
    extract = ExtractConfig(**{**recorded, **how, "data": data, "images": images, "run": str(folder)})
    encode = EncodeConfig(run=str(archive.model_run.run), archive=str(folder), bits=tuple(archive.bits),
                          continuous=archive.encode.continuous, index=None,
                          **{k: v for k, v in runtime.items() if k in ("device", "scheduler", "threads")})
    return extract, encode


def drop_unpublished(run: Path, generation: Generation, keep: str | None = None) -> list[str]:
    """Remove segment folders no generation names (left by a killed add or compact), but `keep`."""
    dropped = []
    for folder in sorted((run / SEGMENTS).glob("[0-9]*")) if (run / SEGMENTS).is_dir() else []:
        name = f"{SEGMENTS}/{folder.name}"
        if folder.is_dir() and name not in generation.segments and name != keep:
            shutil.rmtree(folder)
            dropped.append(name)
    return dropped


def archive_indexes(run: Path, before: Generation, segments: tuple[str, ...], number: int, kind: str | None,
                    bits_list: list[int], echo: Callable[[str], None]) -> dict:
    """The faiss index files over every segment of generation `number` (`kind`: the run's encode-archive --index;
    None: none). flat and ivf take the new segment's codes into the previous generation's index (ivf keeps its
    trained lists); hnsw is built again from every code, and so is any index when segments were merged away.
    Removed items stay in the index: search asks it for k + (items removed) and drops them."""
    if not kind:
        return {}
    out: dict = {}
    appended = segments[:len(before.segments)] == before.segments
    for bits in bits_list:
        codes = open_archive_codes(run, bits, verify=False, with_meta=False,
                                   generation=dataclasses.replace(before, segments=segments, number=number))
        old_codes = None
        for modality in MODALITIES:
            if modality not in codes.tables:
                continue
            table = codes.tables[modality]
            name = f"index-g{number:05d}-{bits}-{modality}.faiss"
            previous = previous_index_file(run, before, bits, modality) if appended and kind != "hnsw" else None
            if previous is not None:
                if old_codes is None:
                    old_codes = open_archive_codes(run, bits, verify=False, generation=before, with_meta=False)
                index = faiss_index.read(previous)
                faiss_index.add(index, table.codes, start=len(old_codes.tables[modality]))
                how = "added to"
            else:
                index = faiss_index.build(table.codes, kind)
                how = "built"
            faiss_index.write(index, run / SEGMENTS / name)
            out.setdefault(str(bits), {})[modality] = {**output_record(run / SEGMENTS, name), "kind": kind}
            echo(f"{kind} index of {len(table)} {modality} codes, {bits} bits, {how} -> {SEGMENTS}/{name}")
    return out


def previous_index_file(run: Path, generation: Generation, bits: int, modality: str) -> Path | None:
    """The index file over every segment of `generation`, if it has one: its own, or the run's encode-archive's
    while the archive is the run's own (generation 0)."""
    listed = generation.indexes.get(str(bits), {}).get(modality)
    if listed:
        return run / SEGMENTS / listed["file"]
    if generation.segments == (BASE,):
        name = EncodedRun.read(run).index_files(bits).get(modality)
        return stage_dir(run, "encode-archive") / name if name else None
    return None


def drop_old_indexes(run: Path, number: int) -> None:
    """Index files of generations before the previous one: no reader loads them any more (a reader of the
    previous generation may still be loading its files)."""
    for path in (run / SEGMENTS).glob("index-g*-*.faiss") if (run / SEGMENTS).is_dir() else []:
        if int(path.name.split("-")[1][1:]) < number - 1:
            path.unlink(missing_ok=True)


def publish(archive: Archive, segments: tuple[str, ...], removed: tuple, echo: Callable[[str], None]) -> Generation:
    """The archive's next generation, listing `segments` and tombstones `removed`: its index files made (the
    run's --index kind, every code length), then published with one atomic write; older index files dropped."""
    before = archive.generation
    number = before.number + 1
    indexes = archive_indexes(archive.run, before, segments, number, archive.encode.config.get("index"),
                              archive.bits, echo)
    after = Generation(number, segments, removed, indexes)
    write_generation(archive.run, after)
    drop_old_indexes(archive.run, number)
    return after
