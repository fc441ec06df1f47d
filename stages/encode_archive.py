"""Stage 3: packed binary codes of every archive item, one file per code length.

The archive is any finished extract run made with the model's encoders: the run the model was trained on, or a
new archive encoded with an existing model (the production case). Shards are streamed one at a time through
every code length's heads, so memory stays flat however large the archive is.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import DuchError
from pipeline.codes import CodeWriter, codes_name, open_codes
from pipeline.config import EncodeConfig, digest
from pipeline.features import verify_output
from pipeline.hashing import DuchHeads
from pipeline.lock import run_lock
from pipeline.manifest import library_versions, now_iso, read_manifest, sha256_file, write_manifest
from pipeline.rundir import stage_dir
from pipeline.shards import read_shard

STAGE = "encode-archive"


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
        from stages.train_hash import load_heads

        if sha256_file(self.path) != self.sha256:
            raise DuchError(f"{self.path} differs from the file its train-hash manifest lists; "
                            "rerun `duch train-hash --force` or restore the file")
        return load_heads(self.path, self.image_dim, self.text_dim, self.bits, self.hidden).to(device)


@dataclass
class ModelRun:
    """What a finished train-hash stage offers: its models and the encoders its features came from."""

    run: Path
    manifest: dict
    extract: dict  # the manifest of the extract stage it trained on
    models: dict[int, Model]

    @property
    def encoders(self) -> dict:
        """{"image": spec, "text": spec or None}: what a query must be embedded with."""
        config = self.extract["config"]
        return {"image": config["image_encoder"], "text": config["text_encoder"]}


def load_model_run(run: str | Path) -> ModelRun:
    run = Path(run).resolve()
    manifest = read_manifest(stage_dir(run, "train-hash"))
    if manifest is None:
        raise DuchError(f"{run}: no finished train-hash stage; run `duch train-hash --run {run}` first")
    extract = read_manifest(stage_dir(run, "extract"))
    if extract is None or extract["fingerprint"] != manifest["basis"]["extract"]:
        raise DuchError(f"{run}: the extract stage changed after train-hash ran; rerun `duch train-hash --force`")
    dims = extract["encoders"]
    checksums = {o["file"]: o["sha256"] for o in manifest["outputs"]}
    models = {}
    for bits in manifest["config"]["bits"]:
        file = f"bits-{bits}/model.safetensors"
        models[bits] = Model(bits, run / "train-hash" / file, checksums[file], manifest["config"]["hidden"],
                             dims["image"]["dim"], dims["text"]["dim"])
    return ModelRun(run, manifest, extract, models)


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


# ---------------------------------------------------------------------------------------------- encoding
@torch.no_grad()
def continuous_codes(head: torch.nn.Module, emb: np.ndarray, device: torch.device, batch: int) -> np.ndarray:
    """Head outputs in fp32 (what train-hash validates with), [n, K]."""
    out = []
    for s in range(0, len(emb), batch):
        x = torch.as_tensor(np.asarray(emb[s:s + batch], dtype=np.float32), device=device)
        out.append(head(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, head.net[3].out_features), np.float32)


def shard_rows(stage: Path, output: dict) -> dict[str, np.ndarray]:
    """The rows of one extract shard that get codes: every image; every real caption (not the rewrites)."""
    if output["modality"] == "image":
        return read_shard(stage / output["file"], ("ids", "path", "label", "emb"))
    shard = read_shard(stage / output["file"], ("image_id", "caption_index", "text", "augmented", "emb"))
    keep = ~shard.pop("augmented")
    return {k: v[keep] for k, v in shard.items()}


def encode_shards(archive_dir: Path, archive: dict, heads: dict[int, DuchHeads], writers: dict[int, CodeWriter],
                  continuous: bool, device: torch.device, batch: int, bar: tqdm) -> None:
    for output in archive["outputs"]:
        modality = output["modality"]
        verify_output(archive_dir, output)
        rows = shard_rows(archive_dir, output)
        emb = rows.pop("emb")
        for bits, pair in heads.items():
            h = continuous_codes(getattr(pair, modality), emb, device, batch)
            arrays = {**rows, "codes": np.packbits(h >= 0, axis=1, bitorder="big")}
            if continuous:
                arrays["continuous"] = h.astype(np.float16)
            writers[bits].append(modality, arrays)
        bar.update(len(emb))


# ---------------------------------------------------------------------------------------------- the stage
@dataclass
class EncodeResult:
    stage_dir: Path
    manifest: dict
    did_work: bool


def encode_archive(cfg: EncodeConfig, force: bool = False, progress: bool = True,
                   echo: Callable[[str], None] = print) -> EncodeResult:
    cfg.validate()
    with run_lock(cfg.archive or cfg.run, STAGE):
        return _encode_archive(cfg, force, progress, echo)


def _encode_archive(cfg: EncodeConfig, force: bool, progress: bool, echo: Callable[[str], None]) -> EncodeResult:
    from stages.extract import resolve_device

    model_run = load_model_run(cfg.run)
    archive_run = Path(cfg.archive or cfg.run)
    archive_dir = stage_dir(archive_run, "extract")
    archive = read_manifest(archive_dir)
    if archive is None:
        raise DuchError(f"{archive_dir}: no finished extract stage; run `duch extract --run {archive_run}` first")
    check_archive(model_run, archive, archive_dir)
    bits_list = list(cfg.bits or model_run.models)
    missing = [b for b in bits_list if b not in model_run.models]
    if missing:
        raise DuchError(f"--bits {','.join(map(str, missing))}: {model_run.run} has models for "
                        f"{','.join(map(str, model_run.models))} bits only")
    out_dir = stage_dir(archive_run, STAGE)
    attrs = {"extract_fingerprint": archive["fingerprint"]}
    # Code lengths encoded earlier by this model from this archive stay listed; files of other models go.
    kept = [b for b, m in model_run.models.items()
            if b not in bits_list and _code_file_done(out_dir / codes_name(b), m, attrs, cfg)]
    for stale in out_dir.glob("codes-*.h5"):
        if stale.name not in {codes_name(b) for b in (*bits_list, *kept)}:
            stale.unlink()
    models = {b: model_run.models[b] for b in sorted((*bits_list, *kept))}
    basis = {"archive": archive["fingerprint"], "models": {str(b): m.sha256 for b, m in models.items()},
             "continuous": cfg.continuous, "index": cfg.index}
    previous = read_manifest(out_dir)
    if previous and not force and previous.get("fingerprint") == digest(basis):
        echo(f"encode-archive: up to date in {out_dir}; nothing to do (--force redoes it)")
        return EncodeResult(out_dir, previous, did_work=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)

    rows = {"image": sum(o["rows"] for o in archive["outputs"] if o["modality"] == "image")}
    if any(o["modality"] == "text" for o in archive["outputs"]):
        rows["text"] = archive["counts"]["captions"]
    todo = {b: m for b, m in models.items() if force or not _code_file_done(out_dir / codes_name(b), m, attrs, cfg)}
    if len(todo) < len(models):
        echo(f"encode-archive: {', '.join(str(b) for b in models if b not in todo)} bits already encoded, kept")
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    if todo:
        heads = {b: m.load(device) for b, m in todo.items()}
        writers = {b: CodeWriter(out_dir / codes_name(b), b, rows, cfg.continuous,
                                 {**attrs, "model_sha256": m.sha256}) for b, m in todo.items()}
        try:
            with tqdm(total=sum(rows.values()), unit="item", desc=f"encode {','.join(map(str, todo))} bits",
                      disable=not progress, dynamic_ncols=True) as bar:
                encode_shards(archive_dir, archive, heads, writers, cfg.continuous, device, cfg.batch_size, bar)
            for writer in writers.values():
                writer.close()
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
    seconds = time.perf_counter() - t0
    indexes = write_indexes(out_dir, list(models), cfg.index, echo) if cfg.index else {}
    for stale in out_dir.glob("index-*.faiss"):
        if stale.name not in {f for per_bits in indexes.values() for f in per_bits.values()}:
            stale.unlink()

    outputs = []
    for bits in models:
        for path in [out_dir / codes_name(bits), *(out_dir / f for f in indexes.get(str(bits), {}).values())]:
            outputs.append({"file": path.name, "bits": bits, "bytes": path.stat().st_size,
                            "sha256": sha256_file(path)})
    manifest = {
        "stage": STAGE, "created": now_iso(), "fingerprint": digest(basis), "basis": basis,
        "config": dataclasses.asdict(cfg), "device": str(device), "versions": library_versions(),
        "model_run": str(model_run.run), "archive_run": str(archive_run.resolve()),
        "encoders": {m: {"spec": model_run.encoders[m], "dim": model_run.extract["encoders"][m]["dim"]}
                     for m in ("image", "text") if model_run.encoders[m]},
        "models": {str(b): {"file": str(m.path), "sha256": m.sha256, "hidden": m.hidden} for b, m in models.items()},
        "rows": rows, "index": {"kind": cfg.index, "files": indexes} if cfg.index else None,
        "outputs": outputs, "timings": {"encode_s": round(seconds, 3)},
    }
    write_manifest(out_dir, manifest)
    sizes = ", ".join(f"{o['bits']} bits {o['bytes'] / 1e6:.1f} MB" for o in outputs if o["file"].startswith("codes"))
    echo(f"encode-archive: {rows['image']} images, {rows.get('text', 0)} captions in {seconds:.1f} s -> "
         f"{out_dir} ({sizes})")
    return EncodeResult(out_dir, manifest, did_work=True)


def write_indexes(out_dir: Path, bits_list: list[int], kind: str, echo) -> dict[str, dict[str, str]]:
    """A faiss index per code length and modality, built from the finished (memory-mapped) code files."""
    from pipeline import faiss_index

    files: dict[str, dict[str, str]] = {}
    for bits in bits_list:
        _, tables = open_codes(out_dir / codes_name(bits), with_meta=False)
        for modality, table in tables.items():
            t = time.perf_counter()
            path = out_dir / faiss_index.index_name(bits, modality)
            faiss_index.write(faiss_index.build(table.codes, kind), path)
            files.setdefault(str(bits), {})[modality] = path.name
            echo(f"encode-archive: {kind} index of {len(table)} {modality} codes, {bits} bits, in "
                 f"{time.perf_counter() - t:.1f} s -> {path.name}")
    return files


def _code_file_done(path: Path, model: Model, attrs: dict, cfg: EncodeConfig) -> bool:
    """A code file left by an interrupted run is kept when it was made by this model from this archive."""
    if not path.exists():
        return False
    try:
        found, tables = open_codes(path, with_meta=False)
    except OSError:
        return False
    has_continuous = all(t.continuous is not None for t in tables.values())
    return (found.get("model_sha256") == model.sha256 and found.get("extract_fingerprint") == attrs[
        "extract_fingerprint"] and has_continuous == cfg.continuous)


def load_encode_manifest(run: str | Path) -> tuple[Path, dict]:
    out_dir = stage_dir(run, STAGE)
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise DuchError(f"{run}: no finished encode-archive stage; run `duch encode-archive --run {run}` first")
    return out_dir, manifest


