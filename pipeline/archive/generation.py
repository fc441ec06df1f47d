"""An archive's current generation: the segments it holds and the items removed from them.

`RUN/archive.json`, written atomically under the run lock by `duch add`, `remove` and `compact`; without it the
archive is generation 0: the run's own extract and encode-archive stages (segment "."). A segment is a folder of
the run holding an extract stage and an encode-archive stage of its own (`segments/0001`, ...: the items one
`add` brought). Readers (search, evaluate, serve) read the file once, then open only files it names, and no later
generation changes those in place: a reader sees one generation whole, the one before or the one after.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from duch.pipeline import DuchError
from duch.pipeline.run.manifest import now_iso, write_json_atomic

GENERATION_FILE = "archive.json"
BASE = "."
_SEGMENT = re.compile(r"^segments/\d{4,}$")
FORMAT = 1


@dataclass(frozen=True)
class Generation:
    number: int = 0
    # Folders of the run, in archive order: "." (the run's own stages) until a compaction rewrites it into a segment.
    segments: tuple[str, ...] = (BASE,)
    removed: tuple[tuple[str, str], ...] = ()  # (segment, image id): the item and its captions are gone
    indexes: dict = field(default_factory=dict)  # {bits: {modality: {file, kind, sha256, bytes}}} over all segments

    def removed_ids(self) -> dict[str, set[str]]:
        """{segment: removed image ids}."""
        out: dict[str, set[str]] = {s: set() for s in self.segments}
        for segment, item in self.removed:
            out.setdefault(segment, set()).add(item)
        return out

    def next_segment(self) -> str:
        """The folder the next `add` writes its items to: one past the highest segment number ever used."""
        used = [int(s.split("/")[1]) for s in self.segments if s != BASE]
        return f"segments/{max(used, default=0) + 1:04d}"


def read_generation(run: str | Path) -> Generation:
    path = Path(run) / GENERATION_FILE
    if not path.exists():
        return Generation()
    fix = "restore it from a backup, or remove it to fall back to the run's own archive (generation 0)"
    try:
        data = json.loads(path.read_text())
        segments = tuple(data["segments"])
        removed = tuple((str(s), str(i)) for s, i in data.get("removed", []))
        number = data["generation"]
        indexes = data.get("indexes", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DuchError(f"{path}: unreadable archive generation ({type(e).__name__}: {e}); {fix}") from None
    bad = [s for s in segments if not isinstance(s, str) or (s != BASE and not _SEGMENT.match(s))]
    if (not isinstance(number, int) or isinstance(number, bool) or number < 0 or bad or not segments
            or len(set(segments)) != len(segments) or not isinstance(indexes, dict)):
        raise DuchError(f"{path}: not an archive generation duch writes (generation {number!r}, segments "
                        f"{list(segments)!r}); {fix}")
    return Generation(number, segments, removed, indexes)


def write_generation(run: str | Path, generation: Generation) -> None:
    """Publish a generation: one atomic rename, the moment readers switch to it."""
    write_json_atomic(Path(run) / GENERATION_FILE, {
        "format": FORMAT, "generation": generation.number, "created": now_iso(),
        "segments": list(generation.segments), "removed": [list(r) for r in generation.removed],
        "indexes": generation.indexes})
