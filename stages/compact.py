"""`duch compact`: the segments holding removed items rewritten without them, and small segments merged, so that
search scans few segments and tombstones do not pile up. Kept items keep their exact code bytes."""
from __future__ import annotations

import shutil
from collections.abc import Callable

import numpy as np

from duch.pipeline.archive.compaction import merged_codes_plan, merged_extract_plan
from duch.pipeline.archive.generation import BASE
from duch.pipeline.archive.growth import drop_unpublished, open_archive, publish
from duch.pipeline.config import CompactConfig
from duch.pipeline.run.stage import StageResult, stage

STAGE = "compact"


@stage(STAGE)
def compact(cfg: CompactConfig, force: bool, progress: bool, echo: Callable[[str], None]) -> StageResult:
    archive = open_archive(cfg.run)
    before = archive.generation
    segment_of, removed = archive.codes.segment_of["image"], archive.codes.removed["image"]
    sizes = np.bincount(segment_of, minlength=len(before.segments))
    holes = np.bincount(segment_of[removed], minlength=len(before.segments))
    merge = [s for s, n, h in zip(before.segments, sizes, holes) if h or n < cfg.small]
    if not any(holes) and len(merge) < 2:
        echo(f"compact: {archive.run} has no removed items and no small segments to merge; nothing to do")
        return StageResult(archive.run, {"generation": before.number}, did_work=False)
    target = before.next_segment()
    drop_unpublished(archive.run, before)
    # Both stages of the merged segment are made whole (no earlier attempt is resumed: drop_unpublished cleared it).
    folder, plan = merged_extract_plan(archive, merge, target)
    extract = folder.run(plan, force=True, echo=echo).manifest
    folder, plan = merged_codes_plan(archive, merge, target, extract)
    folder.run(plan, force=True, echo=echo)
    first = before.segments.index(merge[0])
    segments = (*[s for s in before.segments[:first] if s not in merge], target,
                 *[s for s in before.segments[first:] if s not in merge])
    after = publish(archive, segments, tuple(r for r in before.removed if r[0] not in merge), echo)
    for segment in merge:  # readers of the previous generation keep their open files; the run's own stays
        if segment != BASE:
            shutil.rmtree(archive.run / segment)
    echo(f"compact: {', '.join(merge)} merged into {target} without {int(holes.sum())} removed items; "
         f"{archive.run} is at generation {after.number} ({len(segments)} segments)")
    return StageResult(archive.run / target, {"generation": after.number, "segment": target, "merged": merge},
                       did_work=True)
