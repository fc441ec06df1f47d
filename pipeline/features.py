"""Reading a finished extract stage back as arrays: the input of the later stages and of the benchmarks."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from pipeline import DuchError
from pipeline.manifest import read_manifest, sha256_file
from pipeline.rundir import stage_dir
from pipeline.shards import read_shard


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
    manifest: dict

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


def stage_file(stage: Path, name) -> Path:
    """The path of a file a manifest names in its stage folder. A manifest is data from disk, maybe from someone
    else: a name that is not a plain relative path inside the folder ('../../x', '/etc/x', a symlink leading out)
    is refused, never followed."""
    stage = Path(stage)
    manifest = stage / "manifest.json"
    if not isinstance(name, str) or not name or "\0" in name:
        raise DuchError(f"{manifest} lists an output that is not a file name ({name!r}); rerun `duch {stage.name} "
                        "--force` to redo the stage")
    pure = PurePosixPath(name)
    real_stage = os.path.realpath(stage)
    real = os.path.realpath(stage / pure)
    if pure.is_absolute() or ".." in pure.parts or os.path.commonpath([real_stage, real]) != real_stage:
        raise DuchError(f"{manifest} lists an output outside its stage folder ({name!r}) and is not read; "
                        f"rerun `duch {stage.name} --force` to redo the stage")
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


def damaged_outputs(stage: Path, manifest: dict) -> list[Path]:
    """A finished stage's outputs that are missing or no longer match their manifest checksum (a later stage
    would refuse them); they are removed so that a rerun writes them again. Hashed on threads: hashlib releases
    the GIL, and an archive's files are many."""
    from concurrent.futures import ThreadPoolExecutor

    def damaged(out: dict) -> Path | None:
        path = stage_file(stage, out.get("file"))
        if path.is_file() and path.stat().st_size == out.get("bytes") and sha256_file(path) == out.get("sha256"):
            return None
        return path

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        bad = [p for p in pool.map(damaged, manifest.get("outputs", [])) if p is not None]
    for path in bad:
        path.unlink(missing_ok=True)
    return bad


def load_features(run: str | Path) -> Features:
    stage = stage_dir(run, "extract")
    manifest = read_manifest(stage)
    if manifest is None:
        raise DuchError(f"{stage}: no finished extract stage (manifest.json missing); run `duch extract` first")
    parts: dict[str, list[dict]] = {"image": [], "text": []}
    dims: dict[str, tuple[str, tuple]] = {}
    for out in manifest["outputs"]:
        verify_output(stage, out)
        shard = read_shard(stage / out["file"])
        shape = shard["emb"].shape[1:] + (shard["views"].shape[1:] if "views" in shard else ())
        first = dims.setdefault(out["modality"], (out["file"], shape))
        if first[1] != shape:
            raise DuchError(f"{stage / out['file']}: embeddings of shape {shape} do not match {first[0]}'s "
                            f"{first[1]}; the shards come from different runs, redo extract with --force")
        parts[out["modality"]].append(shard)

    def cat(modality, key, empty):
        arrays = [p[key] for p in parts[modality] if key in p]
        return np.concatenate(arrays) if arrays else empty

    no_str = np.array([], dtype=object)
    return Features(
        ids=cat("image", "ids", no_str), labels=cat("image", "label", no_str), splits=cat("image", "split", no_str),
        paths=cat("image", "path", no_str), image=cat("image", "emb", np.zeros((0, 0), np.float16)),
        views=cat("image", "views", None),
        text_image_id=cat("text", "image_id", no_str), text_caption_index=cat("text", "caption_index", np.zeros(0, int)),
        text_augmented=cat("text", "augmented", np.zeros(0, bool)), text=cat("text", "text", no_str),
        text_emb=cat("text", "emb", np.zeros((0, 0), np.float16)), manifest=manifest,
    )
