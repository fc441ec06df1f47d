"""The skeleton every stage runs in: validate the config -> take the run lock -> fingerprint what decides the
outputs -> up to date? (the same fingerprint, every output intact: nothing to do) -> the work, resuming from
what is finished -> the outputs as {file, bytes, sha256} -> the manifest, written last.

    @stage("train-hash")
    def train_hash(cfg, force, progress, echo) -> StageResult: ...

is called as train_hash(cfg, force=False, progress=True, echo=print, wait=0.0); `wait` is how many seconds to
wait for a run another duch process holds before giving up.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from duch.pipeline.run.artifacts import damaged_outputs, output_record
from duch.pipeline.run.layout import stage_dir
from duch.pipeline.run.lock import run_lock
from duch.pipeline.run.manifest import now_iso, read_manifest, write_manifest
from duch.pipeline.run.storage import make_folders, write_errors


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


class StageFolder:
    """A stage's folder in a run: its last manifest, the up-to-date check, the outputs and the new manifest."""

    def __init__(self, run: str | Path, name: str):
        self.name = name
        self.path = stage_dir(run, name)

    def previous(self) -> dict | None:
        return read_manifest(self.path)

    def check(self, fingerprint: str, force: bool, names: list[str] | None = None,
              previous: dict | None = None) -> tuple[dict | None, list[Path]]:
        """(the finished manifest, []) when the stage is up to date: made with this fingerprint, not forced, every
        output intact (`names`, or every output it lists). Else (None, the damaged outputs), removed so that the
        work writes them again. `previous`: the manifest as the caller already read it (None: read here)."""
        previous = None if force else previous or self.previous()
        if not previous or previous.get("fingerprint") != fingerprint:
            return None, []
        damaged = damaged_outputs(self.path, previous, names)
        return (None if damaged else previous), damaged

    def start(self) -> None:
        """Work starts: the stage is not finished any more (its manifest goes first)."""
        with write_errors(self.path):
            make_folders(self.path)
            (self.path / "manifest.json").unlink(missing_ok=True)

    def output(self, name: str, **extra) -> dict:
        return output_record(self.path, name, **extra)

    def finish(self, **fields) -> dict:
        """The manifest, written last and atomically: {stage, created, **fields} (fields in the order given)."""
        manifest = {"stage": self.name, "created": now_iso(), **fields}
        write_manifest(self.path, manifest)
        return manifest
