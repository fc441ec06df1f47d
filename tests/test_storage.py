"""atomic_write: a file reaches its name whole and durably (its bytes fsynced, then renamed, then its folder
fsynced), or not at all; and every writer of a run's files goes through it."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from duch.pipeline.run.storage import atomic_write, make_folders


@pytest.fixture
def fsyncs(monkeypatch):
    """Every os.fsync of this process, as (path, is a folder, whether the final file existed at that moment)."""
    seen = []
    real = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        seen.append((path, os.path.isdir(path)))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_a_file_is_fsynced_renamed_and_its_folder_fsynced(tmp_path, fsyncs):
    target = tmp_path / "out.bin"
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.bin.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"payload")
        assert not target.exists()
    assert target.read_bytes() == b"payload"
    assert fsyncs == [(str(tmp), False), (str(tmp_path), True)]  # the bytes first, then the rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_folders_are_made_durably(tmp_path, fsyncs):
    """A new folder's own name is fsynced into its parent before anything is published in it: else a power cut
    could take the folder, and every file already 'durably' renamed into it, away."""
    target = tmp_path / "run" / "stage" / "out.bin"
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"payload")
    assert fsyncs == [(str(tmp_path), True), (str(tmp_path / "run"), True), (str(tmp), False),
                      (str(tmp_path / "run" / "stage"), True)]
    fsyncs.clear()
    make_folders(tmp_path / "run" / "stage")  # already there: nothing to sync
    assert fsyncs == []
    with pytest.raises(FileExistsError):  # a file where a folder is needed, as mkdir says it
        make_folders(target / "below")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, fsyncs):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert fsyncs == []


def writers(tmp_path: Path):
    """Each writer of a run's files, as (the file it writes, a call that writes it)."""
    from duch.pipeline.formats import faiss_index
    from duch.pipeline.formats.checkpoint import save_checkpoint
    from duch.pipeline.formats.codes import CodeWriter
    from duch.pipeline.formats.shards import write_shard
    from duch.pipeline.formats.weights import save_weights
    from duch.pipeline.model.heads import CodeDiscriminator, DuchHeads
    from duch.pipeline.run.manifest import write_manifest
    from duch.pipeline.train.report import write_history

    def codes():
        writer = CodeWriter(tmp_path / "codes-8.h5", 8, {"image": 2}, False, {})
        writer.append("image", {"ids": np.array(["a", "b"], object), "path": np.array(["a", "b"], object),
                                "label": np.array(["", ""], object), "codes": np.zeros((2, 1), np.uint8)})
        writer.close()

    heads, disc = DuchHeads(4, 4, 8, 16), CodeDiscriminator(8)
    history = [{"epoch": 1, **dict.fromkeys(("inter", "inter_extra", "image", "text", "adversarial", "quantization",
                                             "balance", "total", "discriminator"), 1.0)}]
    return {
        "shard": (tmp_path / "image-00000.h5", lambda: write_shard(tmp_path / "image-00000.h5",
                                                                    {"emb": np.zeros((2, 4))}, {})),
        "codes": (tmp_path / "codes-8.h5", codes),
        "manifest": (tmp_path / "manifest.json", lambda: write_manifest(tmp_path, {"stage": "test"})),
        "checkpoint": (tmp_path / "checkpoint-e00001.safetensors",
                       lambda: save_checkpoint(tmp_path, 1, "fp", {"w": torch.zeros(2)})),
        "weights": (tmp_path / "model.safetensors", lambda: save_weights(tmp_path / "model.safetensors", heads, disc,
                                                                         {"bits": 8})),
        "history": (tmp_path / "losses.png", lambda: write_history(tmp_path, history, [], 8)),
        "faiss index": (tmp_path / "index-8-image.faiss", lambda: faiss_index.write(
            faiss_index.build(np.zeros((4, 1), np.uint8), "flat"), tmp_path / "index-8-image.faiss")),
    }


@pytest.mark.parametrize("kind", ["shard", "codes", "manifest", "checkpoint", "weights", "history", "faiss index"])
def test_every_writer_publishes_durably(tmp_path, fsyncs, kind):
    target, write = writers(tmp_path)[kind]
    write()
    assert target.is_file()
    assert (str(tmp_path), True) in fsyncs  # the folder holding the rename
    synced_files = [p for p, folder in fsyncs if not folder]
    assert any(Path(p).name.startswith(f".{target.name}.") for p in synced_files)  # its bytes, under the temp name
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_removed_checkpoint_stays_removed(tmp_path, fsyncs):
    """train-hash writes nothing in bits-K/ after dropping its checkpoint: the removal itself is fsynced, or a
    power cut would bring the checkpoint back beside the finished model."""
    from duch.pipeline.formats.checkpoint import remove_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, 1, "fp", {"w": torch.zeros(2)})
    fsyncs.clear()
    remove_checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == [] and fsyncs == [(str(tmp_path), True)]
    remove_checkpoint(tmp_path)  # nothing left to remove: nothing to sync
    assert fsyncs == [(str(tmp_path), True)]
