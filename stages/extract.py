"""Stage 1: image and text embeddings (with augmented views) into HDF5 shards and a manifest.

The archive is cut into fixed shards in dataset order (pipeline/embed/plan.py). Each shard carries the run's
fingerprint, so a rerun keeps every finished shard of the same settings and inputs, redoes only the missing ones,
and refuses to mix in shards of others. The shards are made here or on a dask cluster (pipeline/embed/).
"""
from __future__ import annotations

import time
from collections.abc import Callable

from duch.pipeline import DuchError
from duch.pipeline.compute.device import resolve_device
from duch.pipeline.config import ExtractConfig
from duch.pipeline.embed.extraction import extraction, extraction_plan, read_inputs
from duch.pipeline.embed.inputs import relisted_with_same_content, stale_error
from duch.pipeline.embed.plan import made_runtime, retriable
from duch.pipeline.embed.sources import decode_problems
from duch.pipeline.run.stage import UNREAD, StageFolder, StageResult, stage

STAGE = "extract"


@stage(STAGE)
def extract(cfg: ExtractConfig, force: bool, progress: bool, echo: Callable[[str], None]) -> StageResult:
    """Run stage 1 (or resume it, or find it up to date) and return its manifest."""
    if cfg.decode == "gpu":  # said before the run directory is touched and the encoders are loaded
        problems = decode_problems(cfg, resolve_device(cfg.device))
        if problems:
            raise DuchError(f"--decode gpu: {'; '.join(problems)}; use --decode auto or cpu")
    started = time.perf_counter()
    dataset = read_inputs(cfg)
    if not dataset.items:
        why = f" ({dataset.rejects[0].id}: {dataset.rejects[0].reason})" if dataset.rejects else ""
        raise DuchError(f"{dataset.source}: the dataset holds no images{why}")
    folder = StageFolder(cfg.run, STAGE)
    previous = None if force else folder.previous()
    # A run keeps the runtime it was made with (torch before runtimes were recorded): installing ONNX Runtime does
    # not turn a finished torch run stale; --runtime onnx or --force changes it.
    made = made_runtime(folder.path, previous) if cfg.runtime == "auto" and not force else None
    job = extraction(cfg, dataset, made)
    if previous and previous.get("fingerprint") != job.fingerprint:
        confirmed = relisted_with_same_content(folder.path, previous, job.basis, dataset, echo, progress)
        if confirmed is None:
            raise stale_error(folder.path, previous, job.basis)
        job = job.confirmed(confirmed["basis"], confirmed["fingerprint"])
        previous = UNREAD  # the manifest was written again (confirmed listing): check reads it back
    elif previous and retriable(r["reason"] for r in previous.get("rejects", [])):
        failed = sum(1 for r in previous["rejects"] if retriable([r["reason"]]))
        echo(f"extract: trying again {failed} items or tiles the server failed to serve; finished ones are kept")
        previous = None
    return folder.run(extraction_plan(folder, job, progress, echo, started), force, echo, previous)
