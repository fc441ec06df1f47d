"""Merging segments into one, without the items removed from them: their extract shards' rows and their code
files' rows copied as they are (never coded again, so every kept item keeps its exact bytes), in archive order.

The merged segment is an ordinary one: an extract stage (shards, manifest) and an encode-archive stage (code
files, manifest) that `encode-archive` finds up to date. Its images may come from several folders, so its shards
hold absolute image paths (its images folder is "/").
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from duch.pipeline.archive.codefiles import has_places
from duch.pipeline.archive.encoding import relative
from duch.pipeline.archive.growth import Archive
from duch.pipeline.archive.segments import among
from duch.pipeline.formats.codes import META, PLACES, CodeWriter, codes_name, open_codes
from duch.pipeline.formats.shards import read_attrs, read_shard, shard_name, write_shard
from duch.pipeline.run.fingerprint import digest
from duch.pipeline.run.layout import stage_dir
from duch.pipeline.run.manifest import library_versions, read_manifest
from duch.pipeline.run.stage import StageFolder

TEXT_COLUMNS = ("image_id", "caption_index", "augmented", "text", "emb")


def merge_segments(archive: Archive, merge: list[str], target: str) -> dict:
    """Segment `target` made of the live rows of the `merge` segments; returns its extract manifest."""
    run, removed = archive.run, archive.generation.removed_ids()
    extract = merged_extract(run, merge, removed, run / target, archive.extract["config"]["shard_size"])
    merged_codes(archive, merge, removed, run / target, extract)
    return extract


def merged_extract(run: Path, merge: list[str], removed: dict[str, set[str]], target: Path, size: int) -> dict:
    sources = [(segment, read_manifest(stage_dir(run / segment, "extract"))) for segment in merge]
    folder = StageFolder(target, "extract")
    folder.start()
    basis = {"settings": sources[0][1]["basis"]["settings"],  # the encoders and settings every segment shares
             "inputs": {"compacted": [[segment, m["fingerprint"]] for segment, m in sources],
                        "removed": sorted([s, i] for s in merge for i in removed.get(s, ()))}}
    fingerprint = digest(basis)
    rows: dict[str, list[dict]] = {"image": [], "text": []}
    first_attrs: dict[str, dict] = {}
    for segment, manifest in sources:
        images_dir = Path(manifest["dataset"]["images_dir"])
        gone = removed.get(segment, set())
        for output in manifest["outputs"]:
            path = stage_dir(run / segment, "extract") / output["file"]
            first_attrs.setdefault(output["modality"], read_attrs(path))
            shard = read_shard(path)
            if output["modality"] == "image":
                keep = ~among(shard["ids"], gone)
                shard["path"] = np.array([str(images_dir / p) for p in shard["path"]], dtype=object)
                names = [n for n in shard if n not in ("reject_id", "reject_reason", "skipped_id")]
            else:
                keep = ~among(shard["image_id"], gone)
                names = list(TEXT_COLUMNS)
            rows[output["modality"]].append({n: shard[n][keep] for n in names})
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
            outputs.append(folder.output(name, modality=modality, rows=attrs["rows"]))
        if modality == "image":
            counts["images"] = n
        else:
            counts["augmented_captions"] = int(merged["augmented"].sum())
            counts["captions"] = n - counts["augmented_captions"]
    first = sources[0][1]
    return folder.finish(
        fingerprint=fingerprint, basis=basis, config=first["config"], device="none", versions=library_versions(),
        dataset={"kind": "compacted", "source": ", ".join(merge), "images_dir": "/"}, encoders=first["encoders"],
        image_decode=None,
        counts={"items": counts["images"], **counts, "image_views": first["counts"].get("image_views", 0),
                "rejects": 0, "truncated_captions": 0},
        outputs=outputs, images_content_sha256=None, rejects=[], timings={}, execution={"compacted": merge})


def merged_codes(archive: Archive, merge: list[str], removed: dict[str, set[str]], target: Path,
                 extract: dict) -> dict:
    run = archive.run
    sources = [read_manifest(stage_dir(run / segment, "encode-archive")) for segment in merge]
    first = sources[0]
    folder = StageFolder(target, "encode-archive")
    folder.start()
    views = int((first.get("image_code") or {}).get("views", 0))
    continuous = bool(first["config"].get("continuous"))
    rows = {"image": extract["counts"]["images"]}
    if any("text" in m["rows"] for m in sources):
        rows["text"] = extract["counts"]["captions"]
    outputs = []
    places = all(has_places(read_manifest(stage_dir(run / s, "extract"))) for s in merge)
    for bits_text, model in first["models"].items():
        bits = int(bits_text)
        writer = CodeWriter(folder.path / codes_name(bits), bits, rows, continuous,
                            {"extract_fingerprint": extract["fingerprint"], "image_views": views,
                             "model_sha256": model["sha256"]}, places=places)
        try:
            for segment in merge:
                _, tables = open_codes(stage_dir(run / segment, "encode-archive") / codes_name(bits))
                for modality, table in tables.items():
                    owner = "ids" if modality == "image" else "image_id"
                    keep = np.flatnonzero(~among(table.meta[owner], removed.get(segment, ())))
                    names = (*META[modality], *(PLACES if places and modality == "image" else ()))
                    arrays = {name: np.asarray(table.meta[name])[keep] for name in names}
                    arrays["codes"] = np.asarray(table.codes[keep])
                    if continuous:
                        arrays["continuous"] = np.asarray(table.continuous[keep])
                    writer.append(modality, arrays)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        outputs.append(folder.output(codes_name(bits), bits=bits))
    basis = {"archive": extract["fingerprint"], "models": {b: m["sha256"] for b, m in first["models"].items()},
             "continuous": continuous, "index": None, **({"image_views": views} if views else {})}
    model_run = (stage_dir(run / merge[0], "encode-archive") / first["model_run"]).resolve()
    models = copy.deepcopy(first["models"])
    for entry in models.values():
        entry["file"] = relative(stage_dir(run / merge[0], "encode-archive") / entry["file"], folder.path)
    return folder.finish(
        fingerprint=digest(basis), basis=basis, config={**first["config"], "archive": str(target), "index": None},
        device="none", execution={"compacted": merge}, versions=library_versions(),
        model_run=relative(model_run, folder.path), archive_run="..", encoders=first["encoders"], models=models,
        rows=rows, index=None, image_code=first.get("image_code"), outputs=outputs, timings={})
