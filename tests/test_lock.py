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
