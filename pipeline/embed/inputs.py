"""What stage one's fingerprint knows of its inputs: the annotation by content, the images by (path, size,
modification time), cheap for millions of files; and a digest of the images' bytes kept beside it, which tells
a copied or restored archive (new times, same bytes) from a changed one."""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from duch.data import Dataset
from duch.pipeline import DuchError
from duch.pipeline.run.artifacts import sha256_file
from duch.pipeline.run.fingerprint import changed_keys, digest
from duch.pipeline.run.manifest import write_manifest


def _file_rows(root: str, names: list[str], describe: Callable[[str], tuple], missing: tuple) -> list[tuple]:
    """(name, *describe(path)) per file, (name, *missing) for one that cannot be read."""
    rows = []
    for name in names:
        try:
            rows.append((name, *describe(os.path.join(root, name))))
        except OSError:
            rows.append((name, *missing))
    return rows


def _size_and_mtime(path: str) -> tuple:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def _image_rows(dataset: Dataset, describe: Callable[[str], tuple], missing: tuple, chunk: int,
                bar: tqdm | None = None) -> list[tuple]:
    """_file_rows of every image, in dataset order, `chunk` files to a task on 8 threads: on a shared filesystem
    (NFS, Lustre) every stat or read is a round trip, and a cluster's archive is there."""
    names = image_files(dataset)
    chunks = [names[s:s + chunk] for s in range(0, len(names), chunk)]
    describe_chunk = functools.partial(_file_rows, os.fspath(dataset.images_dir), describe=describe, missing=missing)
    rows = []
    with ThreadPoolExecutor(max_workers=min(8, len(chunks)) or 1) as pool:
        for part in pool.map(describe_chunk, chunks):
            rows += part
            if bar is not None:
                bar.update(len(part))
    return rows


def image_files(dataset: Dataset) -> list[str]:
    """The archive's image files, each once, in dataset order (a scene's tiles share its file)."""
    return list(dict.fromkeys(item.image for item in dataset.items))


def input_fingerprint(dataset: Dataset) -> dict:
    """Annotation by content; images by (path, size, mtime): cheap for millions of files, and it sees edits. A
    STAC catalog by its items' documents (data/stac_scenes.py catalog_digest), not by which files answered."""
    if dataset.catalog:
        return {"kind": dataset.kind, "catalog_sha256": dataset.catalog}
    listing = _image_rows(dataset, _size_and_mtime, (None, None), chunk=4096)
    source = dataset.source if dataset.source.is_file() else None
    out = {
        "kind": dataset.kind,
        "annotation_sha256": sha256_file(source) if source else None,
        "items": len(dataset.items),
        "captions": dataset.n_captions,
        "images_listing_sha256": digest(listing),
    }
    if dataset.scenes:  # a date from a sidecar file is no part of the scene's own bytes
        out["scenes_sha256"] = digest([(s.name, s.date, s.date_source) for s in dataset.scenes])
    return out


def images_content_digest(dataset: Dataset, progress: bool = False) -> str:
    """One digest of every image's path and bytes, in dataset order. Not in the fingerprint (that would mean
    reading the whole archive at every rerun): kept beside it, to tell a copied or restored archive (new
    modification times, the same bytes) from a changed one when the quick listing differs."""
    with tqdm(total=len(image_files(dataset)), unit="img", desc="hashing images", disable=not progress,
              dynamic_ncols=True) as bar:  # on threads: hashlib frees the GIL on large blocks
        return digest(_image_rows(dataset, lambda path: (sha256_file(path),), (None,), chunk=256, bar=bar))


def without_listing(basis: dict) -> dict:
    return {**basis, "inputs": {**basis.get("inputs", {}), "images_listing_sha256": None}}


def relisted_with_same_content(out_dir: Path, previous: dict, basis: dict, dataset: Dataset,
                               echo: Callable[[str], None], progress: bool = False) -> dict | None:
    """The finished stage's manifest if it still holds this archive although the images' quick listing (path,
    size, mtime) changed and nothing else did: their bytes hash as they did at extraction (a copy, a restore from
    backup, a `touch`); else None. The listing is then recorded as confirmed, so the next rerun finds it at once,
    and the stage keeps its fingerprint: the later stages stay up to date too."""
    listing = basis["inputs"]["images_listing_sha256"]
    if "basis" not in previous or without_listing(previous["basis"]) != without_listing(basis):
        return None
    if listing in previous.get("confirmed_listings", []):
        return previous
    if not previous.get("images_content_sha256"):
        return None
    echo(f"extract: the images' sizes or modification times changed since extraction; comparing the contents of "
         f"{len(image_files(dataset))} images with what was extracted")
    if images_content_digest(dataset, progress) != previous["images_content_sha256"]:
        return None
    echo("extract: the images' contents are unchanged; the extracted embeddings still hold")
    confirmed = {**previous, "confirmed_listings": [*previous.get("confirmed_listings", []), listing]}
    write_manifest(out_dir, confirmed)
    return confirmed


def stale_error(out_dir: Path, previous: dict | None, new: dict) -> DuchError:
    detail, old = "", (previous or {}).get("basis")
    if old:
        changes = changed_keys(old, new)
        detail = f" (changed: {'; '.join(changes[:4])}{' ...' if len(changes) > 4 else ''})" if changes else ""
        if without_listing(old) == without_listing(new) and not previous.get("images_content_sha256"):
            detail += (" (made before extract kept a digest of the images' bytes, so an archive copied with new "
                       "modification times cannot be told from an edited one)")
    return DuchError(f"{out_dir} holds embeddings made from other settings or inputs{detail}; "
                     "redo the stage with `force`, or choose another `run` directory")
