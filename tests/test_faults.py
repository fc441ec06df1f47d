"""Fault injection: every stage SIGKILLed at random points, again and again, then rerun to completion; its outputs
equal an uninterrupted run's and no partial file is ever taken as finished. A full disk (a real 1 MiB tmpfs, and
ENOSPC injected at fsync) and a read-only disk give one clear line, keep what was finished, and a rerun with the
space back completes to the same outputs.

The kills land at seeded random delays within the measured length of an uninterrupted run of the same stage,
at most MAX_KILLS a stage and within CAP_S seconds; FAULTS records how many landed before the stage finished
(printed at the end: the figures of issue 6's closing note).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from duch.pipeline.formats.shards import read_attrs, read_shard
from duch.pipeline.run.artifacts import sha256_file
from duch.pipeline.run.lock import TEMPORARIES

from .conftest import ASSETS, REAL_JPEGS, write_caption_json
from .faultkit import Zygote, namespaces_work

pytestmark = pytest.mark.slow

MAX_KILLS = 5
CAP_S = 15.0  # per stage, for its kill loop
SEED = int(os.environ.get("DUCH_FAULT_SEED", "6"))
FAULTS: dict[str, dict] = {}
TMPFS = 1 << 20
PAGE = 4096


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip_spec):
    """A zygote (in a user+mount namespace with a 1 MiB tmpfs and a read-only bind mount, where the kernel allows
    it), a 40-image archive, and one uninterrupted run of every stage with its timings."""
    base = tmp_path_factory.mktemp("faults")
    (base / "full").mkdir()
    (base / "readonly").mkdir()
    namespaced = namespaces_work()
    if namespaced:
        mounts = (f"mount -t tmpfs -o size={TMPFS} tmpfs {base / 'full'} && "
                  f"mount --bind {base / 'readonly'} {base / 'readonly'} && "
                  f"mount -o remount,bind,ro {base / 'readonly'}")
        zygote = Zygote(["unshare", "--user", "--map-root-user", "--mount"], mounts)
    else:
        zygote = Zygote()
    data = base / "data"
    (data / "images").mkdir(parents=True)
    entries = []
    for i in range(40):
        shutil.copy(ASSETS / REAL_JPEGS[i % len(REAL_JPEGS)], data / "images" / f"{i}.jpg")
        entries.append({"filename": f"{i}.jpg", "classname": "abc"[i % 3],
                        "sentences": [{"raw": f"a tile {i}"}, {"raw": f"scene {i}"}]})
    write_caption_json(data, entries)
    w = {"base": base, "zygote": zygote, "namespaced": namespaced, "data": data, "spec": tiny_clip_spec,
         "seconds": {}}
    clean = base / "clean"
    for stage in ("extract", "train-hash", "encode-archive", "evaluate"):
        out = zygote.run(command(w, stage, clean), base / f"clean-{stage}.log")
        assert out.code == 0, out.log
        w["seconds"][stage] = out.seconds
    w["clean"] = clean
    yield w
    zygote.close()
    if FAULTS:
        print("\nfaults injected per stage:", json.dumps(FAULTS, indent=1))


def command(w: dict, stage: str, run: Path) -> list[str]:
    if stage == "extract":
        return ["extract", "--data", str(w["data"]), "--run", str(run), "--image-encoder", w["spec"],
                "--text-encoder", w["spec"], "--shard-size", "4", "--batch-size", "2", "--workers", "0",
                "--device", "cpu", "--no-progress"]
    if stage == "train-hash":
        return ["train-hash", "--run", str(run), "--bits", "8,16", "--epochs", "30", "--hidden", "64",
                "--batch-size", "8", "--checkpoint-every", "2", "--eval-every", "10", "--precision", "fp32",
                "--device", "cpu", "--no-progress"]
    if stage == "encode-archive":
        return ["encode-archive", "--run", str(run), "--continuous", "--device", "cpu", "--no-progress"]
    return ["evaluate", "--run", str(run)]


def copy_run(w: dict, upto: str, name: str) -> Path:
    """A copy of the uninterrupted run holding the stages before `upto`, the starting point of a faulted one."""
    order = ["extract", "train-hash", "encode-archive", "evaluate"]
    target = w["base"] / name
    target.mkdir()
    for stage in order[:order.index(upto)]:
        shutil.copytree(w["clean"] / stage, target / stage)
    return target


# ---------------------------------------------------------------------------------------------- invariants
def finished_outputs_verify(stage_dir: Path) -> None:
    """A manifest on disk means the stage finished: then everything it lists is whole."""
    manifest = stage_dir / "manifest.json"
    if manifest.exists():
        for out in json.loads(manifest.read_text())["outputs"]:
            path = stage_dir / out["file"]
            assert path.stat().st_size == out["bytes"] and sha256_file(path) == out["sha256"], path


def shards_equal(a: Path, b: Path) -> None:
    x, y = read_shard(a), read_shard(b)
    assert x.keys() == y.keys(), a.name
    for key in x:
        assert np.array_equal(x[key], y[key]), f"{a.name}: {key}"
    assert read_attrs(a) == read_attrs(b), a.name


def code_files_equal(a: Path, b: Path) -> None:
    with h5py.File(a, "r") as f, h5py.File(b, "r") as g:
        assert dict(f.attrs) == dict(g.attrs)
        names = []
        f.visit(names.append)
        assert names == (lambda out: g.visit(out.append) or out)([])
        for name in names:
            if isinstance(f[name], h5py.Dataset):
                assert np.array_equal(f[name][()], g[name][()]), f"{a.name}: {name}"


def no_partial_file_under_a_final_name(stage: str, run: Path, clean: Path) -> None:
    """Whatever a killed run left under a final name is complete: equal to the uninterrupted run's file."""
    folder = run / stage
    finished_outputs_verify(folder)
    if not folder.exists():
        return
    if stage == "extract":
        for shard in folder.glob("*.h5"):
            shards_equal(shard, clean / stage / shard.name)
    elif stage == "train-hash":
        for result in folder.glob("bits-*/result.json"):  # result.json is the code length's "finished" mark
            model = result.parent / "model.safetensors"
            assert model.read_bytes() == (clean / stage / result.parent.name / model.name).read_bytes()
    elif stage == "encode-archive":
        for codes in folder.glob("codes-*.h5"):
            code_files_equal(codes, clean / stage / codes.name)


