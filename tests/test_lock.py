import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from duch.pipeline import DuchError
from duch.pipeline.run.lock import run_lock

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from duch.pipeline.run.lock import run_lock
with run_lock({run!r}, "extract"):
    print("held", flush=True)
    time.sleep(60)
"""


def holder(run: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(Path(__file__).parents[1]), run=str(run))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_with_the_holder_named_and_a_killed_holder_frees_the_run(tmp_path):
    proc = holder(tmp_path)
    try:
        with pytest.raises(DuchError, match=rf"{tmp_path} is in use by another duch process \(extract, pid "
                                            rf"{proc.pid}, since .*\); wait for it to finish"):
            with run_lock(tmp_path, "train-hash"):
                pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the lock dies with its process: nothing stale is left
        proc.wait()
    with run_lock(tmp_path, "train-hash"):
        assert "train-hash" in (tmp_path / ".duch.lock").read_text()


def test_waiting_for_the_lock(tmp_path):
    proc = holder(tmp_path)
    t = time.monotonic()
    try:
        with pytest.raises(DuchError, match="in use"):
            with run_lock(tmp_path, "evaluate", wait_s=0.5):
                pass
        assert time.monotonic() - t >= 0.5
    finally:
        proc.kill()
        proc.wait()
    with run_lock(tmp_path, "evaluate", wait_s=5):  # free again
        pass


def test_every_stage_takes_the_lock_before_touching_the_run(tmp_path):
    from duch.pipeline.config import EncodeConfig, EvaluateConfig, ExtractConfig, TrainConfig
    from duch.stages.encode_archive import encode_archive
    from duch.stages.evaluate import evaluate
    from duch.stages.extract import extract
    from duch.stages.train_hash import train_hash

    proc = holder(tmp_path)
    try:
        calls = [lambda: extract(ExtractConfig(data=str(tmp_path / "none"), run=str(tmp_path)), progress=False),
                 lambda: train_hash(TrainConfig(run=str(tmp_path)), progress=False),
                 lambda: encode_archive(EncodeConfig(run=str(tmp_path)), progress=False),
                 lambda: evaluate(EvaluateConfig(run=str(tmp_path)))]
        for call in calls:
            with pytest.raises(DuchError, match="in use by another duch process"):
                call()
        assert sorted(p.name for p in tmp_path.iterdir()) == [".duch.lock"]  # nothing else written
    finally:
        proc.kill()
        proc.wait()


ORPHANED = """
import fcntl, json, os, sys, time
fd = os.open({path!r}, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({{"stage": "extract", "pid": os.getpid(), "since": "then"}}).encode())
child = os.fork()
if child == 0:  # a worker that inherited the lock, as a DataLoader worker did before duch closed it in children
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
os._exit(0)  # the holder dies; its child lives on with the lock
"""


def test_a_lock_kept_by_a_dead_holders_child_is_named_as_such(tmp_path):
    out = subprocess.run([sys.executable, "-c", ORPHANED.format(path=str(tmp_path / ".duch.lock"))],
                         capture_output=True, text=True)
    child = int(out.stdout)
    holder = json.loads((tmp_path / ".duch.lock").read_text())["pid"]
    try:
        with pytest.raises(DuchError) as e:
            with run_lock(tmp_path, "train-hash", wait_s=0.3):
                pass
        assert str(e.value) == (
            f"{tmp_path} is locked by a duch process that is no longer running (extract, pid {holder}, since then); "
            f"process {child}, started by it, still holds the lock (waited 0.3 s): rerun with `wait` SECONDS to "
            f"wait for it, or end it: kill {child}")
    finally:
        os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:  # reaped by init
        time.sleep(0.05)
    with run_lock(tmp_path, "train-hash", wait_s=5):
        pass


def test_children_forked_under_the_lock_do_not_hold_it(tmp_path):
    """The fix for the above: a child forked while the lock is held closes its copy, so the lock goes with its
    holder; the child itself is asked to die with it."""
    with run_lock(tmp_path, "extract"):
        child = os.fork()
        if child == 0:
            fds = os.listdir("/proc/self/fd")
            lock_open = any(os.path.realpath(f"/proc/self/fd/{fd}") == str((tmp_path / ".duch.lock").resolve())
                            for fd in fds if os.path.exists(f"/proc/self/fd/{fd}"))
            import ctypes

            sig = ctypes.c_int()
            ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
            os._exit(0 if not lock_open and sig.value == signal.SIGKILL else 1)
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_cli_waits_for_a_busy_run_when_asked(tmp_path):
    from click.testing import CliRunner

    from duch import cli

    proc = holder(tmp_path)
    try:
        t = time.monotonic()
        said = CliRunner().invoke(cli.main, ["evaluate", "--run", str(tmp_path), "--wait", "0.4"])
        assert time.monotonic() - t >= 0.4
        assert said.exit_code == 2 and "(waited 0.4 s); wait for it to finish" in said.output
    finally:
        proc.kill()
        proc.wait()


def test_taking_the_lock_sweeps_what_killed_writers_left(tmp_path):
    """duch's temporaries and safetensors' own (`.tmpXXXXXX`, renamed onto duch's when its save completes) are
    garbage once the lock is held; finished files stay."""
    bits = tmp_path / "train-hash" / "bits-16"
    bits.mkdir(parents=True)
    for name in (".model.safetensors.123-ab12cd34.tmp", ".tmpAb3xYz", "model.safetensors", ".tmp-old-notes"):
        (bits / name).write_bytes(b"x")
    with run_lock(tmp_path, "train-hash"):
        assert sorted(p.name for p in bits.iterdir()) == [".tmp-old-notes", "model.safetensors"]
