"""A growing archive: `duch add`, `remove` and `compact` on an encoded run, seen by search and evaluate."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from duch.pipeline import DuchError
from duch.pipeline.archive.generation import read_generation
from duch.pipeline.config import AddConfig, CompactConfig, EncodeConfig, ExtractConfig, RemoveConfig, TrainConfig
from duch.pipeline.formats.codes import codes_name, open_codes
from duch.pipeline.retrieval.search import Index
from duch.stages.add import add
from duch.stages.compact import compact
from duch.stages.encode_archive import encode_archive
from duch.stages.extract import extract
from duch.stages.remove import remove
from duch.stages.train_hash import train_hash

from .conftest import ASSETS, REAL_JPEGS, write_caption_json

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "harbor", "court")
N_A, N_B = 12, 6


def quiet(_):
    pass


def tile(i: int) -> Image.Image:
    """A real tile with a mark of its own, so that every item has its own embedding."""
    img = Image.open(ASSETS / REAL_JPEGS[i % len(REAL_JPEGS)]).convert("RGB").resize((96, 96))
    ImageDraw.Draw(img).rectangle([4 * (i % 8), 4 * (i // 8), 4 * (i % 8) + 20, 4 * (i // 8) + 20],
                                  fill=(37 * i % 256, 91 * i % 256, 53 * i % 256))
    return img


def entries(ids) -> list[dict]:
    return [{"filename": f"{i}.jpg", "classname": CLASSES[i % 3],
             "sentences": [{"raw": f"a {CLASSES[i % 3]} tile {i}"}, {"raw": f"{CLASSES[i % 3]} number {i}"}]}
            for i in ids]


@pytest.fixture(scope="module")
def archive_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("growth")
    (root / "images").mkdir()
    for i in range(N_A + N_B):
        tile(i).save(root / "images" / f"{i}.jpg", quality=95)
    write_caption_json(root, entries(range(N_A)), "a.json")
    write_caption_json(root, entries(range(N_A, N_A + N_B)), "b.json")
    write_caption_json(root, entries(range(N_A + N_B)), "ab.json")
    return root


def extract_config(data: Path, run: Path, spec: str) -> ExtractConfig:
    return ExtractConfig(data=str(data), run=str(run), image_encoder=spec, text_encoder=spec, shard_size=5,
                         workers=0, device="cpu")


@pytest.fixture(scope="module")
def trained(archive_files, tiny_clip_spec, tmp_path_factory) -> Path:
    """Run A: extracted, trained (8 and 16 bits) and encoded with continuous outputs and a flat index."""
    run = tmp_path_factory.mktemp("run-a")
    extract(extract_config(archive_files / "a.json", run, tiny_clip_spec), progress=False, echo=quiet)
    train_hash(TrainConfig(run=str(run), bits=(8, 16), epochs=2, hidden=32, batch_size=4, split="all",
                           device="cpu"), progress=False, echo=quiet)
    encode_archive(EncodeConfig(run=str(run), continuous=True, index="flat", device="cpu"), progress=False,
                   echo=quiet)
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def codes_by_id(index: Index, modality: str = "image") -> dict[str, bytes]:
    table = index.tables[modality]
    live = ~index.archive.removed[modality]
    keys = table.meta["ids"] if modality == "image" else [f"{i}#{c}" for i, c in zip(table.meta["image_id"],
                                                                                    table.meta["caption_index"])]
    return {str(k): bytes(np.asarray(table.codes[r])) for r, k in enumerate(keys) if live[r]}


def answers(index: Index) -> list:
    out = []
    for query in (dict(text="a harbor tile"), dict(id="2"), dict(id="5#1", modality="image"),
                  dict(text="court number", modality="text", ties="order", rerank_top=8)):
        out.append([(h.id, h.distance) for h in index.search(k=8, **query)])
    return out


def test_adding_b_to_a_equals_extracting_and_encoding_a_and_b_together(run, archive_files, tiny_clip_spec, tmp_path):
    said = []
    result = add(AddConfig(run=str(run), data=str(archive_files / "b.json"), device="cpu", workers=0),
                 progress=False, echo=said.append)
    assert result.did_work and result.manifest == {"generation": 1, "segment": "segments/0001", "added": N_B,
                                                   "replaced": 0}
    assert read_generation(run).segments == (".", "segments/0001")
    together = tmp_path / "ab"
    extract(extract_config(archive_files / "ab.json", together, tiny_clip_spec), progress=False, echo=quiet)
    encode_archive(EncodeConfig(run=str(run), archive=str(together), continuous=True, device="cpu"), progress=False,
                   echo=quiet)
    for bits in (8, 16):
        grown, whole = Index.load(run, bits=bits, device="cpu"), Index.load(together, bits=bits, device="cpu")
        for modality in ("image", "text"):
            assert list(codes_by_id(grown, modality).items()) == list(codes_by_id(whole, modality).items())
        assert answers(grown) == answers(whole)
        added = dict(id="13#1", modality="image", k=8)  # an added caption, searched by
        assert ([(h.id, h.distance) for h in grown.search(**added)]
                == [(h.id, h.distance) for h in whole.search(**added)])
    # The archive's flat index grew with it (the generation's own file), and search uses it.
    index_file = run / "segments" / read_generation(run).indexes["16"]["image"]["file"]
    assert index_file.is_file()
    assert [h.id for h in Index.load(run, bits=16, device="cpu", backend="faiss").search(text="a harbor", k=18)] == \
        [h.id for h in Index.load(run, bits=16, device="cpu", backend="numpy").search(text="a harbor", k=18)]
    # Adding the same items again: refused by name, nothing written.
    with pytest.raises(DuchError, match=rf"{N_B} items of .*b.json are already in the archive of .* \('12', '13', "):
        add(AddConfig(run=str(run), data=str(archive_files / "b.json"), device="cpu", workers=0), progress=False,
            echo=quiet)
    assert read_generation(run).number == 1


def test_replace_codes_changed_files_again_and_keeps_the_rest(run, archive_files, tmp_path):
    changed = tmp_path / "changed"
    (changed / "images").mkdir(parents=True)
    shutil.copy(archive_files / "images" / "1.jpg", changed / "images" / "1.jpg")  # the same bytes
    tile(40).save(changed / "images" / "3.jpg", quality=95)  # new bytes under an archived id
    write_caption_json(changed, entries([1, 3]))
    before = codes_by_id(Index.load(run, bits=16, device="cpu"))
    with pytest.raises(DuchError, match=r"2 items .* are already in the archive .*\('1', '3'\); give --replace"):
        add(AddConfig(run=str(run), data=str(changed), device="cpu", workers=0), progress=False, echo=quiet)
    said = []
    result = add(AddConfig(run=str(run), data=str(changed), replace=True, device="cpu", workers=0), progress=False,
                 echo=said.append)
    assert result.manifest["replaced"] == 1 and result.manifest["added"] == 0
    assert "add: 1 items already in the archive are unchanged, kept" in said
    index = Index.load(run, bits=16, device="cpu")
    after = codes_by_id(index)
    assert after.keys() == before.keys()  # one live item per id
    assert {k for k in after if after[k] != before[k]} <= {"3"}
    hits = index.search(id="3", k=1, modality="image")
    assert hits[0].id == "3" and hits[0].distance == 0 and hits[0].path == str(changed / "images" / "3.jpg")


def test_removed_items_never_come_back_and_compact_keeps_every_other_code(run, archive_files):
    add(AddConfig(run=str(run), data=str(archive_files / "b.json"), device="cpu", workers=0), progress=False,
        echo=quiet)
    before = {b: codes_by_id(Index.load(run, bits=b, device="cpu")) for b in (8, 16)}
    text_before = codes_by_id(Index.load(run, bits=16, device="cpu"), "text")
    with pytest.raises(DuchError, match=r"1 of the ids to remove are not in the archive .*: 'nope'; nothing"):
        remove(RemoveConfig(run=str(run), ids=("1", "nope")), echo=quiet)
    remove(RemoveConfig(run=str(run), ids=("1", "14")), echo=quiet)
    gone = {"1", "14"}

    def check_absent(refusal: str):
        index = Index.load(run, bits=16, device="cpu")
        for query in (dict(text="a airplane tile"), dict(id="2", modality="image"), dict(id="13", modality="text")):
            for backend in ("faiss", "numpy"):
                index.backend, index._backends = backend, {}
                hits = index.search(k=N_A + N_B + 40, **query)
                assert not {h.image_id for h in hits} & gone
        with pytest.raises(DuchError, match=refusal):
            index.search(id="1", k=3)
        return index

    check_absent("'1' was removed from the archive")
    said = []
    result = compact(CompactConfig(run=str(run)), echo=said.append)
    assert result.did_work and result.manifest["merged"] == [".", "segments/0001"]
    generation = read_generation(run)
    assert generation.segments == ("segments/0002",) and generation.removed == ()
    assert not (run / "segments" / "0001").exists() and (run / "extract" / "manifest.json").exists()
    index = check_absent("'1' is not in the archive")
    for b in (8, 16):
        after = codes_by_id(Index.load(run, bits=b, device="cpu"))
        assert after == {k: v for k, v in before[b].items() if k not in gone}
    assert codes_by_id(index, "text") == {k: v for k, v in text_before.items() if k.split("#")[0] not in gone}
    for bits in (8, 16):  # absent from the archive's files themselves, not just hidden
        _, tables = open_codes(run / "segments" / "0002" / "encode-archive" / codes_name(bits))
        assert not gone & set(map(str, tables["image"].meta["ids"]))
        assert not gone & set(map(str, tables["text"].meta["image_id"]))
    # The compacted segment is an ordinary one: encode-archive finds it up to date, and more items can come.
    assert not compact(CompactConfig(run=str(run)), echo=quiet).did_work
    encode_archive(EncodeConfig(run=str(run), continuous=True, index="flat", device="cpu"), progress=False,
                   echo=said.append)
    assert codes_by_id(Index.load(run, bits=16, device="cpu")) == {k: v for k, v in before[16].items() if k not in gone}


def test_two_adds_at_once_the_second_is_refused_naming_the_holder(run, archive_files):
    from duch.pipeline.run.lock import run_lock

    hold = f"""
