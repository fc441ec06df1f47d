"""Reading a finished extract stage back as arrays: the input of the later stages and of the benchmarks."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from duch.pipeline import DuchError
from duch.pipeline.formats.shards import read_shard
from duch.pipeline.run.artifacts import verify_output
from duch.pipeline.run.records import ExtractRun, redo


@dataclass
class Features:
    ids: np.ndarray  # [N] image ids
    labels: np.ndarray  # [N] class ('' when unknown)
    splits: np.ndarray  # [N] the dataset's own split ('' when none)
    paths: np.ndarray  # [N] image paths, relative to the images folder
    image: np.ndarray  # [N, D]
    views: np.ndarray | None  # [N, V, D]
    text_image_id: np.ndarray  # [M]
    text_caption_index: np.ndarray  # [M]
    text_augmented: np.ndarray  # [M] bool
    text: np.ndarray  # [M] captions
    text_emb: np.ndarray  # [M, Dt]
    extract: ExtractRun  # the extract stage they were read from

    @property
    def manifest(self) -> dict:
        """The extract stage's manifest as read."""
        return self.extract.manifest

    def caption_rows(self) -> list[np.ndarray]:
        """For every image, the indices of its text rows (real captions first, then any rewrite)."""
        index = {image_id: i for i, image_id in enumerate(self.ids)}
        rows: list[list[int]] = [[] for _ in self.ids]
        for row, image_id in enumerate(self.text_image_id):
            if image_id in index:  # captions of an image rejected in extract have no partner
                rows[index[image_id]].append(row)
        return [np.array(r, dtype=np.int64) for r in rows]

    def one_caption_per_image(self, seed: int) -> np.ndarray:
        """One real (not rewritten) caption row per image, drawn at random: the protocol's text of an image."""
        rng = np.random.default_rng(seed)
        out = []
        for image_id, rows in zip(self.ids, self.caption_rows()):
            real = rows[~self.text_augmented[rows]] if len(rows) else rows
            if not len(real):
                raise DuchError(f"image {image_id!r} has no caption; evaluation needs one per image")
            out.append(int(rng.choice(real)))
        return np.array(out, dtype=np.int64)


def load_features(run: str | Path) -> Features:
    extract = ExtractRun.read(run)
    stage = extract.folder
    parts: dict[str, list[dict]] = {"image": [], "text": []}
    dims: dict[str, tuple[str, tuple]] = {}
    for out in extract.outputs:
        assert out.modality is not None  # read_manifest checked every output of an extract stage names one
        verify_output(stage, out.listing())
        shard = read_shard(stage / out.file)
        shape = shard["emb"].shape[1:] + (shard["views"].shape[1:] if "views" in shard else ())
        first = dims.setdefault(out.modality, (out.file, shape))
        if first[1] != shape:
            raise DuchError(f"{stage / out.file}: embeddings of shape {shape} do not match {first[0]}'s "
                            f"{first[1]}; the shards come from different runs, {redo(stage)}")
        parts[out.modality].append(shard)

    def cat(modality, key, empty):
        arrays = [p[key] for p in parts[modality] if key in p]
        return np.concatenate(arrays) if arrays else empty

    no_str = np.array([], dtype=object)
    return Features(
        ids=cat("image", "ids", no_str), labels=cat("image", "label", no_str), splits=cat("image", "split", no_str),
        paths=cat("image", "path", no_str), image=cat("image", "emb", np.zeros((0, 0), np.float16)),
        views=cat("image", "views", None),
        text_image_id=cat("text", "image_id", no_str),
        text_caption_index=cat("text", "caption_index", np.zeros(0, int)),
        text_augmented=cat("text", "augmented", np.zeros(0, bool)), text=cat("text", "text", no_str),
        text_emb=cat("text", "emb", np.zeros((0, 0), np.float16)), extract=extract,
    )
