"""Merging segments into one, without the items removed from them: their extract shards' rows and their code
files' rows copied as they are (never coded again, so every kept item keeps its exact bytes), in archive order.

The merged segment is an ordinary one: an extract stage (shards, manifest) and an encode-archive stage (code
files, manifest) that `encode-archive` finds up to date. Its images may come from several folders, so its shards
hold absolute image paths (its images folder is "/").
"""
from __future__ import annotations

import copy

import numpy as np

from duch.pipeline.archive.codefiles import place_names
from duch.pipeline.archive.encoding import relative
from duch.pipeline.archive.growth import Archive
from duch.pipeline.archive.segments import among
from duch.pipeline.formats.codes import META, CodeWriter, codes_name, open_codes
from duch.pipeline.formats.shards import read_attrs, read_shard, shard_name, write_shard
from duch.pipeline.run.fingerprint import digest
from duch.pipeline.run.manifest import library_versions
from duch.pipeline.run.records import EncodedRun, ExtractRun
from duch.pipeline.run.stage import StageFolder, StagePlan

TEXT_COLUMNS = ("image_id", "caption_index", "augmented", "text", "emb")


def merged_extract_plan(archive: Archive, merge: list[str], target: str) -> tuple[StageFolder, StagePlan]:
    """The extract stage of segment `target`, made of the live rows of the `merge` segments' shards."""
    run, removed = archive.run, archive.generation.removed_ids()
    sources = [(segment, ExtractRun.read(run / segment)) for segment in merge]
    basis = {"settings": sources[0][1].settings,  # the encoders and settings every segment shares
             "inputs": {"compacted": [[segment, m.fingerprint] for segment, m in sources],
                        "removed": sorted([s, i] for s in merge for i in removed.get(s, ()))}}
    folder = StageFolder(run / target, "extract")
    size = archive.extract.config["shard_size"]
    return folder, StagePlan(basis, lambda: merged_extract(folder, sources, removed, digest(basis), size))


def merged_extract(folder: StageFolder, sources: list[tuple[str, ExtractRun]], removed: dict[str, set[str]],
                   fingerprint: str, size: int) -> dict:
    rows: dict[str, list[dict]] = {"image": [], "text": []}
    first_attrs: dict[str, dict] = {}
    for segment, extract in sources:
        gone = removed.get(segment, set())
        for output in extract.outputs:
            path = extract.folder / output.file
            first_attrs.setdefault(output.modality, read_attrs(path))
            shard = read_shard(path)
            if output.modality == "image":
                keep = ~among(shard["ids"], gone)
                shard["path"] = np.array([str(extract.images_dir / p) for p in shard["path"]], dtype=object)
                names = [n for n in shard if n not in ("reject_id", "reject_reason", "skipped_id")]
            else:
                keep = ~among(shard["image_id"], gone)
                names = list(TEXT_COLUMNS)
            rows[output.modality].append({n: shard[n][keep] for n in names})
    outputs, counts = [], {"images": 0, "captions": 0, "augmented_captions": 0}
    for modality, parts in rows.items():
        if not parts:
            continue
        merged = {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}
        n = len(next(iter(merged.values())))
        for k, start in enumerate(range(0, max(n, 1), size)):
            arrays = {name: value[start:start + size] for name, value in merged.items()}
            arrays.update({"reject_id": [], "reject_reason": []})
            if modality == "image" and "scene" in merged:
                arrays["skipped_id"] = []
            name = shard_name(modality, k)
            attrs = {**first_attrs[modality], "shard": k, "fingerprint": fingerprint, "rows": min(size, n - start)}
            write_shard(folder.path / name, arrays, attrs)
            outputs.append((name, {"modality": modality, "rows": attrs["rows"]}))
        if modality == "image":
            counts["images"] = n
        else:
            counts["augmented_captions"] = int(merged["augmented"].sum())
            counts["captions"] = n - counts["augmented_captions"]
    first = sources[0][1]
    return dict(
        config=first.config, device="none", versions=library_versions(),
        dataset={"kind": "compacted", "source": ", ".join(s for s, _ in sources), "images_dir": "/"},
        encoders=first.manifest["encoders"], image_decode=None,
        counts={"items": counts["images"], **counts, "image_views": first.image_views, "rejects": 0,
                "truncated_captions": 0},
        outputs=outputs, images_content_sha256=None, rejects=[], timings={},
        execution={"compacted": [s for s, _ in sources]})


def merged_codes_plan(archive: Archive, merge: list[str], target: str, extract: dict) -> tuple[StageFolder, StagePlan]:
    """The encode-archive stage of segment `target`: the `merge` segments' code rows of its items, as they are."""
    run = archive.run
    sources = [EncodedRun.read(run / segment) for segment in merge]
    first = sources[0]
    views = first.views
    basis = {"archive": extract["fingerprint"], "models": {str(b): m.sha256 for b, m in first.models.items()},
             "continuous": first.continuous, "index": None, **({"image_views": views} if views else {})}
    folder = StageFolder(run / target, "encode-archive")
    kept = [place_names(ExtractRun.read(run / s)) for s in merge]  # the columns every merged segment has
    places = tuple(n for n in kept[0] if all(n in k for k in kept)) if all(kept) else ()
    return folder, StagePlan(basis, lambda: merged_codes(folder, archive, merge, sources, extract, places))


def merged_codes(folder: StageFolder, archive: Archive, merge: list[str], sources: list[EncodedRun], extract: dict,
                 places: tuple[str, ...]) -> dict:
    removed, first = archive.generation.removed_ids(), sources[0]
    continuous = first.continuous
    rows = {"image": extract["counts"]["images"]}
    if any("text" in m.rows for m in sources):
        rows["text"] = extract["counts"]["captions"]
    outputs = []
    for bits, model in first.models.items():
        writer = CodeWriter(folder.path / codes_name(bits), bits, rows, continuous,
                            {"extract_fingerprint": extract["fingerprint"], "image_views": first.views,
                             "model_sha256": model.sha256}, places=places)
        try:
            for segment, source in zip(merge, sources):
                _, tables = open_codes(source.folder / codes_name(bits))
                for modality, table in tables.items():
                    owner = "ids" if modality == "image" else "image_id"
                    keep = np.flatnonzero(~among(table.meta[owner], removed.get(segment, ())))
                    names = (*META[modality], *(places if modality == "image" else ()))
                    arrays = {name: np.asarray(table.meta[name])[keep] for name in names}
                    arrays["codes"] = np.asarray(table.codes[keep])
                    if continuous:
                        arrays["continuous"] = np.asarray(table.continuous[keep])
                    writer.append(modality, arrays)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        outputs.append((codes_name(bits), {"bits": bits}))
    models = copy.deepcopy(first.manifest["models"])  # as the first segment lists them, files relative to here
    for entry in models.values():
        entry["file"] = relative(first.folder / entry["file"], folder.path)
    return dict(
        config={**first.config, "archive": str(folder.path.parent), "index": None}, device="none",
        execution={"compacted": merge}, versions=library_versions(), model_run=relative(first.model_run, folder.path),
        archive_run="..", encoders=first.manifest["encoders"], models=models, rows=rows, index=None,
        image_code=first.manifest.get("image_code"), outputs=outputs, timings={})
