"""`duch remove`: items withdrawn from an encoded archive. Each becomes a tombstone in a new generation, published
atomically: search, evaluate and serve never return it again; `duch compact` later rewrites its segment without
it."""
from __future__ import annotations

from collections.abc import Callable

from duch.pipeline import DuchError
from duch.pipeline.archive.generation import Generation, write_generation
from duch.pipeline.archive.growth import open_archive
from duch.pipeline.config import RemoveConfig
from duch.pipeline.run.stage import StageResult, stage

STAGE = "remove"


@stage(STAGE)
def remove(cfg: RemoveConfig, force: bool, progress: bool, echo: Callable[[str], None]) -> StageResult:
    archive = open_archive(cfg.run)
    before, live = archive.generation, archive.live
    ids = list(dict.fromkeys(cfg.ids))
    unknown = [i for i in ids if i not in live]
    if unknown:
        shown = ", ".join(map(repr, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
        raise DuchError(f"{len(unknown)} of the ids to remove are not in the archive of {archive.run} (or were "
                        f"removed already): {shown}; nothing was removed. Image ids look like "
                        f"{next(iter(live), '...')!r}")
    segment_of = archive.codes.segment_of["image"]
    tombstones = tuple((before.segments[segment_of[live[i]]], i) for i in ids)
    after = Generation(before.number + 1, before.segments, (*before.removed, *tombstones), before.indexes)
    write_generation(archive.run, after)
    echo(f"remove: {len(ids)} items removed from {archive.run}, now at generation {after.number} "
         f"({len(after.removed)} removed in all; `duch compact` rewrites their segments without them)")
    return StageResult(archive.run, {"generation": after.number, "removed": len(ids)}, did_work=True)