def outputs_equal(stage: str, run: Path, clean: Path) -> None:
    a, b = run / stage, clean / stage
    finished_outputs_verify(a)
    listed = lambda d: sorted(o["file"] for o in json.loads((d / "manifest.json").read_text())["outputs"])  # noqa
    assert listed(a) == listed(b)
    if stage == "extract":
        for name in listed(b):
            shards_equal(a / name, b / name)
    elif stage == "train-hash":
        for name in listed(b):
            if name.endswith(("model.safetensors", "history.json", "losses.csv")):
                assert (a / name).read_bytes() == (b / name).read_bytes(), name
        assert not list(a.glob("bits-*/checkpoint*")), "a finished code length keeps no checkpoint"
    elif stage == "encode-archive":
        for name in listed(b):
            code_files_equal(a / name, b / name)
    else:
        for name in ("metrics.json", "table.md"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------- kill loops
def resumed(log: str) -> bool:
    """Whether a run said it took up finished work (shards, a checkpoint, code files) left by a killed one."""
    return "resuming" in log or "already encoded, kept" in log or "already trained, kept" in log


@pytest.mark.parametrize("stage", ["extract", "train-hash", "encode-archive", "evaluate"])
def test_random_sigkills_then_a_rerun_give_the_uninterrupted_outputs(world, stage):
    w, z = world, world["zygote"]
    run = copy_run(w, stage, f"killed-{stage}")
    argv = command(w, stage, run)
    rng = random.Random(f"{SEED}-{stage}")
    length = w["seconds"][stage]
    stats = {"kills": 0, "landed_mid_work": 0, "finished_before_the_kill": 0, "resumed_runs": 0}
    deadline = time.monotonic() + CAP_S
    while stats["kills"] < MAX_KILLS and time.monotonic() < deadline:
        # Within the first 70% of an uninterrupted run's length, shrinking with every kill as the work left does:
        # the first attempt is always cut short, each gets through a part of the work (a stage spends its first
        # ~30% loading), and several kills land before a resumed attempt is short enough to finish.
        delay = rng.uniform(0.15, 0.7) * length * 0.7 ** stats["kills"]
        out = z.run(argv, w["base"] / f"{stage}.log", kill_after=delay)
        if not out.killed:
            assert out.code == 0, out.log
            stats["finished_before_the_kill"] += 1
            break
        stats["kills"] += 1
        stats["landed_mid_work"] += not (run / stage / "manifest.json").exists()
        stats["resumed_runs"] += resumed(out.log)
        no_partial_file_under_a_final_name(stage, run, w["clean"])
    final = z.run(argv, w["base"] / f"{stage}-final.log")
    assert final.code == 0, final.log
    stats["resumed_runs"] += resumed(final.log)
    outputs_equal(stage, run, w["clean"])
    # Temporary files of killed attempts are garbage, never read; the rerun sweeps them once it holds the run lock.
    left = [p for pattern in TEMPORARIES for p in (run / stage).rglob(pattern)]
    stats["temporary_files_left"] = len(left)
    assert stats["temporary_files_left"] == 0, sorted(left)
    FAULTS[stage] = stats
    assert stats["landed_mid_work"] >= 1, stats  # the loop did kill the stage at work


def test_a_kill_after_a_checkpoint_resumes_train_hash_to_identical_weights(world):
    """checkpoint every 2 epochs; killed once the checkpoint after epoch 10 or later is on disk; the rerun says
    it resumes from it and ends with the bytes of the uninterrupted run's model.safetensors."""
    w, z = world, world["zygote"]
    run = copy_run(w, "train-hash", "checkpointed")
    argv = command(w, "train-hash", run)
    index = run / "train-hash" / "bits-8" / "checkpoint.json"
    pid = z.spawn(argv, w["base"] / "ckpt.log")
    deadline = time.monotonic() + 60
    epoch = 0
    while time.monotonic() < deadline and z.wait(pid, block=False) is None:
        try:
            epoch = json.loads(index.read_text())["epoch"]
        except (OSError, ValueError):
            epoch = 0
        if epoch >= 10:
            break
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    assert z.wait(pid) == -signal.SIGKILL, "train-hash ended before it could be killed"
    assert not (run / "train-hash" / "bits-8" / "result.json").exists()
    saved = json.loads(index.read_text())["epoch"]
    assert 10 <= saved < 30
    out = z.run(argv, w["base"] / "ckpt-rerun.log")
    assert out.code == 0, out.log
    assert f"train-hash: 8 bits: resuming from the checkpoint after epoch {saved} of 30" in out.log
    outputs_equal("train-hash", run, w["clean"])


# ---------------------------------------------------------------------------------------------- full disks
def test_a_full_disk_mid_extract_keeps_finished_shards_and_a_rerun_with_space_completes(world):
    """A real 1 MiB tmpfs, filled but for room for a few shards: the kernel's ENOSPC, not a simulated one."""
    w, z = world, world["zygote"]
    if not w["namespaced"]:
        pytest.skip("no unprivileged user+mount namespaces here to mount a small tmpfs")
    full = z.root() / str(w["base"] / "full").lstrip("/")  # the tmpfs, as the zygote's namespace sees it
    run = w["base"] / "full" / "run"
    shard = (w["clean"] / "extract" / "image-00000.h5").stat().st_size
    filler = full / "filler"
    # Room for the lock file and about three image shards (each written whole as a temporary file first).
    with open(filler, "wb") as f:
        f.write(b"\0" * (TMPFS - 2 * PAGE - 3 * -(-shard // PAGE) * PAGE))
    out = z.run(command(w, "extract", run), w["base"] / "enospc.log")
    assert out.code == 2, out.log
    line = out.log.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write {run / 'extract'}/image-0000"), line
    assert line.endswith(f".h5: no space left on device; free some space on {w['base'] / 'full'} (or choose "
                         "another --run directory), then rerun: files already finished are kept, and rerunning the "
                         "same command resumes from them"), line
    kept = sorted((full / "run" / "extract").glob("*.h5"))
    assert kept, "no shard was finished before the disk filled"
    for path in kept:
        shards_equal(path, w["clean"] / "extract" / path.name)
    assert not list((full / "run" / "extract").glob(".*.tmp")), "a failed write leaves no temporary file"
    filler.unlink()  # space is back
    again = z.run(command(w, "extract", run), w["base"] / "enospc-rerun.log")
    assert again.code == 0, again.log
    assert f"resuming, {len(kept)} of 30 shards already finished" in again.log
    outputs_equal("extract", full / "run", w["clean"])
    FAULTS["disk full (tmpfs, extract)"] = {"shards kept": len(kept), "message": line}


@pytest.mark.parametrize("stage, match, nth", [
    ("extract", ".h5.", 4),  # the 4th shard's fsync
    ("train-hash", ".checkpoint-e", 3),  # the 3rd checkpoint
    ("encode-archive", ".codes-16.h5.", 1),
])
def test_enospc_at_fsync_is_one_line_and_a_rerun_resumes(world, stage, match, nth):
    """ENOSPC injected at the OS boundary (os.fsync of the Nth matching temporary file), as a filesystem with
    delayed allocation reports a full disk."""
    w, z = world, world["zygote"]
    run = copy_run(w, stage, f"fsync-{stage}")
    out = z.run(command(w, stage, run), w["base"] / f"fsync-{stage}.log", fault={"match": match, "nth": nth})
    assert out.code == 2, out.log
    line = out.log.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write {run / stage}/"), line
    assert ": no space left on device; free some space on " in line and line.endswith(
        "then rerun: files already finished are kept, and rerunning the same command resumes from them"), line
    assert "Traceback" not in out.log
    no_partial_file_under_a_final_name(stage, run, w["clean"])
    assert not list((run / stage).rglob(".*.tmp")), "a failed write leaves no temporary file"
    again = z.run(command(w, stage, run), w["base"] / f"fsync-{stage}-rerun.log")
    assert again.code == 0, again.log
    outputs_equal(stage, run, w["clean"])
    FAULTS[f"ENOSPC at fsync ({stage})"] = {"message": line, "rerun resumed": resumed(again.log)}


def test_a_read_only_run_directory_is_one_line(world):
    w, z = world, world["zygote"]
    if not w["namespaced"]:
        pytest.skip("no unprivileged user+mount namespaces here for a read-only bind mount")
    run = w["base"] / "readonly" / "run"
    shutil.copytree(w["clean"] / "extract", run / "extract")  # from outside, where the folder is writable
    out = z.run(command(w, "train-hash", run), w["base"] / "erofs.log")
    assert out.code == 2, out.log
    assert out.log.strip() == (
        f"error: cannot write {run / '.duch.lock'}: read-only file system; make {run} writable (or choose another "
        "--run directory), then rerun: files already finished are kept, and rerunning the same command resumes "
        "from them")
