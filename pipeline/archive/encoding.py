"""Stage three on one archive run: which code lengths to make, the parts, the code files, the index files and the
manifest (`encode-archive` on a run, and `duch add` on each segment added to an archive)."""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from duch.pipeline import DuchError
from duch.pipeline.archive.codefiles import code_file_done, write_code_files, write_indexes
from duch.pipeline.archive.parts import PARTS, encode_parts
from duch.pipeline.compute.device import resolve_device
from duch.pipeline.config import EncodeConfig, manifest_config
from duch.pipeline.formats.codes import codes_name
from duch.pipeline.model.trained import ModelRun, archive_views, check_archive
from duch.pipeline.run.fingerprint import digest
from duch.pipeline.run.layout import stage_dir
from duch.pipeline.run.manifest import library_versions, read_manifest
from duch.pipeline.run.stage import StageFolder, StageResult


def encode_run(model_run: ModelRun, archive_run: Path, cfg: EncodeConfig, force: bool, progress: bool,
               echo: Callable[[str], None]) -> StageResult:
    """Stage three on one archive run (an extract stage): its code files in ARCHIVE_RUN/encode-archive/, made by
    `model_run`'s models, or found up to date; finished code lengths and parts of a killed run are kept."""
    archive_run = Path(archive_run)
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
    folder = StageFolder(archive_run, "encode-archive")
    out_dir = folder.path
    views = archive_views(model_run, archive)
    if model_run.view_ensemble and not views:
        echo(f"encode-archive: {archive_dir} has no augmented image views (extracted with --image-views 0), so its "
             "image codes come from the images alone, not averaged over views as the model was validated; "
             "re-extract with --image-views 2 for the view-averaged codes")
    attrs = {"extract_fingerprint": archive["fingerprint"], "image_views": views}
    # Code lengths encoded earlier by this model from this archive stay listed; files of other models go.
    kept = [b for b, m in model_run.models.items()
            if b not in bits_list and code_file_done(out_dir / codes_name(b), m, attrs, cfg)]
    for stale in out_dir.glob("codes-*.h5"):
        if stale.name not in {codes_name(b) for b in (*bits_list, *kept)}:
            stale.unlink()
    models = {b: model_run.models[b] for b in sorted((*bits_list, *kept))}
    basis = {"archive": archive["fingerprint"], "models": {str(b): m.sha256 for b, m in models.items()},
             "continuous": cfg.continuous, "index": cfg.index, **({"image_views": views} if views else {})}
    done, damaged = folder.check(digest(basis), force)
    for path in damaged:
        echo(f"encode-archive: {path} is missing or does not match its checksum; writing it again")
    if done:
        echo(f"encode-archive: up to date in {out_dir}; nothing to do (--force redoes it)")
        return StageResult(out_dir, done, did_work=False)
    folder.start()

    rows = {"image": sum(o["rows"] for o in archive["outputs"] if o["modality"] == "image")}
    if any(o["modality"] == "text" for o in archive["outputs"]):
        rows["text"] = archive["counts"]["captions"]
    todo = {b: m for b, m in models.items() if force or not code_file_done(out_dir / codes_name(b), m, attrs, cfg)}
    if len(todo) < len(models):
        echo(f"encode-archive: {', '.join(str(b) for b in models if b not in todo)} bits already encoded, kept")
    t0 = time.perf_counter()
    device, execution, timings = str(resolve_device(cfg.device)), {"scheduler": "none"}, {}
    parts_dir = out_dir / PARTS
    if force and parts_dir.exists():
        shutil.rmtree(parts_dir)
    if todo:
        device, execution, timings = encode_parts(cfg, archive_dir, archive, todo, views, parts_dir, progress, echo)
        t1 = time.perf_counter()
        write_code_files(out_dir, parts_dir, archive_dir, archive, todo, rows, cfg.continuous, attrs, progress)
        timings["write_s"] = round(time.perf_counter() - t1, 3)
    if parts_dir.exists():  # every code file is in place: the parts have served
        shutil.rmtree(parts_dir)
    seconds = time.perf_counter() - t0
    indexes = write_indexes(out_dir, list(models), cfg.index, echo) if cfg.index else {}
    for stale in out_dir.glob("index-*.faiss"):
        if stale.name not in {f for per_bits in indexes.values() for f in per_bits.values()}:
            stale.unlink()

    outputs = [folder.output(name, bits=bits) for bits in models
               for name in [codes_name(bits), *indexes.get(str(bits), {}).values()]]
    manifest = folder.finish(
        fingerprint=digest(basis), basis=basis, config=manifest_config(cfg), device=device, execution=execution,
        versions=library_versions(),
        # Paths relative to this stage folder: a run tree moved or copied elsewhere stays searchable.
        model_run=relative(model_run.run, out_dir), archive_run=relative(archive_run, out_dir),
        encoders={m: {"spec": model_run.encoders[m], "dim": model_run.extract["encoders"][m]["dim"]}
                  for m in ("image", "text") if model_run.encoders[m]},
        models={str(b): {"file": relative(m.path, out_dir), "sha256": m.sha256, "hidden": m.hidden}
                for b, m in models.items()},
        rows=rows, index={"kind": cfg.index, "files": indexes} if cfg.index else None,
        # How an image query must be coded to match the archive's image codes (retrieval/search.py).
        image_code={"views": views, **({"seed": archive["config"]["seed"],
                                        "augment": archive["config"]["image_augment"]} if views else {})},
        outputs=outputs, timings={**timings, "total_s": round(seconds, 3)},
    )
    sizes = ", ".join(f"{o['bits']} bits {o['bytes'] / 1e6:.1f} MB" for o in outputs if o["file"].startswith("codes"))
    echo(f"encode-archive: {rows['image']} images, {rows.get('text', 0)} captions in {seconds:.1f} s -> "
         f"{out_dir} ({sizes})")
    return StageResult(out_dir, manifest, did_work=True)


def relative(path: Path, stage_folder: Path) -> str:
    return os.path.relpath(Path(path).resolve(), stage_folder.resolve())
