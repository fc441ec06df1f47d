"""Finished stages as typed records: what a later stage reads of an earlier one, read and checked once.

A manifest on disk is JSON (code lengths are its keys, so strings there); a record is what the code uses: frozen
dataclasses with code lengths as ints and paths as Paths. Each record is read with `read(run)`, which refuses a
stage that is not finished (`no_finished`, the one wording of that message) and a manifest that lacks or mistypes
a field (manifest.REQUIRED, checked by read_manifest). `manifest` keeps the dict as read, for the fields copied
into another manifest unread.

    extract (ExtractRun) -> train-hash (TrainRun: its models, ModelFile) -> encode-archive (EncodedRun)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from duch.pipeline import DuchError
from duch.pipeline.run.artifacts import stage_file
from duch.pipeline.run.layout import stage_dir
from duch.pipeline.run.manifest import MANIFEST, read_manifest


def no_finished(run: str | os.PathLike, stage: str, purpose: str = "") -> DuchError:
    """The one message for a stage a later one needs and does not find finished in `run` (`purpose`: " to
    grow", say)."""
    return DuchError(f"{run}: no finished {stage} stage{purpose}; run the {stage} stage on it first")


def redo(folder: Path) -> str:
    """The fix for a stage whose manifest or files cannot be used: the stage done again."""
    return f"redo the {Path(folder).name} stage of {Path(folder).parent} with `force`"


def finished(run: str | os.PathLike, stage: str, purpose: str = "") -> dict:
    """The manifest of `run`'s finished `stage`, checked (read_manifest), or the no_finished error."""
    manifest = read_manifest(stage_dir(run, stage))
    if manifest is None:
        raise no_finished(run, stage, purpose)
    return manifest


@dataclass(frozen=True)
class Output:
    """A file a stage lists as its output: {file, bytes, sha256} and, by stage, its modality, rows or bits."""

    file: str
    bytes: int
    sha256: str
    modality: str | None = None
    rows: int | None = None
    bits: int | None = None

    @classmethod
    def of(cls, entry: dict) -> Output:
        bits = entry.get("bits")
        return cls(entry["file"], entry["bytes"], entry["sha256"], entry.get("modality"), entry.get("rows"),
                   None if bits is None else int(bits))

    def listing(self) -> dict:
        """The entry as the manifest holds it (for checks that read manifests: verify_output)."""
        return {"file": self.file, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class ExtractRun:
    """A finished extract stage: shards of embeddings, the encoders and settings they were made with."""

    folder: Path
    manifest: dict
    fingerprint: str
    settings: dict  # basis.settings: the encoders' fingerprints and what decides the shards' bytes
    config: dict
    dims: dict[str, int]  # {modality: embedding dimension}
    outputs: tuple[Output, ...]
    images: int
    captions: int
    image_views: int  # augmented views per image (0 for runs made before views were counted)
    images_dir: Path | None

    @classmethod
    def read(cls, run: str | os.PathLike, purpose: str = "") -> ExtractRun:
        return cls.of(stage_dir(run, "extract"), finished(run, "extract", purpose))

    @classmethod
    def of(cls, folder: Path, m: dict) -> ExtractRun:
        images_dir = m.get("dataset", {}).get("images_dir")
        return cls(Path(folder), m, m["fingerprint"], m["basis"]["settings"], m["config"],
                   {modality: e["dim"] for modality, e in m["encoders"].items()},
                   tuple(Output.of(o) for o in m["outputs"]), m["counts"]["images"], m["counts"]["captions"],
                   m["counts"].get("image_views", 0), Path(images_dir) if images_dir is not None else None)

    @property
    def encoders(self) -> dict[str, str | None]:
        """{"image": spec, "text": spec or None}: what a query must be embedded with."""
        return {"image": self.config["image_encoder"], "text": self.config["text_encoder"]}

    def shards(self, modality: str | None = None) -> tuple[Output, ...]:
        return tuple(o for o in self.outputs if modality is None or o.modality == modality)

    @property
    def has_text(self) -> bool:
        return bool(self.shards("text"))


def retrain_fix(run: Path) -> str:
    """What to do when one trained model is missing or damaged: train-hash redoes just that code length."""
    return (f"run the train-hash stage on {run} again (with the settings it was trained with): it trains that code "
            "length again and keeps the others")


def manifest_int(value, folder: Path, key: str) -> int:
    """A positive whole number a manifest holds (as a number, or a string of digits), or the one-line error."""
    try:
        number = int(value) if not isinstance(value, (bool, float)) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number <= 0:
        raise DuchError(f"{folder / MANIFEST}: {key} holds {value!r}, not a positive whole number; {redo(folder)}")
    return number


@dataclass(frozen=True)
class ModelFile:
    """A trained code length of a train-hash stage: its weights file, checksum and shape."""

    bits: int
    path: Path
    sha256: str
    hidden: int
    image_dim: int
    text_dim: int


@dataclass(frozen=True)
class TrainRun:
    """A finished train-hash stage (a trained run, not the model): its models, one per code length, and the
    extract stage it trained on."""

    run: Path
    manifest: dict
    fingerprint: str
    extract: ExtractRun
    models: dict[int, ModelFile]
    view_ensemble: bool  # its image codes average the head over the image and its views (False before the option)

    @classmethod
    def read(cls, run: str | os.PathLike) -> TrainRun:
        run = Path(run).resolve()
        folder = stage_dir(run, "train-hash")
        manifest = finished(run, "train-hash")
        try:
            return cls._of(run, folder, manifest)
        except (KeyError, TypeError, AttributeError) as e:  # the extract manifest beside it, cut short
            raise DuchError(f"{folder / MANIFEST} (or the extract manifest beside it) lacks or mistypes {e!s}; "
                            f"{redo(folder)}") from None

    @classmethod
    def _of(cls, run: Path, folder: Path, manifest: dict) -> TrainRun:
        extract = read_manifest(stage_dir(run, "extract"))
        if extract is None or extract["fingerprint"] != manifest["basis"]["extract"]:
            raise DuchError(f"{run}: the extract stage changed after train-hash ran; {redo(folder)}")
        dims = extract["encoders"]
        # A manifest is data from disk: its numbers are read as numbers (a code length is part of a path) and the
        # files it names are looked up inside the stage folder only.
        # read_manifest checked each output is a dict with a str file and sha256.
        checksums: dict[str, str] = {o["file"]: o["sha256"] for o in manifest["outputs"]}
        fix = retrain_fix(run)
        hidden = manifest_int(manifest["config"].get("hidden"), folder, "config.hidden")
        models = {}
        for value in manifest["config"]["bits"]:
            bits = manifest_int(value, folder, "config.bits")
            file = f"bits-{bits}/model.safetensors"
            path = stage_file(folder, file)
            if file not in checksums:
                raise DuchError(f"{path} is not listed in the outputs of {folder / MANIFEST}; {fix}")
            if not path.is_file():
                raise DuchError(f"{path} is missing; {fix}")
            models[bits] = ModelFile(bits, path, checksums[file], hidden, dims["image"]["dim"], dims["text"]["dim"])
        return cls(run, manifest, manifest["fingerprint"], ExtractRun.of(stage_dir(run, "extract"), extract), models,
                   bool(manifest["config"].get("view_ensemble", False)))

    @property
    def encoders(self) -> dict[str, str | None]:
        return self.extract.encoders

    def archive_views(self, archive: ExtractRun) -> int:
        """How many augmented views each image code of `archive` averages: all it has when the model asks."""
        return archive.image_views if self.view_ensemble else 0

    def check_archive(self, archive: ExtractRun) -> None:
        """An archive must come from the encoders (and dimensions) the heads were trained on."""
        for modality in ("image", "text"):
            if modality == "text" and "text" not in archive.dims:
                continue  # an image-only archive: nothing to compare
            want = self.extract.settings[f"{modality}_encoder"]
            have = archive.settings[f"{modality}_encoder"]
            want_dim, have_dim = self.extract.dims[modality], archive.dims[modality]
            if want != have or want_dim != have_dim:
                raise DuchError(
                    f"{archive.folder}: its {modality} embeddings come from {have['spec']} ({have_dim}-d), but the "
                    f"model in {self.run} was trained on {want['spec']} ({want_dim}-d); extract the archive with "
                    f"`{modality}_encoder` {want['spec']} or train a model on this archive")


def image_code(manifest: dict) -> dict:
    """An encode-archive manifest's rule for image codes: {"views": 0} for the image alone (and for manifests made
    before the rule was recorded), else the view count, seed and augmentation an image query must be coded with."""
    return manifest.get("image_code") or {"views": 0}


@dataclass(frozen=True)
class EncodedModel:
    """A code length of an encode-archive stage: the model file that made it (relative to the stage folder)."""

    file: str
    sha256: str
    hidden: int


@dataclass(frozen=True)
class EncoderUsed:
    """An encoder an archive was embedded with: its spec (what a query is embedded with) and dimension."""

    spec: str
    dim: int


@dataclass(frozen=True)
class EncodedRun:
    """A finished encode-archive stage: code files by code length, the models and encoders that made them."""

    folder: Path
    manifest: dict
    fingerprint: str
    archive_fingerprint: str  # basis.archive: the extract stage it coded
    models: dict[int, EncodedModel]
    rows: dict[str, int]  # {modality: rows coded}
    config: dict
    image_code: dict  # how an image query must be coded to match (image_code above)
    model_run: Path  # the train-hash run, resolved
    archive_run: Path  # the extract run coded, resolved
    encoders: dict[str, EncoderUsed]  # {modality: encoder}: a query is embedded with these

    @classmethod
    def read(cls, run: str | os.PathLike, purpose: str = "") -> EncodedRun:
        return cls.of(stage_dir(run, "encode-archive"), finished(run, "encode-archive", purpose))

    @classmethod
    def of(cls, folder: Path, m: dict) -> EncodedRun:
        models = {int(b): EncodedModel(e["file"], e["sha256"], e["hidden"]) for b, e in m["models"].items()}
        return cls(Path(folder), m, m["fingerprint"], m["basis"]["archive"], dict(sorted(models.items())),
                   m["rows"], m.get("config", {}), image_code(m), (Path(folder) / m["model_run"]).resolve(),
                   (Path(folder) / m["archive_run"]).resolve(),
                   {modality: EncoderUsed(e["spec"], e["dim"]) for modality, e in m["encoders"].items()})

    @property
    def bits(self) -> list[int]:
        return list(self.models)

    @property
    def views(self) -> int:
        return int(self.image_code.get("views", 0))

    @property
    def continuous(self) -> bool:
        return bool(self.config.get("continuous"))

    def model_file(self, bits: int) -> ModelFile:
        """The model that made the `bits`-bit codes, as its weights are loaded (its path relative to this folder)."""
        model = self.models[bits]
        return ModelFile(bits, Path(os.path.normpath(self.folder / model.file)), model.sha256, model.hidden,
                         self.encoders["image"].dim, self.encoders["text"].dim if "text" in self.encoders else 0)

    def index_files(self, bits: int) -> dict[str, str]:
        """{modality: faiss file name} of a code length ({}: encoded without an index)."""
        return ((self.manifest.get("index") or {}).get("files") or {}).get(str(bits), {})