import sys, time
from duch.pipeline.run.lock import run_lock
with run_lock({str(run)!r}, "add"):
    print("held", flush=True)
    time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(DuchError, match=rf"in use by another duch process \(add, pid {proc.pid}, since"):
            add(AddConfig(run=str(run), data=str(archive_files / "b.json"), device="cpu", workers=0),
                progress=False, echo=quiet)
    finally:
        proc.kill()
        proc.wait()
    with run_lock(run, "add"):  # free again
        pass
    assert read_generation(run).number == 0


@pytest.mark.slow
def test_a_killed_add_reruns_to_the_same_archive_and_readers_see_one_generation(run, archive_files, tmp_path):
    """SIGKILL at random points of `duch add`, each time rerun at once; meanwhile a reader searches in a loop:
    every answer is the old generation's or the new one's, never an error or a mix."""
    clean = tmp_path / "clean"
    shutil.copytree(run, clean)
    add(AddConfig(run=str(clean), data=str(archive_files / "b.json"), device="cpu", workers=0), progress=False,
        echo=quiet)
    old, new = answers(Index.load(run, bits=16, device="cpu")), answers(Index.load(clean, bits=16, device="cpu"))
    assert old != new
    seen, errors, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.append(answers(Index.load(run, bits=16, device="cpu")))
            except Exception as e:  # noqa: BLE001 (any error is a failure of the promise)
                errors.append(repr(e))

    thread = threading.Thread(target=reader)
    thread.start()
    argv = [sys.executable, str(ROOT / "cli.py"), "add", "--run", str(run), "--data", str(archive_files / "b.json"),
            "--device", "cpu", "--workers", "0", "--no-progress", "--wait", "30"]
    rng = random.Random(int(os.environ.get("DUCH_FAULT_SEED", "3")))
    try:
        for delay in sorted(rng.uniform(2.0, 9.0) for _ in range(3)):
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            if read_generation(run).number:
                break
        final = subprocess.run(argv, capture_output=True, text=True)
        if read_generation(run).number == 1 and final.returncode:  # a kill landed after the publication
            assert final.returncode == 2 and "are already in the archive" in final.stderr, final.stderr
        else:
            assert final.returncode == 0, final.stdout + final.stderr
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:3]
    assert seen and all(s in (old, new) for s in seen)
    assert answers(Index.load(run, bits=16, device="cpu")) == new
    assert codes_by_id(Index.load(run, bits=16, device="cpu")) == codes_by_id(Index.load(clean, bits=16, device="cpu"))
    assert json.loads((run / "archive.json").read_text())["segments"] == [".", "segments/0001"]
