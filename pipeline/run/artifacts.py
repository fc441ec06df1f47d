"""A stage's outputs as its manifest lists them ({file, bytes, sha256}), and the checks made before reading them.

A manifest is data from disk, maybe from someone else: the files it names are looked up inside its stage folder
only, and a file is read only when it still has the size and SHA-256 the manifest recorded.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from duch.pipeline import DuchError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def output_record(folder: Path, name: str, **extra) -> dict:
    """The manifest's entry for a finished output file of `folder`: its name, `extra` fields, size and SHA-256."""
    path = Path(folder) / name
    return {"file": name, **extra, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def stage_file(stage: Path, name) -> Path:
    """The path of a file a manifest names in its stage folder. A name that is not a plain relative path inside
    the folder ('../../x', '/etc/x', a symlink leading out) is refused, never followed."""
    stage = Path(stage)
    manifest = stage / "manifest.json"
    if not isinstance(name, str) or not name or "\0" in name:
        raise DuchError(f"{manifest} lists an output that is not a file name ({name!r}); redo the {stage.name} "
                        "stage with `force`")
    pure = PurePosixPath(name)
    real_stage = os.path.realpath(stage)
    real = os.path.realpath(stage / pure)
    if pure.is_absolute() or ".." in pure.parts or os.path.commonpath([real_stage, real]) != real_stage:
        raise DuchError(f"{manifest} lists an output outside its stage folder ({name!r}) and is not read; "
                        f"redo the {stage.name} stage with `force`")
    return stage / pure


def verify_output(stage: Path, output: dict, checksum: bool = True) -> Path:
    """A stage's output file must be the one its manifest lists: a truncated or altered file is never read, nor
    a file outside the stage folder. `checksum=False` checks the size only (for a search over billions of codes,
    whose full hash takes minutes)."""
    path = stage_file(stage, output.get("file") if isinstance(output, dict) else None)
    if not path.is_file():
        raise DuchError(f"{path} is missing; rerun `duch {stage.name}` on this run to redo it")
    if path.stat().st_size != output.get("bytes") or (checksum and sha256_file(path) != output.get("sha256")):
        raise DuchError(f"{path} does not match the checksum in {stage / 'manifest.json'} (truncated or altered); "
                        f"rerun `duch {stage.name}` on this run to redo it")
    return path


def verify_listed(stage: Path, manifest: dict, name: str, checksum: bool = True) -> Path:
    """verify_output for the output the manifest lists under `name`."""
    listed = [o for o in manifest.get("outputs", []) if isinstance(o, dict) and o.get("file") == name]
    if not listed:
        raise DuchError(f"{stage / 'manifest.json'} does not list {name}; rerun `duch {stage.name}` on this run")
    return verify_output(stage, listed[0], checksum)


def damaged_outputs(stage: Path, manifest: dict, names: list[str] | None = None) -> list[Path]:
    """A finished stage's outputs that are missing or no longer match their manifest checksum (a later stage
    would refuse them): `names`, the files the stage must have (a name its manifest does not list counts as
    damaged), or by default every output it lists. They are removed so that a rerun writes them again. Hashed on
    threads: hashlib releases the GIL, and an archive's files are many."""
    listed = {o.get("file"): o for o in manifest.get("outputs", []) if isinstance(o, dict)}
    wanted = [(name, listed.get(name)) for name in names] if names is not None else [
        (o.get("file") if isinstance(o, dict) else None, o) for o in manifest.get("outputs", [])]

    def damaged(entry: tuple) -> Path | None:
        name, out = entry
        path = stage_file(stage, name)
        if out and path.is_file() and path.stat().st_size == out.get("bytes") \
                and sha256_file(path) == out.get("sha256"):
            return None
        return path

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        bad = [p for p in pool.map(damaged, wanted) if p is not None]
    for path in bad:
        path.unlink(missing_ok=True)
    return bad
