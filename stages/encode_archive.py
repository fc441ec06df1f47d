"""Stage 3: packed binary codes of every archive item, one file per code length.

The archive is any finished extract run made with the model's encoders: the run the model was trained on, or a
new archive encoded with an existing model (the production case). One task per extract shard (here or on a dask
cluster) runs it through every code length's heads into a part file; the parts are then merged, in archive order,
into the code files. Memory stays flat however large the archive is.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import DuchError, cluster
from pipeline.codes import META, CodeWriter, codes_name, open_codes
from pipeline.config import EncodeConfig, digest, manifest_config
from pipeline.features import damaged_outputs, stage_file, verify_output
from pipeline.hashing import DuchHeads
from pipeline.lock import run_lock
from pipeline.manifest import library_versions, now_iso, read_manifest, sha256_file, write_manifest
from pipeline.rundir import stage_dir
from pipeline.shards import read_attrs, read_shard, write_shard
from pipeline.storage import write_errors
from stages.extract import resolve_device

STAGE = "encode-archive"
PARTS = "parts"  # per-shard codes of a run in progress, merged into the code files, then removed


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
        from stages.train_hash import load_heads

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
    hidden = _manifest_int(manifest["config"].get("hidden"), stage, "config.hidden")
    models = {}
    for value in manifest["config"]["bits"]:
        bits = _manifest_int(value, stage, "config.bits")
        file = f"bits-{bits}/model.safetensors"
        path = stage_file(stage, file)
        if file not in checksums:
            raise DuchError(f"{path} is not listed in the outputs of {stage / 'manifest.json'}; {fix}")
        if not path.is_file():
            raise DuchError(f"{path} is missing; {fix}")
        models[bits] = Model(bits, path, checksums[file], hidden, dims["image"]["dim"], dims["text"]["dim"])
    return ModelRun(run, manifest, extract, models)


def _manifest_int(value, stage: Path, key: str) -> int:
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


# ---------------------------------------------------------------------------------------------- encoding
@torch.no_grad()
def continuous_codes(head: torch.nn.Module, emb: np.ndarray, device: torch.device, batch: int,
                     views: np.ndarray | None = None) -> np.ndarray:
    """Head outputs in fp32 (what train-hash validates with), [n, K]; with `views` [n, V, D] their mean over the
    image and its views, as train-hash's image_codes."""
    from stages.train_hash import image_codes

    out = []
    for s in range(0, len(emb), batch):
        x = torch.as_tensor(np.asarray(emb[s:s + batch], dtype=np.float32), device=device)
        v = None if views is None else torch.as_tensor(np.asarray(views[s:s + batch], dtype=np.float32), device=device)
        out.append(image_codes(head, x, v).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, head.net[3].out_features), np.float32)


def image_code(manifest: dict) -> dict:
    """An encode-archive manifest's rule for image codes: {"views": 0} for the image alone (and for manifests made
    before the rule was recorded), else the view count, seed and augmentation an image query must be coded with."""
    return manifest.get("image_code") or {"views": 0}


def archive_views(model_run: ModelRun, archive: dict) -> int:
    """How many augmented views each image code averages: all the archive has when the model asks for it."""
    return int(archive["counts"].get("image_views", 0)) if model_run.view_ensemble else 0


