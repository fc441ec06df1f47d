"""Stage manifests: written last and atomically, so a manifest on disk means the stage finished."""
from __future__ import annotations

import datetime as _dt
import json
import platform
from importlib import metadata
from pathlib import Path

from duch.pipeline import DuchError
from duch.pipeline.run.storage import atomic_write

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("duch", "torch", "torchvision", "open_clip_torch", "timm", "sentence-transformers", "h5py", "numpy",
                 "pillow", "tifffile"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, obj) -> None:
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=str)
        f.write("\n")


def write_manifest(stage_dir: Path, manifest: dict) -> Path:
    """The one writer of manifest.json. The schema number is always this duch's, first: a "schema" in `manifest`
    (a manifest read back and rewritten, say) is not kept, since read_manifest trusts the number it finds."""
    path = Path(stage_dir) / MANIFEST
    write_json_atomic(path, {"schema": SCHEMA_VERSION, **{k: v for k, v in manifest.items() if k != "schema"}})
    return path


def read_manifest(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DuchError(f"{path}: unreadable manifest ({e}); rerun the stage with --force to redo it") from None
    if not isinstance(manifest, dict):
        raise DuchError(f"{path}: unreadable manifest (a JSON {type(manifest).__name__}, not an object); "
                        "rerun the stage with --force to redo it")
    schema = manifest.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise DuchError(f"{path}: unreadable manifest (no schema number); rerun the stage with --force to redo it")
    if schema > SCHEMA_VERSION:
        # Guessing at a newer layout could misread it; an older duch cannot know what changed.
        raise DuchError(f"{path} was written by a newer duch (manifest schema {schema}; this duch "
                        f"{own_version()} reads schema {SCHEMA_VERSION} and older); upgrade duch to use this run")
    return manifest


def own_version() -> str:
    try:
        return metadata.version("duch")
    except metadata.PackageNotFoundError:
        return "(version unknown)"
