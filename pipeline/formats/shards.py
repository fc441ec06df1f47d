"""HDF5 shards: one writer each, written under a temporary name and published when complete (atomic_write).

Image shard  `image-NNNNN.h5`: ids, path, label, split [n] strings; emb [n, D]; views [n, V, D] when V > 0.
Text shard   `text-NNNNN.h5`:  image_id, text [n] strings; caption_index [n] int32; augmented [n] bool
             (a rule-based rewrite standing in for a missing second caption); emb [n, D].
Both: reject_id, reject_reason [r] strings; attrs: modality, shard, fingerprint, encoder, dim.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from duch.pipeline.run.storage import atomic_write

STRING = h5py.string_dtype(encoding="utf-8")


def shard_name(modality: str, index: int) -> str:
    return f"{modality}-{index:05d}.h5"


def write_shard(path: Path, arrays: dict[str, np.ndarray | list], attrs: dict) -> None:
    """Write a whole shard, then publish it under its name (atomic_write): never a half shard under the name."""
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        for name, value in arrays.items():
            if isinstance(value, list) or (isinstance(value, np.ndarray) and value.dtype.kind in "OU"):
                f.create_dataset(name, data=np.asarray(value, dtype=object), dtype=STRING)
            else:
                f.create_dataset(name, data=value)
        for key, value in attrs.items():
            f.attrs[key] = value


def read_attrs(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def read_shard(path: Path, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Whole datasets of a finished shard; strings come back as Python str."""
    out = {}
    with h5py.File(path, "r") as f:
        for name in names or tuple(f.keys()):
            ds = f[name]
            out[name] = ds.asstr()[()] if h5py.check_string_dtype(ds.dtype) else ds[()]
    return out
