"""Stage three's outputs: `codes-K.h5` per code length, filled from the parts in archive order (formats/codes.py),
and the faiss index files `encode-archive --index` asks for."""
from __future__ import annotations

import time
from pathlib import Path

import h5py
from tqdm.auto import tqdm

from duch.pipeline.archive.parts import shard_rows
from duch.pipeline.config import EncodeConfig
from duch.pipeline.formats.codes import META, PLACE_EXTRAS, PLACES, CodeWriter, codes_name, open_codes
from duch.pipeline.formats.shards import read_shard
from duch.pipeline.run.records import ExtractRun, ModelFile


def has_places(archive: ExtractRun) -> bool:
    """Whether an extract stage's images are scene tiles, whose places the code files keep."""
    return bool(archive.config.get("tile"))


def place_names(archive: ExtractRun) -> tuple[str, ...]:
    """The place columns an extract stage's image shards hold: PLACES, and the PLACE_EXTRAS its run wrote."""
    if not has_places(archive):
        return ()
    first = next((o for o in archive.outputs if o.modality == "image"), None)
    if first is None:
        return tuple(PLACES)
    with h5py.File(archive.folder / first.file, "r") as f:
        return (*PLACES, *(name for name in PLACE_EXTRAS if name in f))


def merge_parts(parts_dir: Path, archive: ExtractRun, writers: dict[int, CodeWriter], continuous: bool,
                bar: tqdm) -> None:
    """Every code file filled from the parts in archive order; each part is read once for all code lengths."""
    for output in archive.outputs:
        part = read_shard(parts_dir / output.file)
        modality = output.modality
        places = place_names(archive) if modality == "image" else ()
        meta = shard_rows(archive.folder, output, (*META[modality], *places))
        for bits, writer in writers.items():
            arrays = {**meta, "codes": part[f"codes-{bits}"]}
            if continuous:
                arrays["continuous"] = part[f"continuous-{bits}"]
            writer.append(modality, arrays)
        bar.update(len(part[f"codes-{next(iter(writers))}"]))


def write_indexes(out_dir: Path, bits_list: list[int], kind: str, echo) -> dict[int, dict[str, str]]:
    """A faiss index per code length and modality, built from the finished (memory-mapped) code files: {bits:
    {modality: file name}}."""
    from duch.pipeline.formats import faiss_index

    files: dict[int, dict[str, str]] = {}
    for bits in bits_list:
        _, tables = open_codes(out_dir / codes_name(bits), with_meta=False)
        for modality, table in tables.items():
            t = time.perf_counter()
            path = out_dir / faiss_index.index_name(bits, modality)
            faiss_index.write(faiss_index.build(table.codes, kind), path)
            files.setdefault(bits, {})[modality] = path.name
            echo(f"encode-archive: {kind} index of {len(table)} {modality} codes, {bits} bits, in "
                 f"{time.perf_counter() - t:.1f} s -> {path.name}")
    return files


def code_file_done(path: Path, model: ModelFile, attrs: dict, cfg: EncodeConfig) -> bool:
    """A code file left by an interrupted run is kept when it was made by this model from this archive."""
    if not path.exists():
        return False
    try:
        found, tables = open_codes(path, with_meta=False)
    except OSError:
        return False
    has_continuous = all(t.continuous is not None for t in tables.values())
    return (found.get("model_sha256") == model.sha256 and found.get("extract_fingerprint") == attrs[
        "extract_fingerprint"] and int(found.get("image_views", 0)) == attrs["image_views"]
        and has_continuous == cfg.continuous)


def write_code_files(out_dir: Path, parts_dir: Path, archive: ExtractRun, models: dict[int, ModelFile],
                     rows: dict[str, int], continuous: bool, attrs: dict, progress: bool) -> None:
    """One code file per model, filled from the finished parts in one pass; each published when complete, none
    left half written if any fails."""
    writers = {b: CodeWriter(out_dir / codes_name(b), b, rows, continuous, {**attrs, "model_sha256": m.sha256},
                             places=place_names(archive))
               for b, m in models.items()}
    try:
        with tqdm(total=sum(rows.values()), unit="item", desc=f"write {','.join(map(str, models))} bits",
                  disable=not progress, dynamic_ncols=True) as bar:
            merge_parts(parts_dir, archive, writers, continuous, bar)
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