def shard_rows(stage: Path, output: dict, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """`names` of the rows of one extract shard that get codes: every image; every real caption (not the
    rewrites)."""
    if output["modality"] == "image":
        return read_shard(stage / output["file"], names)
    shard = read_shard(stage / output["file"], (*names, "augmented"))
    keep = ~shard.pop("augmented")
    return {k: v[keep] for k, v in shard.items()}


@dataclass(frozen=True)
class PartJob:
    """One extract shard's codes at every code length being encoded: the task `--scheduler` maps over shards.
    Paths, checksums and small settings only; each worker loads the heads itself (once) and opens its own files."""

    archive_dir: str
    output: dict  # the extract manifest's entry for the shard
    models: dict  # {bits: Model}
    continuous: bool
    views: int  # augmented views averaged into each image code (archive_views); 0: the image alone
    device: str
    batch: int
    threads: int | None
    part: str  # where the task writes, parts/<shard name>
    key: str  # the shard and settings it is made from; a part with another key is redone


def part_key(output: dict, continuous: bool, views: int) -> str:
    return digest({"shard": output["sha256"], "continuous": continuous, "views": views})


def _models_attr(models: dict[int, Model]) -> str:
    return json.dumps({str(b): m.sha256 for b, m in sorted(models.items())})


def encode_part(job: PartJob) -> dict:
    """Codes of one extract shard for every code length, written as one part file (renamed into place)."""
    cluster.require_shared({"the archive's extract folder": job.archive_dir,
                            "the parts folder": os.path.dirname(job.part)})
    cluster.setup_worker(job.threads)
    device = resolve_device(cluster.worker_device(job.device))
    models = job.models
    heads = cluster.cached("encode-heads", (tuple((b, m.sha256) for b, m in models.items()), str(device)),
                           lambda: {b: m.load(device) for b, m in models.items()})
    archive_dir = Path(job.archive_dir)
    verify_output(archive_dir, job.output)
    modality = job.output["modality"]
    # The part holds the codes only: the driver reads the rows' ids from the shard as it merges, so no string
    # is written twice.
    averaged = modality == "image" and job.views > 0
    rows = shard_rows(archive_dir, job.output, ("emb", "views") if averaged else ("emb",))
    emb = rows["emb"]
    arrays = {}
    for bits, pair in heads.items():
        h = continuous_codes(getattr(pair, modality), emb, device, job.batch, rows.get("views"))
        arrays[f"codes-{bits}"] = np.packbits(h >= 0, axis=1, bitorder="big")
        if job.continuous:
            arrays[f"continuous-{bits}"] = h.astype(np.float16)
    write_shard(Path(job.part), arrays, {"key": job.key, "models": _models_attr(models), "modality": modality,
                                         "rows": len(emb)})
    return {"rows": len(emb), "device": str(device), "worker": getattr(cluster.in_worker(), "address", None)}


def _part_done(path: Path, key: str, models: dict[int, Model]) -> bool:
    """A part of a killed run is kept when made from the same shard by every model still to encode (it may hold
    more code lengths: those finished since are not read)."""
    try:
        attrs = read_attrs(path) if path.is_file() else {}
        made_by = json.loads(attrs.get("models", "{}"))
    except (OSError, ValueError):  # unreadable: redone
        return False
    return attrs.get("key") == key and all(made_by.get(str(b)) == m.sha256 for b, m in models.items())


def merge_parts(parts_dir: Path, archive_dir: Path, archive: dict, writers: dict[int, CodeWriter],
                continuous: bool, bar: tqdm) -> None:
    """Every code file filled from the parts in archive order; each part is read once for all code lengths."""
    for output in archive["outputs"]:
        part = read_shard(parts_dir / output["file"])
        modality = output["modality"]
        meta = shard_rows(archive_dir, output, META[modality])
        for bits, writer in writers.items():
            arrays = {**meta, "codes": part[f"codes-{bits}"]}
            if continuous:
                arrays["continuous"] = part[f"continuous-{bits}"]
            writer.append(modality, arrays)
        bar.update(len(part[f"codes-{next(iter(writers))}"]))


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
    views = archive_views(model_run, archive)
    if model_run.view_ensemble and not views:
        echo(f"encode-archive: {archive_dir} has no augmented image views (extracted with --image-views 0), so its "
             "image codes come from the images alone, not averaged over views as the model was validated; "
             "re-extract with --image-views 2 for the view-averaged codes")
    attrs = {"extract_fingerprint": archive["fingerprint"], "image_views": views}
    # Code lengths encoded earlier by this model from this archive stay listed; files of other models go.
    kept = [b for b, m in model_run.models.items()
            if b not in bits_list and _code_file_done(out_dir / codes_name(b), m, attrs, cfg)]
    for stale in out_dir.glob("codes-*.h5"):
        if stale.name not in {codes_name(b) for b in (*bits_list, *kept)}:
            stale.unlink()
    models = {b: model_run.models[b] for b in sorted((*bits_list, *kept))}
    basis = {"archive": archive["fingerprint"], "models": {str(b): m.sha256 for b, m in models.items()},
             "continuous": cfg.continuous, "index": cfg.index, **({"image_views": views} if views else {})}
    previous = read_manifest(out_dir)
    if previous and not force and previous.get("fingerprint") == digest(basis):
        damaged = damaged_outputs(out_dir, previous)
        for path in damaged:
            echo(f"encode-archive: {path} is missing or does not match its checksum; writing it again")
        if not damaged:
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
    t0 = time.perf_counter()
    device, execution, timings = str(resolve_device(cfg.device)), {"scheduler": "none"}, {}
    parts_dir = out_dir / PARTS
    if force and parts_dir.exists():
        shutil.rmtree(parts_dir)
    if todo:
        device, execution, timings = _encode_parts(cfg, archive_dir, archive, todo, views, parts_dir, progress, echo)
        t1 = time.perf_counter()
        writers = {b: CodeWriter(out_dir / codes_name(b), b, rows, cfg.continuous,
                                 {**attrs, "model_sha256": m.sha256}) for b, m in todo.items()}
        try:
            with tqdm(total=sum(rows.values()), unit="item", desc=f"write {','.join(map(str, todo))} bits",
                      disable=not progress, dynamic_ncols=True) as bar:
                merge_parts(parts_dir, archive_dir, archive, writers, cfg.continuous, bar)
            for writer in writers.values():
                writer.close()
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        timings["write_s"] = round(time.perf_counter() - t1, 3)
    if parts_dir.exists():  # every code file is in place: the parts have served
        shutil.rmtree(parts_dir)
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
        "config": manifest_config(cfg), "device": device, "execution": execution, "versions": library_versions(),
        # Paths relative to this stage folder: a run tree moved or copied elsewhere stays searchable.
        "model_run": _relative(model_run.run, out_dir), "archive_run": _relative(archive_run, out_dir),
        "encoders": {m: {"spec": model_run.encoders[m], "dim": model_run.extract["encoders"][m]["dim"]}
                     for m in ("image", "text") if model_run.encoders[m]},
        "models": {str(b): {"file": _relative(m.path, out_dir), "sha256": m.sha256, "hidden": m.hidden}
                   for b, m in models.items()},
        "rows": rows, "index": {"kind": cfg.index, "files": indexes} if cfg.index else None,
        # How an image query must be coded to match the archive's image codes (pipeline.search).
        "image_code": {"views": views, **({"seed": archive["config"]["seed"],
                                            "augment": archive["config"]["image_augment"]} if views else {})},
        "outputs": outputs, "timings": {**timings, "total_s": round(seconds, 3)},
    }
    write_manifest(out_dir, manifest)
    sizes = ", ".join(f"{o['bits']} bits {o['bytes'] / 1e6:.1f} MB" for o in outputs if o["file"].startswith("codes"))
    echo(f"encode-archive: {rows['image']} images, {rows.get('text', 0)} captions in {seconds:.1f} s -> "
         f"{out_dir} ({sizes})")
    return EncodeResult(out_dir, manifest, did_work=True)


