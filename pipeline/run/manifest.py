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


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
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
        raise DuchError(f"{path}: unreadable manifest ({e}); redo the stage with `force`") from None
    except RecursionError:
        raise DuchError(f"{path}: unreadable manifest (JSON nested deeper than the parser goes); redo the stage "
                        "with `force`") from None
    if not isinstance(manifest, dict):
        raise DuchError(f"{path}: unreadable manifest (a JSON {type(manifest).__name__}, not an object); "
                        "redo the stage with `force`")
    schema = manifest.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise DuchError(f"{path}: unreadable manifest (no schema number); redo the stage with `force`")
    if schema > SCHEMA_VERSION:
        # Guessing at a newer layout could misread it; an older duch cannot know what changed.
        raise DuchError(f"{path} was written by a newer duch (manifest schema {schema}; this duch "
                        f"{own_version()} reads schema {SCHEMA_VERSION} and older); upgrade duch to use this run")
    problem = _field_problem(manifest, REQUIRED.get(Path(stage_dir).name, {}))
    if problem:
        raise DuchError(f"{path}: unreadable manifest ({problem}); redo the stage with `force`")
    return manifest


# A field's kind: one type, or a tuple of the types it may hold (isinstance's second argument).
FieldKind = type | tuple[type, ...]

# What the stages read of each stage's manifest, by dotted path ("*": every entry, "?": only where present): a
# manifest that lacks or mistypes any of it (edited by hand, cut short by another tool) is refused as it is read,
# in one line, never a KeyError deep in a later stage. Every manifest duch ever wrote has these (runs made before
# a field existed lack only what is marked "?").
_RUN_FILES: dict[str, FieldKind] = {"outputs": list, "outputs.*": dict, "outputs.*.file": str,
                                    "outputs.*.bytes": int, "outputs.*.sha256": str}
REQUIRED: dict[str, dict[str, FieldKind]] = {
    "extract": {"fingerprint": str, "basis.settings": dict, "basis.inputs": dict, "config.image_encoder": str,
                "config.text_encoder": (str, type(None)), "config.seed": int, "config.image_augment": dict,
                "counts.images": int, "counts.captions": int, "counts.rejects": int, "counts.image_views?": int,
                "encoders": dict, "encoders.*.encoder": str, "encoders.*.dim": int, "dataset.images_dir?": str,
                **_RUN_FILES, "outputs.*.modality": str, "outputs.*.rows": int},
    "train-hash": {"fingerprint": str, "basis.extract": str, "config": dict, "config.bits": list,
                   "config.view_ensemble?": bool, "results": dict, **_RUN_FILES},
    "encode-archive": {"fingerprint": str, "basis.archive": str, "archive_run": str, "model_run": str,
                       "models": dict, "models.*.file": str, "models.*.sha256": str, "models.*.hidden": int,
                       "encoders": dict, "encoders.*.spec": str, "encoders.*.dim": int, "rows": dict,
                       "image_code?": dict, "image_code.views?": int, "index?": (dict, type(None)), **_RUN_FILES},
}


def _field_problem(manifest: dict, fields: dict[str, FieldKind]) -> str | None:
    """What of `fields` a manifest lacks or mistypes, worded for a message, or None."""
    for dotted, kind in fields.items():
        optional = dotted.endswith("?")
        nodes = [manifest]
        for part in dotted.rstrip("?").split("."):
            found = []
            for node in nodes:
                if part == "*":
                    found += list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else []
                elif isinstance(node, dict) and part in node:
                    found.append(node[part])
                elif not optional:
                    return f"no {dotted}"
            nodes = found
        for value in nodes:
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                return f"{dotted.rstrip('?')} holds {type(value).__name__} {str(value)[:40]!r}"
    return None


def own_version() -> str:
    try:
        return metadata.version("duch")
    except metadata.PackageNotFoundError:
        return "(version unknown)"
