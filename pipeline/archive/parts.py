"""Stage three's work: one task per extract shard (here or on a dask cluster) runs the shard through every code
length's heads and writes a part file of codes, `encode-archive/parts/<shard>.h5`; a killed run keeps the parts
made from the same shard by the same models and resumes from them."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from duch.pipeline.compute import cluster
from duch.pipeline.compute.device import resolve_device
from duch.pipeline.config import EncodeConfig
from duch.pipeline.formats.shards import read_attrs, read_shard, write_shard
from duch.pipeline.formats.weights import load_model
from duch.pipeline.model.coding import continuous_codes, pack_codes
from duch.pipeline.run.artifacts import verify_output
from duch.pipeline.run.fingerprint import digest
from duch.pipeline.run.records import ExtractRun, ModelFile, Output
from duch.pipeline.run.storage import make_folders, write_errors

PARTS = "parts"  # per-shard codes of a run in progress, merged into the code files, then removed


def shard_rows(stage: Path, output: Output, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """`names` of the rows of one extract shard that get codes: every image; every real caption (not the
    rewrites)."""
    if output.modality == "image":
        return read_shard(stage / output.file, names)
    shard = read_shard(stage / output.file, (*names, "augmented"))
    keep = ~shard.pop("augmented")
    return {k: v[keep] for k, v in shard.items()}


@dataclass(frozen=True)
class PartJob:
    """One extract shard's codes at every code length being encoded: the task `--scheduler` maps over shards.
    Paths, checksums and small settings only; each worker loads the heads itself (once) and opens its own files."""

    archive_dir: str
    output: Output  # the extract shard
    models: dict[int, ModelFile]
    continuous: bool
    views: int  # augmented views averaged into each image code (archive_views); 0: the image alone
    device: str
    batch: int
    threads: int | None
    part: str  # where the task writes, parts/<shard name>
    key: str  # the shard and settings it is made from; a part with another key is redone


def part_key(output: Output, continuous: bool, views: int) -> str:
    return digest({"shard": output.sha256, "continuous": continuous, "views": views})


def models_attr(models: dict[int, ModelFile]) -> str:
    return json.dumps({str(b): m.sha256 for b, m in sorted(models.items())})


def encode_part(job: PartJob) -> dict:
    """Codes of one extract shard for every code length, written as one part file (renamed into place)."""
    cluster.require_shared({"the archive's extract folder": job.archive_dir,
                            "the parts folder": os.path.dirname(job.part)})
    cluster.setup_worker(job.threads)
    device = resolve_device(cluster.worker_device(job.device))
    models = job.models
    heads = cluster.cached("encode-heads", (tuple((b, m.sha256) for b, m in models.items()), str(device)),
                           lambda: {b: load_model(m, device) for b, m in models.items()})
    archive_dir = Path(job.archive_dir)
    verify_output(archive_dir, job.output.listing())
    modality = job.output.modality
    # The part holds the codes only: the driver reads the rows' ids from the shard as it merges, so no string
    # is written twice.
    averaged = modality == "image" and job.views > 0
    rows = shard_rows(archive_dir, job.output, ("emb", "views") if averaged else ("emb",))
    emb = rows["emb"]
    arrays = {}
    for bits, pair in heads.items():
        h = continuous_codes(getattr(pair, modality), emb, device, job.batch, rows.get("views"))
        arrays[f"codes-{bits}"] = pack_codes(h)
        if job.continuous:
            arrays[f"continuous-{bits}"] = h.astype(np.float16)
    write_shard(Path(job.part), arrays, {"key": job.key, "models": models_attr(models), "modality": modality,
                                         "rows": len(emb)})
    return {"rows": len(emb), "device": str(device), "worker": getattr(cluster.in_worker(), "address", None)}


def part_done(path: Path, key: str, models: dict[int, ModelFile]) -> bool:
    """A part of a killed run is kept when made from the same shard by every model still to encode (it may hold
    more code lengths: those finished since are not read)."""
    try:
        attrs = read_attrs(path) if path.is_file() else {}
        made_by = json.loads(attrs.get("models", "{}"))
    except (OSError, ValueError):  # unreadable: redone
        return False
    return attrs.get("key") == key and all(made_by.get(str(b)) == m.sha256 for b, m in models.items())


def encode_parts(cfg: EncodeConfig, archive: ExtractRun, models: dict[int, ModelFile], views: int,
                 parts_dir: Path, progress: bool, echo: Callable[[str], None]) -> tuple[str, dict, dict]:
    """One part file per extract shard not encoded yet, in this process or on the cluster; (device, execution,
    timings). Parts of a killed run made from the same shard and models are kept."""
    scheduler = cluster.SchedulerSpec.parse(cfg.scheduler)
    here = scheduler.kind == "none"
    device = str(resolve_device(cfg.device)) if here else cfg.device
    jobs = []
    for output in archive.outputs:
        key = part_key(output, cfg.continuous, views)
        part = parts_dir / output.file
        if not part_done(part, key, models):
            jobs.append(PartJob(str(archive.folder), output, models, cfg.continuous, views, device, cfg.batch_size,
                                cfg.threads, str(part), key))
    n_parts = len(archive.outputs)
    if len(jobs) < n_parts:
        echo(f"encode-archive: resuming, {n_parts - len(jobs)} of {n_parts} shards already encoded")
    with write_errors(parts_dir):
        make_folders(parts_dir)
    results: list[dict] = []
    t0 = time.perf_counter()
    # Counted in shard rows (a text shard's include its rule-based rewrites, which get no code).
    with tqdm(total=sum(job.output.rows for job in jobs), unit="row",
              desc=f"encode {','.join(map(str, models))} bits", disable=not progress, dynamic_ncols=True) as bar:
        def done(job: PartJob, result: dict) -> None:
            results.append(result)
            bar.update(job.output.rows)

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
