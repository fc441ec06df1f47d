"""A run directory duch may not write to: a real mode 0555 folder, one clear line, nothing lost, and a rerun once
it is writable again. Root ignores file modes, so as root the commands run in a user namespace that maps them to
uid 1000 (the files' owner, without root's override); where that is impossible the test is skipped.

Also how pipeline.storage reads the forms in which the libraries under duch report a failed write."""
from __future__ import annotations

import errno
import json
import shutil

import h5py
import numpy as np
import pytest

from duch.pipeline.run.storage import error_number, storage_error, write_errors

from .faultkit import Zygote, as_unprivileged_prefix

pytestmark = pytest.mark.slow

KEPT = "files already finished are kept, and rerunning the same command resumes from them"


@pytest.fixture(scope="module")
def unprivileged():
    prefix = as_unprivileged_prefix()
    if prefix is None:
        pytest.skip("running as root with no user namespace to drop root's permission override")
    zygote = Zygote(prefix) if prefix else Zygote()
    yield zygote
    zygote.close()


def test_an_unwritable_run_directory_is_one_line_and_a_rerun_completes(unprivileged, tiny_extract_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_extract_run, run)
    train = ["train-hash", "--run", str(run), "--bits", "8", "--epochs", "2", "--hidden", "32", "--batch-size", "8",
             "--device", "cpu", "--no-progress"]
    run.chmod(0o555)
    try:
        out = unprivileged.run(train, tmp_path / "train.log")
    finally:
        run.chmod(0o755)
    assert out.code == 2, out.log
    assert out.log.strip() == (f"error: cannot write {run / 'train-hash'}: permission denied; make {run} writable "
                               f"(or choose another --run directory), then rerun: {KEPT}")
    again = unprivileged.run(train, tmp_path / "train-again.log")
    assert again.code == 0, again.log
    assert json.loads((run / "train-hash" / "manifest.json").read_text())["stage"] == "train-hash"

    fresh = tmp_path / "fresh"
    fresh.mkdir(mode=0o555)
    fresh.chmod(0o555)
    out = unprivileged.run(["extract", "--data", str(tmp_path / "nowhere"), "--run", str(fresh)],
                           tmp_path / "extract.log")
    assert out.code == 2, out.log
    assert out.log.strip() == (f"error: cannot write {fresh / '.duch.lock'}: permission denied; make {fresh} "
                               f"writable (or choose another --run directory), then rerun: {KEPT}")
    assert list(fresh.iterdir()) == []


def test_the_forms_a_failed_write_takes(tmp_path):
    """The errno behind each library's way of saying it: Python's, h5py's (an OSError, or a RuntimeError with the
    HDF5 error text) and safetensors' (a Rust io::Error in the message)."""
    assert error_number(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
    assert error_number(RuntimeError("Can't decrement id ref count (unable to extend file properly, errno = 27, "
                                     "error message = 'File too large')")) == errno.EFBIG
    assert error_number(Exception("Error while serializing: I/O error: No space left on device (os error 28)")) == 28
    assert error_number(ValueError("shape mismatch")) is None
    message = str(storage_error(OSError(errno.EROFS, "Read-only file system"), tmp_path / "x.h5"))
    assert message == (f"cannot write {tmp_path / 'x.h5'}: read-only file system; make {tmp_path} writable (or "
                       f"choose another `run` directory), then rerun: {KEPT}")
    assert storage_error(OSError(errno.ENOENT, "No such file"), tmp_path) is None  # not a space or permission issue

    with pytest.raises(ValueError, match="shape"):  # other failures pass through unchanged: bugs to see
        with write_errors(tmp_path / "y"):
            raise ValueError("shape mismatch")


def test_a_real_file_size_limit_on_an_hdf5_write_is_one_clear_error(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse a write past the limit (EFBIG), which h5py reports as a RuntimeError
    with the errno in its text: the path that write_shard, CodeWriter and the checkpoints take."""
    import subprocess
    import sys

    from .faultkit import ROOT

    code = f"""
import resource, signal, sys, numpy as np
sys.path.insert(0, {str(ROOT)!r})
from duch.pipeline import DuchError
from duch.pipeline.formats.shards import write_shard
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
write_shard({str(tmp_path / 'small.h5')!r}, {{"emb": np.zeros(100)}}, {{}})
try:
    write_shard({str(tmp_path / 'big.h5')!r}, {{"emb": np.zeros(100_000)}}, {{}})
except DuchError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"cannot write {tmp_path / 'big.h5'}: file too large for the file size limit of "
                                  "this process (ulimit -f) or of its file system; raise the limit or choose another "
                                  f"`run` directory, then rerun: {KEPT}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.h5"]  # no temporary file left
    with h5py.File(tmp_path / "small.h5") as f:
        assert np.array_equal(f["emb"][()], np.zeros(100))
