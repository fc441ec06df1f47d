"""Stage three's plan and work on one archive run: which code lengths to make (`encode_plan`), then the parts,
the code files, the index files and the manifest's fields (`encode_work`). `encode-archive` runs it on a run and
on each segment of a grown archive, `duch add` on each segment it adds."""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from duch.pipeline import DuchError
from duch.pipeline.archive.codefiles import code_file_done, write_code_files, write_indexes
from duch.pipeline.archive.parts import PARTS, encode_parts
from duch.pipeline.compute.device import resolve_device
from duch.pipeline.config import EncodeConfig, manifest_config
from duch.pipeline.formats.codes import codes_name
from duch.pipeline.run.manifest import library_versions
from duch.pipeline.run.records import ExtractRun, ModelFile, TrainRun
from duch.pipeline.run.stage import StageFolder, StagePlan


@dataclass(frozen=True)
class Encoding:
    """Stage three on one archive run: the trained run whose models code it, the extract stage coded, and which
    code lengths, with the settings and the code files' attributes that say what made them."""

    model_run: TrainRun
    archive: ExtractRun
    archive_run: Path
    cfg: EncodeConfig
    models: dict[int, ModelFile]  # the code lengths asked for and those kept from an earlier encoding
    views: int  # augmented views averaged into each image code (TrainRun.archive_views)

    @property
    def attrs(self) -> dict:
        return {"extract_fingerprint": self.archive.fingerprint, "image_views": self.views}

    @property
    def basis(self) -> dict:
        return {"archive": self.archive.fingerprint, "models": {str(b): m.sha256 for b, m in self.models.items()},
                "continuous": self.cfg.continuous, "index": self.cfg.index,
                **({"image_views": self.views} if self.views else {})}


def encode_plan(model_run: TrainRun, archive_run: Path, cfg: EncodeConfig, force: bool, progress: bool,
                echo: Callable[[str], None]) -> tuple[StageFolder, StagePlan]:
    """The encode-archive stage of ARCHIVE_RUN (an extract stage), coded by `model_run`'s models: code lengths
    encoded earlier by this model from this archive stay listed, code files of other models go."""
    archive_run = Path(archive_run)
    archive = ExtractRun.read(archive_run)
    model_run.check_archive(archive)
    bits_list = list(cfg.bits or model_run.models)
    missing = [b for b in bits_list if b not in model_run.models]
    if missing:
        raise DuchError(f"`bits` {','.join(map(str, missing))}: {model_run.run} has models for "
                        f"{','.join(map(str, model_run.models))} bits only")
    folder = StageFolder(archive_run, "encode-archive")
    views = model_run.archive_views(archive)
    if model_run.view_ensemble and not views:
        echo(f"encode-archive: {archive.folder} has no augmented image views (extracted with `image_views` 0), so "
             "its image codes come from the images alone, not averaged over views as the model was validated; "
             "extract it again with `image_views` 2 for the view-averaged codes")
    attrs = {"extract_fingerprint": archive.fingerprint, "image_views": views}
    kept = [b for b, m in model_run.models.items()
            if b not in bits_list and code_file_done(folder.path / codes_name(b), m, attrs, cfg)]
    for stale in folder.path.glob("codes-*.h5"):
        if stale.name not in {codes_name(b) for b in (*bits_list, *kept)}:
            stale.unlink()
    job = Encoding(model_run, archive, archive_run, cfg, {b: model_run.models[b] for b in sorted((*bits_list, *kept))},
                   views)
    return folder, StagePlan(job.basis, lambda: encode_work(folder, job, force, progress, echo),
                             report=lambda manifest: report(manifest, folder.path, echo))


def encode_work(folder: StageFolder, job: Encoding, force: bool, progress: bool, echo: Callable[[str], None]) -> dict:
    """The code files of every code length not finished yet (from parts, resumed after a kill), the index files,
    and the manifest's fields."""
    cfg, archive, out_dir = job.cfg, job.archive, folder.path
    rows = {"image": sum(o.rows for o in archive.shards("image"))}
    if archive.has_text:
        rows["text"] = archive.captions
    todo = {b: m for b, m in job.models.items()
            if force or not code_file_done(out_dir / codes_name(b), m, job.attrs, cfg)}
    if len(todo) < len(job.models):
        echo(f"encode-archive: {', '.join(str(b) for b in job.models if b not in todo)} bits already encoded, kept")
    t0 = time.perf_counter()
    device, execution, timings = str(resolve_device(cfg.device)), {"scheduler": "none"}, {}
    parts_dir = out_dir / PARTS
    if force and parts_dir.exists():
        shutil.rmtree(parts_dir)
    if todo:
        device, execution, timings = encode_parts(cfg, archive, todo, job.views, parts_dir, progress, echo)
        t1 = time.perf_counter()
        write_code_files(out_dir, parts_dir, archive, todo, rows, cfg.continuous, job.attrs, progress)
        timings["write_s"] = round(time.perf_counter() - t1, 3)
    if parts_dir.exists():  # every code file is in place: the parts have served
        shutil.rmtree(parts_dir)
    seconds = time.perf_counter() - t0
    indexes = write_indexes(out_dir, list(job.models), cfg.index, echo) if cfg.index else {}
    for stale in out_dir.glob("index-*.faiss"):
        if stale.name not in {f for per_bits in indexes.values() for f in per_bits.values()}:
            stale.unlink()
    model_run = job.model_run
    return dict(
        config=manifest_config(cfg), device=device, execution=execution, versions=library_versions(),
        # Paths relative to this stage folder: a run tree moved or copied elsewhere stays searchable.
        model_run=relative(model_run.run, out_dir), archive_run=relative(job.archive_run, out_dir),
        encoders={m: {"spec": model_run.encoders[m], "dim": model_run.extract.dims[m]}
                  for m in ("image", "text") if model_run.encoders[m]},
        models={str(b): {"file": relative(m.path, out_dir), "sha256": m.sha256, "hidden": m.hidden}
                for b, m in job.models.items()},
        rows=rows, index={"kind": cfg.index, "files": {str(b): f for b, f in indexes.items()}} if cfg.index else None,
        # How an image query must be coded to match the archive's image codes (retrieval/search.py).
        image_code={"views": job.views, **({"seed": archive.config["seed"], "augment": archive.config["image_augment"]}
                                           if job.views else {})},
        outputs=[(name, {"bits": bits}) for bits in job.models
                 for name in [codes_name(bits), *indexes.get(bits, {}).values()]],
        timings={**timings, "total_s": round(seconds, 3)},
    )


def report(manifest: dict, out_dir: Path, echo: Callable[[str], None]) -> None:
    rows, outputs = manifest["rows"], manifest["outputs"]
    sizes = ", ".join(f"{o['bits']} bits {o['bytes'] / 1e6:.1f} MB" for o in outputs if o["file"].startswith("codes"))
    echo(f"encode-archive: {rows['image']} images, {rows.get('text', 0)} captions in "
         f"{manifest['timings']['total_s']:.1f} s -> {out_dir} ({sizes})")


def relative(path: Path, stage_folder: Path) -> str:
    return os.path.relpath(Path(path).resolve(), stage_folder.resolve())
