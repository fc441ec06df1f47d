"""A finished train-hash stage as the later stages see it: its models (one per code length, by path and SHA-256),
the encoders its features came from, and the rule its image codes follow.

encode-archive codes an archive with it, search codes queries with it, evaluate checks codes against it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from duch.pipeline import DuchError
from duch.pipeline.formats.weights import load_heads
from duch.pipeline.model.heads import DuchHeads
from duch.pipeline.run.artifacts import sha256_file, stage_file
from duch.pipeline.run.layout import stage_dir
from duch.pipeline.run.manifest import read_manifest


def retrain_fix(run: Path) -> str:
    """What to do when one trained model is missing or damaged: train-hash redoes just that code length."""
    return (f"rerun `duch train-hash --run {run}` (with the options it was trained with): it trains that code "
            "length again and keeps the others")


@dataclass
class Model:
    """A trained code length of a train-hash stage, as encode-archive and search need it."""

    bits: int
    path: Path
    sha256: str
    hidden: int
    image_dim: int
    text_dim: int

    def load(self, device: torch.device | str = "cpu") -> DuchHeads:
        if sha256_file(self.path) != self.sha256:
            raise DuchError(f"{self.path} differs from the file its train-hash manifest lists; "
                            f"{retrain_fix(self.path.parents[2])}")
        return load_heads(self.path, self.image_dim, self.text_dim, self.bits, self.hidden).to(device)


@dataclass
class ModelRun:
    """What a finished train-hash stage offers: its models and the encoders its features came from."""

    run: Path
    manifest: dict
    extract: dict  # the manifest of the extract stage it trained on
    models: dict[int, Model]

    @property
    def view_ensemble(self) -> bool:
        """Whether its image codes average the head over the image and its augmented views (TrainConfig)."""
        return bool(self.manifest["config"].get("view_ensemble", False))  # runs made before the option: no

    @property
    def encoders(self) -> dict:
        """{"image": spec, "text": spec or None}: what a query must be embedded with."""
        config = self.extract["config"]
        return {"image": config["image_encoder"], "text": config["text_encoder"]}


def load_model_run(run: str | Path) -> ModelRun:
    run = Path(run).resolve()
    stage = stage_dir(run, "train-hash")
    manifest = read_manifest(stage)
    if manifest is None:
        raise DuchError(f"{run}: no finished train-hash stage; run `duch train-hash --run {run}` first")
    try:
        return _model_run(run, stage, manifest)
    except (KeyError, TypeError, AttributeError) as e:  # a manifest edited by hand, or cut short by another tool
        raise DuchError(f"{stage / 'manifest.json'} (or the extract manifest beside it) lacks or mistypes "
                        f"{e!s}; rerun `duch train-hash --run {run} --force` to redo the stage") from None


def _model_run(run: Path, stage: Path, manifest: dict) -> ModelRun:
    extract = read_manifest(stage_dir(run, "extract"))
    if extract is None or extract["fingerprint"] != manifest["basis"]["extract"]:
        raise DuchError(f"{run}: the extract stage changed after train-hash ran; rerun `duch train-hash --force`")
    dims = extract["encoders"]
    # A manifest is data from disk: its numbers are read as numbers (a code length is part of a path) and the
    # files it names are looked up inside the stage folder only.
    checksums = {o.get("file"): o.get("sha256") for o in manifest.get("outputs", []) if isinstance(o, dict)}
    fix = retrain_fix(run)
    hidden = manifest_int(manifest["config"].get("hidden"), stage, "config.hidden")
    models = {}
    for value in manifest["config"]["bits"]:
        bits = manifest_int(value, stage, "config.bits")
        file = f"bits-{bits}/model.safetensors"
        path = stage_file(stage, file)
        if file not in checksums:
            raise DuchError(f"{path} is not listed in the outputs of {stage / 'manifest.json'}; {fix}")
        if not path.is_file():
            raise DuchError(f"{path} is missing; {fix}")
        models[bits] = Model(bits, path, checksums[file], hidden, dims["image"]["dim"], dims["text"]["dim"])
    return ModelRun(run, manifest, extract, models)


def manifest_int(value, stage: Path, key: str) -> int:
    """A positive whole number a manifest holds (as a number, or a string of digits), or the one-line error."""
    try:
        number = int(value) if not isinstance(value, (bool, float)) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number <= 0:
        raise DuchError(f"{stage / 'manifest.json'}: {key} holds {value!r}, not a positive whole number; "
                        f"rerun `duch {stage.name} --force` to redo the stage")
    return number


def check_archive(model_run: ModelRun, archive: dict, archive_dir: Path) -> None:
    """An archive must come from the encoders (and dimensions) the heads were trained on."""
    trained, given = model_run.extract, archive
    for modality in ("image", "text"):
        if modality == "text" and "text" not in given["encoders"]:
            continue  # an image-only archive: nothing to compare
        want = trained["basis"]["settings"][f"{modality}_encoder"]
        have = given["basis"]["settings"][f"{modality}_encoder"]
        want_dim, have_dim = trained["encoders"][modality]["dim"], given["encoders"][modality]["dim"]
        if want != have or want_dim != have_dim:
            raise DuchError(
                f"{archive_dir}: its {modality} embeddings come from {have['spec']} ({have_dim}-d), but the model in "
                f"{model_run.run} was trained on {want['spec']} ({want_dim}-d); extract the archive with "
                f"--{modality}-encoder {want['spec']} or train a model on this archive")


def image_code(manifest: dict) -> dict:
    """An encode-archive manifest's rule for image codes: {"views": 0} for the image alone (and for manifests made
    before the rule was recorded), else the view count, seed and augmentation an image query must be coded with."""
    return manifest.get("image_code") or {"views": 0}


def archive_views(model_run: ModelRun, archive: dict) -> int:
    """How many augmented views each image code averages: all the archive has when the model asks for it."""
    return int(archive["counts"].get("image_views", 0)) if model_run.view_ensemble else 0
