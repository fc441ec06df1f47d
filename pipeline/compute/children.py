"""Child processes of a duch process that holds a run lock: they never keep the lock, and they die with it.

A run lock is a flock on an open file; a forked child (a DataLoader worker) shares the open file and with it the
lock, so a killed stage's run would stay locked until its last child exited. Every child forked while a lock is
held closes its copy of the lock's descriptor first thing, and asks the kernel to kill it when its parent dies
(Linux's PR_SET_PDEATHSIG). Processes started by exec (dask's spawned workers) never see the descriptor: it is
opened close-on-exec; dask's own workers exit when their parent does.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

_LOCK_FDS: set[int] = set()
_PR_SET_PDEATHSIG = 1


def _in_child() -> None:
    if not _LOCK_FDS:
        return
    for fd in _LOCK_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)  # the child's copy only: the parent's lock stays
    _LOCK_FDS.clear()
    die_with_parent()


os.register_at_fork(after_in_child=_in_child)


@contextlib.contextmanager
def fd_closed_in_children(fd: int) -> Iterator[None]:
    """While the block runs, processes this one forks close `fd` (and die with it)."""
    _LOCK_FDS.add(fd)
    try:
        yield
    finally:
        _LOCK_FDS.discard(fd)


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" not in status


def holding(path: str | os.PathLike) -> list[int]:
    """The processes with `path` open, from /proc (Linux; elsewhere none are named)."""
    target = os.path.realpath(path)
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                for fd in os.scandir(f"/proc/{entry.name}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(fd.path) == target:
                            found.append(int(entry.name))
                            break
    return sorted(found)
