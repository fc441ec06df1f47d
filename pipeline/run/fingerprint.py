"""Fingerprints: one digest of everything that decides a stage's outputs, compared to tell whether a finished
stage still holds (the same digest: up to date) or was made from other settings or inputs."""
from __future__ import annotations

import hashlib
import json


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """What differs between two fingerprint bases, as `key: old -> new` lines (nested keys dotted)."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return keys


def normalized(obj):
    """`obj` as the manifest keeps it and reads it back: tuples as lists, other values (paths) as strings. A basis
    is normalized before its digest, so that the digest of the basis read back from a manifest is the same."""
    return json.loads(json.dumps(obj, default=str))
