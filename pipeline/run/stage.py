"""The skeleton every stage runs in: validate the config -> take the run lock -> fingerprint what decides the
outputs -> up to date? (the same fingerprint, every output intact: one "up to date" line, nothing redone) -> else
the damaged outputs removed, the old manifest removed, the work (resuming from what is finished) -> the outputs as
{file, bytes, sha256} -> the manifest, written last.

    @stage("train-hash")
    def train_hash(cfg, force, progress, echo) -> StageResult: ...

is called as train_hash(cfg, force=False, progress=True, echo=print, wait=0.0); `wait` is how many seconds to
wait for a run another duch process holds before giving up.

Where each part lives (docs/design.md, "The stage skeleton"): a stage's work is ONE function of its library
(pipeline/<role>/), which makes the outputs and returns the manifest's fields; the library also says what decides
them (the basis) and which outputs must be intact, as a StagePlan (`*_plan` functions). The stage module in
stages/ runs plans with `StageFolder.run`, the only caller of check, start and finish; nothing else prints "up to
date" or writes a manifest. Parts of a stage kept across a kill (a code length, a shard) are found with
`finished_part`.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from duch.pipeline.run.artifacts import damaged_outputs, output_record
from duch.pipeline.run.fingerprint import digest
from duch.pipeline.run.layout import clear_stage, stage_dir
from duch.pipeline.run.lock import run_lock
from duch.pipeline.run.manifest import now_iso, read_manifest, write_manifest
from duch.pipeline.run.storage import make_folders, write_errors

UNREAD = object()  # StageFolder.check's `previous` when the caller has not read the manifest: read it there


@dataclass
class StageResult:
    stage_dir: Path
    manifest: dict
    did_work: bool


def stage(name: str, locks: Callable = lambda cfg: cfg.run):
    """A stage function run with its config validated and the lock of the run it writes (`locks(cfg)`) held."""
    def decorate(body):
        @functools.wraps(body)
        def run(cfg, force: bool = False, progress: bool = True, echo: Callable[[str], None] = print,
                wait: float = 0.0):
            cfg.validate()
            with run_lock(locks(cfg), name, wait_s=wait):
                return body(cfg, force=force, progress=progress, echo=echo)
        return run
    return decorate


def damaged_line(path: Path) -> str:
    return f"{path} is missing or does not match its checksum; writing it again"


@dataclass
class StagePlan:
    """What a stage supplies to StageFolder.run.

    basis: what decides the outputs, as the manifest keeps it (its digest is the fingerprint unless `fingerprint`
    is given: one confirmed by a relisting, say). work: makes the outputs in the started folder and returns the
    manifest's fields in their order, after fingerprint and basis; its "outputs" lists file names (or (name,
    {extra fields})), recorded with their size and SHA-256 here. intact: the outputs a finished stage must have
    (None: every one it lists). summary: said after "up to date", from the finished manifest. damaged: the line
    for an output found damaged (removed, to be written again). clear: empty the folder before the work (--force
    on a stage that resumes from its files; files left by other inputs). report: what the stage says of the
    manifest it wrote."""

    basis: dict
    work: Callable[[], dict]
    intact: list[str] | None = None
    fingerprint: str | None = None
    summary: Callable[[dict], str] = lambda manifest: ""
    damaged: Callable[[Path], str] = damaged_line
    clear: bool | Callable[[], bool] = False
    report: Callable[[dict], None] = lambda manifest: None


class StageFolder:
    """A stage's folder in a run: its last manifest, the up-to-date check, the outputs and the new manifest."""

    def __init__(self, run: str | Path, name: str):
        self.name = name
        self.path = stage_dir(run, name)

    def previous(self) -> dict | None:
        return read_manifest(self.path)

    def run(self, plan: StagePlan, force: bool, echo: Callable[[str], None], previous=UNREAD) -> StageResult:
        """The stage found up to date (one line said, nothing redone) or done: its damaged outputs removed, the
        work run, the outputs recorded and the manifest written last. `previous`: see check."""
        fingerprint = plan.fingerprint or digest(plan.basis)
        done, damaged = self.check(fingerprint, force, plan.intact, previous)
        for path in damaged:
            echo(f"{self.name}: {plan.damaged(path)}")
        if done:
            echo(f"{self.name}: up to date{plan.summary(done)} in {self.path}; nothing to do (`force` redoes it)")
            return StageResult(self.path, done, did_work=False)
        if (force and plan.clear is True) or (callable(plan.clear) and plan.clear()):
            clear_stage(self.path)
        self.start()
        fields = plan.work()
        outputs = [self.output(*o) if isinstance(o, tuple) else self.output(o) for o in fields.get("outputs", [])]
        manifest = self.finish(fingerprint=fingerprint, basis=plan.basis, **{**fields, "outputs": outputs})
        plan.report(manifest)
        return StageResult(self.path, manifest, did_work=True)

    def check(self, fingerprint: str, force: bool, names: list[str] | None = None,
              previous=UNREAD) -> tuple[dict | None, list[Path]]:
        """(the finished manifest, []) when the stage is up to date: made with this fingerprint, not forced, every
        output intact (`names`, or every output it lists). Else (None, the damaged outputs), removed so that the
        work writes them again. `previous`: the manifest as the caller already read it (None: there is none;
        UNREAD: read it here)."""
        if force:
            return None, []
        previous = self.previous() if previous is UNREAD else previous
        if not previous or previous.get("fingerprint") != fingerprint:
            return None, []
        damaged = damaged_outputs(self.path, previous, names)
        return (None if damaged else previous), damaged

    def start(self) -> None:
        """Work starts: the stage is not finished any more (its manifest goes first)."""
        with write_errors(self.path):
            make_folders(self.path)
            (self.path / "manifest.json").unlink(missing_ok=True)

    def output(self, name: str, extra: dict | None = None) -> dict:
        return output_record(self.path, name, **(extra or {}))

    def finish(self, **fields) -> dict:
        """The manifest, written last and atomically: {stage, created, **fields} (fields in the order given)."""
        manifest = {"stage": self.name, "created": now_iso(), **fields}
        write_manifest(self.path, manifest)
        return manifest


def finished_part(record: Path, fingerprint: str, files: list[Path], force: bool) -> dict | None:
    """A part of a stage kept from an earlier attempt (a code length of train-hash): its record, a JSON file written
    last, made with `fingerprint`, and every one of its `files` present. Else None, and the record is removed so
    that the part, redone, is not taken as finished before its record is written again."""
    kept = json.loads(record.read_text()) if record.exists() and not force else None
    if kept and kept.get("fingerprint") == fingerprint and all(f.is_file() for f in files):
        return kept
    with write_errors(record.parent):
        make_folders(record.parent)
        record.unlink(missing_ok=True)
    return None
