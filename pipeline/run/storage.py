"""Writing a run's files: atomically and durably, and with failures a user can fix as one clear DuchError.

`atomic_write(path)` is the one way a finished file reaches its name: it is written under a temporary name
unique to its writer, fsynced, renamed into place, and the folder is fsynced, so that after a crash or a power
cut a file is either complete under its name or absent (the rename itself is on disk before the next file is).
Folders are made with `make_folders`, which fsyncs each new folder into its parent, for the same reason.

Every writer of a run's files (HDF5 shards, code files, checkpoints, weights, manifests, plots) wraps its writes
in `write_errors(path)` (atomic_write does). The libraries underneath report the same failure in different
forms: Python's OSError with an errno, h5py's OSError or RuntimeError with "errno = 28" inside the HDF5 error
text, safetensors' error with "os error 28" inside the Rust one. All of them come out as the one message below,
naming the file.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

from duch.pipeline import DuchError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_PERMISSION = {errno.EACCES, errno.EPERM}
_READ_ONLY = {errno.EROFS}
_NOT_A_FOLDER = {errno.ENOTDIR, errno.EEXIST}
_ERRNO_IN_TEXT = re.compile(r"(?:errno = |code: |os error |\[Errno )(\d+)")


def error_number(exc: BaseException) -> int | None:
    """The errno behind an exception, wherever its library put it."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    match = _ERRNO_IN_TEXT.search(str(exc))
    return int(match.group(1)) if match else None


def storage_error(exc: BaseException, path: str | os.PathLike | None = None) -> DuchError | None:
    """The user's message for a write that failed for want of space or permission; None for any other failure."""
    number = error_number(exc)
    if path is None:
        path = getattr(exc, "filename", None) or "a file of the run"
    path = Path(path)
    kept = "files already finished are kept, and rerunning the same command resumes from them"
    if number == errno.EFBIG:
        return DuchError(f"cannot write {path}: file too large for the file size limit of this process (ulimit -f) "
                         f"or of its file system; raise the limit or choose another `run` directory, then rerun: "
                         f"{kept}")
    if number in _NO_SPACE:
        what = "no space left on device" if number == errno.ENOSPC else "disk quota exceeded"
        return DuchError(f"cannot write {path}: {what}; free some space on {_mount_of(path)} (or choose another "
                         f"`run` directory), then rerun: {kept}")
    if number in _NO_PERMISSION or number in _READ_ONLY:
        what = "read-only file system" if number in _READ_ONLY else "permission denied"
        return DuchError(f"cannot write {path}: {what}; make {path.parent} writable (or choose another `run` "
                         f"directory), then rerun: {kept}")
    if number in _NOT_A_FOLDER:
        return DuchError(f"cannot write {path}: a file stands where a folder is needed; give a folder as `run`")
    return None


def _mount_of(path: Path) -> Path:
    """The mount point holding `path`: where the space has to be freed."""
    try:
        current = Path(os.path.abspath(path))
        while not current.exists():
            current = current.parent
        while not os.path.ismount(current):
            current = current.parent
        return current
    except OSError:
        return path.parent


@contextlib.contextmanager
def write_errors(path: str | os.PathLike):
    """Turn a failed write of `path` for want of space or permission into a DuchError naming it; other failures
    pass through unchanged (they are bugs to see, not conditions to explain)."""
    try:
        yield
    except DuchError:
        raise
    except Exception as e:
        translated = storage_error(e, path) if _looks_like_storage(e) else None
        if translated is None:
            raise
        raise translated from e


def _looks_like_storage(exc: BaseException) -> bool:
    # Only OSError, h5py's RuntimeError and safetensors' error carry write failures; a ValueError that happens to
    # mention a number must not be read as one.
    return isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError"


def temp_path(path: Path) -> Path:
    """A temporary name beside `path`, unique to this writer: two attempts at one file (a task retried on another
    dask worker while the first still runs) never write into the same file; the one that finishes last renames
    over the other's identical result. `.NAME.*.tmp`, the pattern run_lock sweeps."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the entries of `folder` (a rename into it, a file created or removed) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folders(path: str | os.PathLike) -> None:
    """`mkdir -p path`, durably: each folder made is fsynced into its parent, so that after a power cut the files
    later published in it are not lost with a folder whose own name never reached the disk. A file standing where
    a folder is needed raises FileExistsError, as mkdir does."""
    path, missing = Path(path), []
    while not path.is_dir() and path != path.parent:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)  # another writer may make it at the same moment: its entry is synced alike
        fsync_folder(folder.parent)


def publish(tmp: Path, path: Path) -> None:
    """A complete temporary file under its final name, durably: the file's bytes, then the rename."""
    with open(tmp, "rb+") as raw:
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    fsync_folder(Path(path).parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_write(path) as tmp:` write the whole file at `tmp`; when the block ends it is published under
    `path` (see `publish`). If the block fails, the temporary is removed and `path` is left as it was. Failures for
    want of space or permission come out as a DuchError naming `path`."""
    path = Path(path)
    with write_errors(path):
        make_folders(path.parent)
        tmp = temp_path(path)
        try:
            yield tmp
            publish(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