def _relative(path: Path, stage: Path) -> str:
    return os.path.relpath(Path(path).resolve(), stage.resolve())


def _encode_parts(cfg: EncodeConfig, archive_dir: Path, archive: dict, models: dict[int, Model], views: int,
                  parts_dir: Path, progress: bool, echo: Callable[[str], None]) -> tuple[str, dict, dict]:
    """One part file per extract shard not encoded yet, in this process or on the cluster; (device, execution,
    timings). Parts of a killed run made from the same shard and models are kept."""
    scheduler = cluster.SchedulerSpec.parse(cfg.scheduler)
    here = scheduler.kind == "none"
    device = str(resolve_device(cfg.device)) if here else cfg.device
    jobs = []
    for output in archive["outputs"]:
        key = part_key(output, cfg.continuous, views)
        part = parts_dir / output["file"]
        if not _part_done(part, key, models):
            jobs.append(PartJob(str(archive_dir), output, models, cfg.continuous, views, device, cfg.batch_size,
                                cfg.threads, str(part), key))
    n_parts = len(archive["outputs"])
    if len(jobs) < n_parts:
        echo(f"encode-archive: resuming, {n_parts - len(jobs)} of {n_parts} shards already encoded")
    with write_errors(parts_dir):
        parts_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    t0 = time.perf_counter()
    # Counted in shard rows (a text shard's include its rule-based rewrites, which get no code).
    with tqdm(total=sum(job.output["rows"] for job in jobs), unit="row",
              desc=f"encode {','.join(map(str, models))} bits", disable=not progress, dynamic_ncols=True) as bar:
        def done(job: PartJob, result: dict) -> None:
            results.append(result)
            bar.update(job.output["rows"])

        names = [Path(job.part).stem for job in jobs]
        if here:
            with cluster.torch_threads(cfg.threads):
                cluster.run_jobs(None, encode_part, jobs, names, done)
            execution = {"scheduler": "none"}
        else:
            with cluster.connect(scheduler, cfg.device, echo, cfg.threads) as client:
                cluster.run_jobs(client, encode_part, jobs, names, done, cluster.gpu_resources(client))
            execution = {"scheduler": str(scheduler), "workers": len({r["worker"] for r in results}),
                         "tasks": len(results)}
            device = ",".join(sorted({r["device"] for r in results})) or device
    return device, execution, {"encode_s": round(time.perf_counter() - t0, 3)}


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
        "extract_fingerprint"] and int(found.get("image_views", 0)) == attrs["image_views"]
        and has_continuous == cfg.continuous)


def load_encode_manifest(run: str | Path) -> tuple[Path, dict]:
    out_dir = stage_dir(run, STAGE)
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise DuchError(f"{run}: no finished encode-archive stage; run `duch encode-archive --run {run}` first")
    return out_dir, manifest


