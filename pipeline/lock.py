"""One writer per run directory: a second duch process on the same run is refused (or waits), never interleaved.

An advisory `flock` on RUN/.duch.lock: the kernel drops it when its process exits, however it exits (SIGKILL
included), so a crash never leaves a stale lock behind. The file names the holder for the message a second
process shows.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from pipeline import DuchError
from pipeline.manifest import now_iso
from pipeline.storage import write_errors

LOCK_FILE = ".duch.lock"


@contextlib.contextmanager
def run_lock(run: str | Path, stage: str, wait_s: float = 0.0):
    run = Path(run)
    if not run.is_dir() and stage != "extract":
        # Only extract starts a run; a mistyped --run for a later stage must not leave an empty folder behind. The
        # stage itself then says what is missing.
        yield None
        return
    with write_errors(run):
        run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_FILE
    with write_errors(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DuchError(f"{run} is in use by another duch process ({_holder(path)}); wait for it to "
                                    "finish, or use another --run directory") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"stage": stage, "pid": os.getpid(), "since": now_iso()}).encode())
        sweep_temporaries(run / stage)
        yield path
    finally:
        os.close(fd)  # closing releases the lock


def sweep_temporaries(folder: Path) -> None:
    """Remove the temporary files (`.NAME.*.tmp`) that killed attempts of a stage left in its folder.

    Only safe under the run lock, before the holder starts writing or after all its writers are done (every
    writer of this folder belongs to the lock's holder): whatever temporary is there is then garbage nobody will
    rename into place."""
    if folder.is_dir():
        for leftover in folder.rglob(".*.tmp"):
            leftover.unlink(missing_ok=True)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"{info['stage']}, pid {info['pid']}, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
