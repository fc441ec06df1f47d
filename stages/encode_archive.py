"""Stage 3: packed binary codes of every archive item, one file per code length.

The archive is any finished extract run made with the model's encoders: the run the model was trained on, or a
new archive encoded with an existing model (the production case). One task per extract shard (here or on a dask
cluster) makes a part file of codes (pipeline/archive/parts.py); the parts are then merged, in archive order, into
the code files (pipeline/archive/codefiles.py). Memory stays flat however large the archive is.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from duch.pipeline.archive.encoding import encode_plan
from duch.pipeline.archive.generation import BASE, Generation, read_generation, write_generation
from duch.pipeline.archive.growth import archive_indexes, drop_old_indexes
from duch.pipeline.config import EncodeConfig
from duch.pipeline.run.records import EncodedRun, TrainRun
from duch.pipeline.run.stage import StageResult, stage

STAGE = "encode-archive"


@stage(STAGE, locks=lambda cfg: cfg.archive or cfg.run)
def encode_archive(cfg: EncodeConfig, force: bool, progress: bool, echo: Callable[[str], None]) -> StageResult:
    model_run, archive_run = TrainRun.read(cfg.run), Path(cfg.archive or cfg.run)

    def encoded(folder: Path, cfg: EncodeConfig) -> StageResult:
        stage_folder, plan = encode_plan(model_run, folder, cfg, force, progress, echo)
        return stage_folder.run(plan, force, echo)

    result = encoded(archive_run, cfg)
    before = read_generation(archive_run)
    if len(before.segments) == 1 and before.segments[0] == BASE:
        return result
    # An archive grown by `duch add`: its segments are coded by the same models, and its indexes rebuilt after.
    redone = [result.did_work] + [
        encoded(archive_run / segment, dataclasses.replace(cfg, archive=str(archive_run / segment), index=None)
                ).did_work for segment in before.segments if segment != BASE]
    if any(redone):
        number = before.number + 1
        indexes = archive_indexes(archive_run, Generation(segments=()), before.segments, number, cfg.index,
                                  EncodedRun.of(result.stage_dir, result.manifest).bits, echo)
        write_generation(archive_run, dataclasses.replace(before, number=number, indexes=indexes))
        drop_old_indexes(archive_run, number)
    return result
