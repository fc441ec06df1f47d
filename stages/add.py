"""`duch add`: new items into an encoded archive, without extracting or coding the rest again.

The new items (an id already in the archive is refused, or with --replace coded again when its file changed) are
extracted with the run's recorded settings into a segment folder of their own, coded there by every trained code
length, the archive's faiss indexes take them, and one atomic write of the generation publishes them
(pipeline/archive/). A killed add, rerun, resumes its unpublished segment.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from duch.data import Dataset
from duch.pipeline import DuchError
from duch.pipeline.archive.encoding import encode_plan
from duch.pipeline.archive.growth import drop_unpublished, open_archive, publish, segment_configs, unchanged
from duch.pipeline.config import AddConfig
from duch.pipeline.embed.extraction import extraction, extraction_plan, read_inputs
from duch.pipeline.run.stage import StageFolder, StageResult, stage

STAGE = "add"


@stage(STAGE)
def add(cfg: AddConfig, force: bool, progress: bool, echo: Callable[[str], None]) -> StageResult:
    archive = open_archive(cfg.run)
    run, before = archive.run, archive.generation
    segment = before.next_segment()
    folder = run / segment
    extract_cfg, encode_cfg = segment_configs(archive, cfg.data, cfg.images, folder, dataclasses.asdict(cfg))
    dataset = read_inputs(extract_cfg)  # scenes are cut into tiles as the archive's were
    live = archive.live
    known = [item for item in dataset.items if item.id in live]
    if known and not cfg.replace:
        shown = ", ".join(repr(item.id) for item in known[:5]) + (" ..." if len(known) > 5 else "")
        raise DuchError(f"{len(known)} items of {dataset.source} are already in the archive of {run} ({shown}); "
                        "give --replace to code again those whose file changed, or `duch remove` them first")
    changed = [item for item in known if not unchanged(archive, live[item.id], dataset.images_dir / item.image)]
    if len(changed) < len(known):
        echo(f"add: {len(known) - len(changed)} items already in the archive are unchanged, kept")
    new = [item for item in dataset.items if item.id not in live] + changed
    if not new:
        echo(f"add: nothing new in {dataset.source}; the archive of {run} stays at generation {before.number}")
        return StageResult(run, {"generation": before.number, "added": 0, "replaced": 0}, did_work=False)
    dropped = drop_unpublished(run, before, keep=segment)
    if dropped:
        echo(f"add: removed {', '.join(dropped)}, left unpublished by a killed add or compact")
    items = dataclasses.replace(dataset, items=new)
    extract_segment(extract_cfg, items, progress, echo)
    encoded, plan = encode_plan(archive.model_run, folder, encode_cfg, force=False, progress=progress, echo=echo)
    encoded.run(plan, force=False, echo=echo)

    removed = (*before.removed, *((before.segments[archive.codes.segment_of["image"][live[item.id]]], item.id)
                                  for item in changed))
    after = publish(archive, (*before.segments, segment), removed, echo)
    echo(f"add: {len(new) - len(changed)} new and {len(changed)} replaced items in {segment}; {run} is at "
         f"generation {after.number} ({len(after.segments)} segments)")
    return StageResult(folder, {"generation": after.number, "segment": segment, "added": len(new) - len(changed),
                                "replaced": len(changed)}, did_work=True)


def extract_segment(cfg, dataset: Dataset, progress: bool, echo: Callable[[str], None]) -> None:
    """The segment's extract stage: resumed from its finished shards after a kill; shards of other items (a
    killed add's) are cleared. Quiet when found finished: the add says what it publishes."""
    folder = StageFolder(Path(cfg.run), "extract")
    plan = extraction_plan(folder, extraction(cfg, dataset), progress, echo, foreign_cleared=True)
    folder.run(plan, force=False, echo=lambda line: None)
