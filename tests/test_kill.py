"""A real crash: the extract process is SIGKILLed mid-run, then rerun to completion."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from duch.pipeline.formats.shards import read_shard
from tests.conftest import ASSETS, REAL_JPEGS, write_caption_json

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def make_archive(root: Path, n: int) -> Path:
    (root / "images").mkdir(parents=True)
    entries = []
    for i in range(n):
        shutil.copy(ASSETS / REAL_JPEGS[i % len(REAL_JPEGS)], root / "images" / f"{i}.jpg")
        entries.append({"filename": f"{i}.jpg", "sentences": [{"raw": f"tile {i}"}, {"raw": f"scene {i}"}]})
    write_caption_json(root, entries)
    return root


def command(data: Path, run: Path, spec: str, workers: int = 0) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), "extract", "--data", str(data), "--run", str(run),
            "--image-encoder", spec, "--text-encoder", spec, "--shard-size", "4", "--batch-size", "2",
            "--workers", str(workers), "--device", "cpu", "--no-progress"]


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_clip_spec):
    data = make_archive(tmp_path / "archive", 120)
    clean = tmp_path / "clean"
    subprocess.run(command(data, clean, tiny_clip_spec), check=True, capture_output=True, cwd=ROOT)

    run = tmp_path / "killed"
    stage = run / "extract"
    proc = subprocess.Popen(command(data, run, tiny_clip_spec), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=ROOT)
    deadline = time.monotonic() + 120
    while len(list(stage.glob("image-*.h5"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (stage / "manifest.json").exists(), "the run finished before it could be killed"
    finished = sorted(p.name for p in stage.glob("*.h5"))
    assert 3 <= len(finished) < 30 + 60  # 30 image and 60 text shards in all

    rerun = subprocess.run(command(data, run, tiny_clip_spec), capture_output=True, text=True, cwd=ROOT)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming, {len(finished)} of 90 shards already finished" in rerun.stdout
    assert not list(stage.glob(".*.tmp"))
    for shard in sorted((clean / "extract").glob("*.h5")):
        a, b = read_shard(shard), read_shard(stage / shard.name)
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a), shard.name


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_a_stage_killed_with_live_worker_processes_frees_its_run_at_once(tmp_path, tiny_clip_spec):
    """SIGKILL while DataLoader workers (forked children) are alive: they never held the run lock, so a rerun
    started right away gets the run, and the workers die with their parent."""
    data = make_archive(tmp_path / "archive", 120)
    run = tmp_path / "run"
    argv = command(data, run, tiny_clip_spec, workers=2)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while proc.poll() is None and time.monotonic() < deadline and not (
            workers and list((run / "extract").glob("image-*.h5"))):
        workers = children_of(proc.pid)
        time.sleep(0.005)
    assert workers and proc.poll() is None, "the run ended before it could be killed with its workers alive"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)  # at once: no wait, no retry
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming" in rerun.stdout
    assert (run / "extract" / "manifest.json").exists()
    for pid in workers:  # they died with the killed stage (PR_SET_PDEATHSIG), not minutes later
        assert not Path(f"/proc/{pid}").exists() or "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
