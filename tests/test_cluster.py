"""Scale-out on dask.distributed: a real LocalCluster of worker processes gives what an in-process run gives,
and survives a worker killed mid-run."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from duch.pipeline import DuchError
from duch.pipeline.compute.children import holding
from duch.pipeline.compute.cluster import SchedulerSpec, local_layout
from duch.pipeline.config import ExtractConfig
from duch.pipeline.run.manifest import read_manifest
from duch.stages.extract import extract

from .test_kill import exited, wait_for_workers_and

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def quiet(_):
    pass


def test_scheduler_spec_parses_and_names_the_fix():
    assert SchedulerSpec.parse(None) == SchedulerSpec("none")
    assert SchedulerSpec.parse("local") == SchedulerSpec("local")
    assert SchedulerSpec.parse("local:3") == SchedulerSpec("local", workers=3)
    assert SchedulerSpec.parse("tcp://10.0.0.5:8786") == SchedulerSpec("address", address="tcp://10.0.0.5:8786")
    assert str(SchedulerSpec.parse("local:3")) == "local:3"
    for bad in ("local:0", "locale", "10.0.0.5:8786", "slurm"):
        with pytest.raises(DuchError, match="`scheduler`"):
            SchedulerSpec.parse(bad)


def test_local_layout_shares_cores_and_gpus():
    assert local_layout(None, gpus=0, cores=16) == (8, 2)
    assert local_layout(2, gpus=0, cores=2) == (2, 1)
    assert local_layout(None, gpus=4, cores=16) == (4, 4)  # one worker per GPU
    assert local_layout(None, gpus=0, cores=1) == (1, 1)


def archive_config(data: Path, run: Path, spec: str, **kw) -> ExtractConfig:
    # One torch thread in every process: float32 matmuls then sum in the same order here and on the workers.
    return ExtractConfig(data=str(data), run=str(run), image_encoder=spec, text_encoder=spec, device="cpu",
                         workers=0, threads=1, **kw)


def comparable(manifest: dict) -> dict:
    """A manifest less what may differ between two runs of the same work: when, where, how fast."""
    out = {k: v for k, v in manifest.items() if k not in ("created", "timings", "execution")}
    out["config"] = {k: v for k, v in manifest["config"].items() if k != "run"}
    return out


@pytest.fixture(scope="module")
def archive(tiny_extract_run) -> Path:
    """The 24 real tiles (and 48 captions) of the session's tiny archive."""
    manifest = read_manifest(tiny_extract_run / "extract")
    return Path(manifest["dataset"]["source"]).parent


def test_local_cluster_writes_the_in_process_shards(archive, tiny_clip_spec, tmp_path):
    here = extract(archive_config(archive, tmp_path / "here", tiny_clip_spec, shard_size=5), progress=False,
                   echo=quiet)
    said = []
    there = extract(archive_config(archive, tmp_path / "there", tiny_clip_spec, shard_size=5, scheduler="local:2"),
                    progress=False, echo=said.append)
    assert any(line.startswith("dask: LocalCluster of 2 worker processes") and "dashboard http" in line
               for line in said)
    # Bitwise: every shard's checksum, and the whole manifest but for timings and where it ran.
    assert comparable(there.manifest) == comparable(here.manifest)
    assert there.manifest["execution"]["scheduler"] == "local:2"
    assert there.manifest["execution"]["tasks"] == len(here.manifest["outputs"]) == 5 + 10
    assert "scheduler" not in there.manifest["config"]
    # A finished cluster run is up to date for an in-process rerun, and the other way round.
    assert not extract(archive_config(archive, tmp_path / "there", tiny_clip_spec, shard_size=5), progress=False,
                       echo=quiet).did_work


def test_a_worker_killed_mid_run_has_its_shards_redone_elsewhere(archive, tiny_clip_spec, tmp_path):
    from distributed import Client, LocalCluster

    expected = extract(archive_config(archive, tmp_path / "here", tiny_clip_spec, shard_size=2), progress=False,
                       echo=quiet).manifest
    stage = tmp_path / "there" / "extract"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=40) as cluster:
        with Client(cluster) as client:
            client.run(lambda: __import__("torch"))  # both workers warm, so the run reaches them at once
            pids = client.run(os.getpid)
        killed = {}

        def kill_one_worker():  # as soon as the first shard lands, one worker dies mid-task
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not list(stage.glob("*.h5")):
                time.sleep(0.005)
            address, pid = sorted(pids.items())[0]
            killed["shards_done"] = len(list(stage.glob("*.h5")))
            os.kill(pid, signal.SIGKILL)
            killed["address"] = address

        watcher = threading.Thread(target=kill_one_worker)
        watcher.start()
        result = extract(archive_config(archive, tmp_path / "there", tiny_clip_spec, shard_size=2,
                                        scheduler=cluster.scheduler_address), progress=False, echo=quiet)
        watcher.join()
    total = len(expected["outputs"])
    assert killed and killed["shards_done"] < total  # the kill landed while shards were still to do
    assert comparable(result.manifest) == comparable(expected)
    assert sorted(p.name for p in stage.iterdir()) == sorted([o["file"] for o in expected["outputs"]] +
                                                             ["manifest.json"])  # nothing twice, no temp left
    assert result.manifest["execution"]["scheduler"].startswith("tcp://")


