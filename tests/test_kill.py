"""A real crash: a stage's process is SIGKILLed mid-run, with its worker processes (DataLoader workers, a dask
LocalCluster) alive, then rerun at once to completion. Extract's LocalCluster case is in test_cluster.py."""
import json
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

from .conftest import ASSETS, REAL_JPEGS, write_caption_json

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


def wait_for_workers_and(proc: subprocess.Popen, done) -> list[int]:
    """The stage's child processes, once at least two are alive (the LocalCluster's workers, beside dask's
    resource tracker) and `done()` says the work is under way; [] if the stage ended first."""
    deadline = time.monotonic() + 180  # generous: a loaded 2-core machine starts a cluster slowly
    while proc.poll() is None and time.monotonic() < deadline:
        alive = children_of(proc.pid)
        if len(alive) >= 2 and done():
            return alive
        time.sleep(0.005)
    return []


def exited(pids: list[int], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if all(not Path(f"/proc/{p}").exists() or "\nState:\tZ" in Path(f"/proc/{p}/status").read_text()
               for p in pids if Path(f"/proc/{p}").exists()):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_clip_spec) -> Path:
    """A trained run whose archive is cut into many small shards (36 encode-archive tasks): copy it before use."""
    from duch.pipeline.config import ExtractConfig, TrainConfig
    from duch.stages.extract import extract
    from duch.stages.train_hash import train_hash

    data = make_archive(tmp_path_factory.mktemp("archive"), 24)
    run = tmp_path_factory.mktemp("trained")
    extract(ExtractConfig(data=str(data), run=str(run), image_encoder=tiny_clip_spec, text_encoder=tiny_clip_spec,
                          shard_size=2, workers=0, device="cpu"), progress=False, echo=lambda _: None)
    train_hash(TrainConfig(run=str(run), bits=(8, 16), split="all", epochs=2, hidden=32, batch_size=8,
                           eval_every=2, device="cpu"), progress=False, echo=lambda _: None)
    return run


def test_encode_archive_killed_with_its_local_cluster_alive_frees_its_run_at_once(tmp_path, trained_run):
    from duch.pipeline.compute.children import holding
    from duch.pipeline.config import EncodeConfig
    from duch.stages.encode_archive import encode_archive

    clean, run = tmp_path / "clean", tmp_path / "run"
    shutil.copytree(trained_run, clean)
    shutil.copytree(trained_run, run)
    expected = encode_archive(EncodeConfig(run=str(clean), continuous=True, device="cpu", threads=1), progress=False,
                              echo=lambda _: None).manifest
    argv = [sys.executable, str(ROOT / "cli.py"), "encode-archive", "--run", str(run), "--continuous", "--device",
            "cpu", "--threads", "1", "--scheduler", "local:2", "--no-progress"]
    parts = run / "encode-archive" / "parts"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            start_new_session=True)
    workers = wait_for_workers_and(proc, lambda: parts.is_dir() and bool(list(parts.glob("*.h5"))))
    holders = holding(run / ".duch.lock")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert workers, "the run ended before it could be killed with its cluster alive"
    assert holders == [proc.pid]
    assert not (run / "encode-archive" / "manifest.json").exists()

    rerun = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)  # at once
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert exited(workers, within_s=60), "the killed driver's workers outlived it"
    resumed = json.loads((run / "encode-archive" / "manifest.json").read_text())
    assert [(o["file"], o["sha256"]) for o in resumed["outputs"]] == [(o["file"], o["sha256"])
                                                                      for o in expected["outputs"]]
    assert not parts.exists() and not list((run / "encode-archive").glob(".*.tmp"))
