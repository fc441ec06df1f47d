"""Synthetic extract runs for scale benchmarks: random float16 embeddings in real HDF5 shards with a real manifest.

They stand in for a huge archive without encoding millions of images; the later stages read them exactly as they
read a real extract run. Random unit vectors, one class per 100 items.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from duch.data.augment import ImageAugment
from duch.pipeline.formats.shards import shard_name, write_shard
from duch.pipeline.run.artifacts import sha256_file
from duch.pipeline.run.fingerprint import digest
from duch.pipeline.run.layout import stage_dir
from duch.pipeline.run.manifest import now_iso, write_manifest

SPEC = "synthetic"


def _unit(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16)


def make_extract_run(run: str | Path, n: int, dim: int = 512, captions: int = 0, views: int = 0,
                     shard_size: int = 4096, seed: int = 0, spec: str = SPEC, encoder: dict | None = None,
                     first_id: int = 0, places: bool = False) -> Path:
    """RUN/extract with n images (and `captions` captions each, `views` views each) of `dim`-d embeddings.
    `spec` and `encoder` (its fingerprint, pipeline.encoders.EncoderSpec.fingerprint): the encoder the run claims,
    so that a real encoder of that spec and dimension can extract more items for it (`duch add`); item ids start at
    `first_id`. `places`: the images are scene tiles (extract --tile) of a 0.001-degree grid from lon -121, lat 37
    in EPSG:4326, 1000 tiles a row, dated 2021-06-03, so the code files keep each tile's place."""
    out = stage_dir(run, "extract")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    outputs = []
    fingerprint = digest({"synthetic": n, "dim": dim, "captions": captions, "views": views, "seed": seed,
                          **({"first_id": first_id} if first_id else {})})
    attrs = lambda modality, k, rows: {"modality": modality, "shard": k, "fingerprint": fingerprint,  # noqa: E731
                                       "encoder": spec, "dim": dim, "rows": rows}
    for k, start in enumerate(range(0, n, shard_size)):
        ids = np.arange(start, min(n, start + shard_size)) + first_id
        arrays = {"ids": [str(i) for i in ids], "path": [f"{i}.jpg" for i in ids],
                  "label": [f"class{i // 100}" for i in ids], "split": [""] * len(ids),
                  "emb": _unit(rng, (len(ids), dim)), "reject_id": [], "reject_reason": []}
        if places:
            arrays.update(grid_places(ids))
        if views:
            arrays["views"] = _unit(rng, (len(ids), views, dim))
        path = out / shard_name("image", k)
        write_shard(path, arrays, attrs("image", k, len(ids)))
        outputs.append({"file": path.name, "modality": "image", "rows": len(ids), "bytes": path.stat().st_size,
                        "sha256": sha256_file(path)})
    rows = n * captions
    for k, start in enumerate(range(0, rows, shard_size)):
        r = np.arange(start, min(rows, start + shard_size))
        arrays = {"image_id": [str(i // captions + first_id) for i in r],
                  "caption_index": (r % captions).astype(np.int32),
                  "augmented": np.zeros(len(r), bool), "text": [f"caption {i}" for i in r],
                  "emb": _unit(rng, (len(r), dim)), "reject_id": [], "reject_reason": []}
        path = out / shard_name("text", k)
        write_shard(path, arrays, attrs("text", k, len(r)))
        outputs.append({"file": path.name, "modality": "text", "rows": len(r), "bytes": path.stat().st_size,
                        "sha256": sha256_file(path)})
    encoder = encoder or {"spec": spec}
    settings = {"image_encoder": encoder, "text_encoder": encoder if captions else None}
    basis = json.loads(json.dumps({"settings": settings, "inputs": {"synthetic": fingerprint}}))
    write_manifest(out, {
        "stage": "extract", "created": now_iso(), "fingerprint": fingerprint, "basis": basis,
        "config": {**({"tile": 256} if places else {}),  # scene tiles: encode-archive keeps their places
                   "image_encoder": spec, "text_encoder": spec if captions else None, "image_views": views,
                   # the augmentation an image query's views are drawn with, as extract records it
                   "seed": seed, "image_augment": dataclasses.asdict(ImageAugment())},
        "dataset": {"kind": "synthetic", "source": "synthetic", "images_dir": "synthetic"},
        "encoders": {"image": {"encoder": spec, "dim": dim}, **({"text": {"encoder": spec, "dim": dim}}
                                                                if captions else {})},
        "counts": {"items": n, "images": n, "image_views": views, "captions": rows, "augmented_captions": 0,
                   "rejects": 0, "truncated_captions": 0},
        "outputs": outputs, "rejects": [], "timings": {},
    })
    return out


def grid_places(ids: np.ndarray) -> dict[str, np.ndarray | list]:
    """The place columns (formats/codes.PLACES) of tiles `ids` of a synthetic grid: 0.001 degrees square, 1000 a
    row, from lon -121, lat 37 northwards, in EPSG:4326 (footprint and lon/lat the same corners)."""
    step = 0.001
    west, south = -121 + (ids % 1000) * step, 37 + (ids // 1000) * step
    corners = np.stack([np.stack([west, south + step], 1), np.stack([west + step, south + step], 1),
                        np.stack([west + step, south], 1), np.stack([west, south], 1)], 1)
    n = len(ids)
    return {"scene": ["grid"] * n, "window": np.stack([ids % 1000 * 256, ids // 1000 * 256,
                                                       np.full(n, 256), np.full(n, 256)], 1).astype(np.int64),
            "crs": ["EPSG:4326"] * n, "footprint": corners, "lonlat": corners,
            "bounds": np.stack([west, south, west + step, south + step], 1), "date": ["2021-06-03"] * n,
            "bands": np.tile(np.array([1, 2, 3], np.int32), (n, 1)), "stretch": np.full((n, 2), np.nan)}