def test_a_killed_cluster_driver_resumes_from_its_finished_shards(archive, tiny_clip_spec, tmp_path):
    """SIGKILL of the driver while the LocalCluster it started is working: its workers never held the run lock,
    so a rerun started at once gets the run, resumes, and ends with the shards of an uninterrupted run."""
    expected = extract(archive_config(archive, tmp_path / "here", tiny_clip_spec, shard_size=2), progress=False,
                       echo=quiet).manifest
    run = tmp_path / "there"
    cmd = [sys.executable, str(ROOT / "cli.py"), "extract", "--data", str(archive), "--run", str(run),
           "--image-encoder", tiny_clip_spec, "--text-encoder", tiny_clip_spec, "--shard-size", "2", "--device",
           "cpu", "--workers", "0", "--threads", "1", "--scheduler", "local:2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    workers = wait_for_workers_and(proc, lambda: len(list((run / "extract").glob("*.h5"))) >= 3)
    holders = holding(run / ".duch.lock")
    os.kill(proc.pid, signal.SIGKILL)  # the driver only: its workers are left to notice on their own
    proc.wait()
    assert workers, "the run ended before it could be killed with its cluster alive"
    assert holders == [proc.pid]  # the driver alone held the run lock, none of its workers
    done = {p.name for p in (run / "extract").glob("*.h5")}
    assert 0 < len(done) < len(expected["outputs"]) and not (run / "extract" / "manifest.json").exists()
    said = []
    # At once, no --wait: the lock went with the driver, while its workers may still be winding down.
    result = extract(archive_config(archive, run, tiny_clip_spec, shard_size=2, scheduler="local:2"),
                     progress=False, echo=said.append)
    assert said[0].startswith("extract: resuming,")
    assert comparable(result.manifest) == comparable(expected)
    assert exited(workers, within_s=60), "the killed driver's workers outlived it"
    shutil.rmtree(run)


def test_encode_archive_on_a_local_cluster_writes_the_in_process_code_files(tiny_extract_run, tmp_path):
    from duch.pipeline.config import EncodeConfig, TrainConfig
    from duch.stages.encode_archive import encode_archive
    from duch.stages.train_hash import train_hash

    trained = tmp_path / "trained"
    shutil.copytree(tiny_extract_run, trained)
    train_hash(TrainConfig(run=str(trained), bits=(8, 16), epochs=2, hidden=32, batch_size=8, eval_every=2,
                           device="cpu"), progress=False, echo=quiet)
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    config = dict(continuous=True, device="cpu", threads=1)
    here = encode_archive(EncodeConfig(run=str(trained), **config), progress=False, echo=quiet).manifest
    said = []
    there = encode_archive(EncodeConfig(run=str(other), scheduler="local:2", **config), progress=False,
                           echo=said.append).manifest
    assert any(line.startswith("dask: LocalCluster of 2 worker processes") for line in said)
    assert [(o["file"], o["sha256"]) for o in there["outputs"]] == [(o["file"], o["sha256"]) for o in here["outputs"]]
    shards = len(read_manifest(tiny_extract_run / "extract")["outputs"])
    assert there["execution"] == {"scheduler": "local:2", "workers": there["execution"]["workers"], "tasks": shards}
    assert here["execution"] == {"scheduler": "none"} and here["config"] == {**there["config"], "run": str(trained)}
    assert not (other / "encode-archive" / "parts").exists()


def test_a_worker_without_the_shared_paths_says_so(tmp_path):
    """A worker that does not see the run's storage stops the run with the path and the fix, rather than
    rejecting every image as missing."""
    from distributed import Client, LocalCluster

    from duch.pipeline.compute.cluster import require_shared

    require_shared({"the images folder": str(tmp_path / "absent")})  # in the driver: nothing to check
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0",
                      silence_logs=40) as cluster, Client(cluster) as client:
        client.submit(require_shared, {"the images folder": str(tmp_path)}).result()
        with pytest.raises(DuchError, match=rf"dask worker inproc://.*: the images folder {tmp_path / 'absent'} is not "
                                            r"there; the dataset and the run directory must be on storage every "
                                            r"worker mounts at the same path \(docs/cluster.md\)"):
            client.submit(require_shared, {"the images folder": str(tmp_path / "absent")}).result()
