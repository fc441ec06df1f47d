"""One writer per run directory: a second duch process on the same run is refused (or waits), never interleaved.

An advisory `flock` on RUN/.duch.lock, held by the process that took it and by no other: the kernel drops it when
that process exits, however it exits (SIGKILL included). A flock belongs to the open file, and a forked child
(a DataLoader worker) would share it and keep the run locked after its parent died; so every child forked while
a lock is held closes its copy at once, and is asked to die with its parent (pipeline.compute.children). The file
names the holder, for the message a second process shows.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from duch.pipeline import DuchError
from duch.pipeline.compute import children
from duch.pipeline.run.manifest import now_iso
from duch.pipeline.run.storage import make_folders, write_errors

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
        make_folders(run)
    path = run / LOCK_FILE
    with write_errors(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DuchError(_in_use(run, path, wait_s)) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"stage": stage, "pid": os.getpid(), "since": now_iso()}).encode())
        sweep_temporaries(run / stage)
        with children.fd_closed_in_children(fd):
            yield path
    finally:
        os.close(fd)  # closing releases the lock


# duch's own (storage.temp_path), and safetensors' (it saves through a `.tmpXXXXXX` of its own, renamed).
TEMPORARIES = (".*.tmp", ".tmp??????")


def sweep_temporaries(folder: Path) -> None:
    """Remove the temporary files (TEMPORARIES) that killed attempts of a stage left in its folder.

    Only safe under the run lock, before the holder starts writing or after all its writers are done (every
    writer of this folder belongs to the lock's holder): whatever temporary is there is then garbage nobody will
    rename into place."""
    if folder.is_dir():
        for pattern in TEMPORARIES:
            for leftover in folder.rglob(pattern):
                leftover.unlink(missing_ok=True)


def _in_use(run: Path, path: Path, waited: float) -> str:
    waited_text = f" (waited {waited:g} s)" if waited else ""
    try:
        info = json.loads(path.read_text() or "{}")
        holder, pid = f"{info['stage']}, pid {info['pid']}, since {info['since']}", int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return (f"{run} is in use by another duch process (holder unknown){waited_text}; wait for it to finish, "
                "or use another `run` directory")
    if children.alive(pid):
        return (f"{run} is in use by another duch process ({holder}){waited_text}; wait for it to finish (or "
                "rerun with `wait` SECONDS), or use another `run` directory")
    others = [p for p in children.holding(path) if p != os.getpid()]
    who = f"process {', '.join(map(str, others))}, started by it," if others else "a process it started"
    end_it = f", or end it: kill {' '.join(map(str, others))}" if others else ""
    return (f"{run} is locked by a duch process that is no longer running ({holder}); {who} still holds the "
            f"lock{waited_text}: rerun with `wait` SECONDS to wait for it{end_it}")
