"""Fuzzing the files later stages open in a run: manifests (edited by hand, cut short, another tool's), code files
read without their checksum (`search --no-verify`), training checkpoints and model weights, on a tiny real
encoded run. Property (tests/fuzzkit.py): the reader works or refuses in one DuchError line naming the file and
the fix; a checkpoint that cannot be used is never resumed from (and never raises)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from duch.pipeline import DuchError
from duch.pipeline.formats.checkpoint import load_checkpoint, save_checkpoint
from duch.pipeline.formats.features import load_features
from duch.pipeline.formats.weights import load_heads
from duch.pipeline.model.heads import DuchHeads
from duch.pipeline.retrieval.search import Index
from duch.pipeline.run.records import TrainRun

from .fuzzkit import examples, json_values, mutated_json, one_line, time_bound
from .test_checkpoint import crash_after_training

pytestmark = pytest.mark.fuzz


@pytest.fixture(scope="module")
def run(encoded_run, tmp_path_factory) -> Path:
    """A copy each example changes one file of, restored after it."""
    target = tmp_path_factory.mktemp("run-files") / "run"
    shutil.copytree(encoded_run, target)
    return target


def use_run(run: Path, stage: str) -> None:
    """What the later stages read of `stage`: the features, the trained models, the codes answering a query."""
    if stage == "extract":
        load_features(run)
    elif stage == "train-hash":
        TrainRun.read(run)
    else:
        Index.load(run, bits=16, device="cpu", verify=False).search(id="0", k=3, rerank_top=4)


def with_file(path: Path, data: bytes, use) -> None:
    """`use()` with `path` holding `data`, then the file as it was; the property checked on the way."""
    original = path.read_bytes()
    path.write_bytes(data)
    try:
        with time_bound(30):
            use()
        event("read")
    except DuchError as e:
        event(f"refused: {one_line(e)[len(str(path.parent.parent)):][:40]}")
    finally:
        path.write_bytes(original)


STAGES = ["extract", "train-hash", "encode-archive"]


@examples("manifest")
@given(stage=st.sampled_from(STAGES), data=st.data())
def test_manifests_fuzzed(run, stage, data):
    path = run / stage / "manifest.json"
    manifest = json.loads(path.read_text())
    content = data.draw(st.one_of(
        mutated_json(manifest).map(lambda doc: json.dumps(doc).encode()),
        mutated_json(manifest).map(lambda doc: json.dumps(doc).encode()),
        json_values.map(lambda doc: json.dumps(doc).encode()),
        st.integers(0, len(path.read_bytes())).map(lambda n: path.read_bytes()[:n]),
        st.builds(lambda n: b"[" * n, st.integers(900, 100_000)),
        st.binary(max_size=40)))
    with_file(path, content, lambda: use_run(run, stage))


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """`data` with bytes overwritten (the size kept: what a size-only check lets through), or cut short."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(out) - 1))
        patch = draw(st.binary(min_size=1, max_size=8))
        out[at:at + len(patch)] = patch
        del out[len(data):]
    if draw(st.integers(0, 4)) == 0:
        out = out[:draw(st.integers(0, len(out)))]
    return bytes(out)


@examples("codes")
@given(data=st.data())
def test_code_files_read_without_their_checksum_fuzzed(run, data):
    path = run / "encode-archive" / "codes-16.h5"
    with_file(path, data.draw(damaged(path.read_bytes())), lambda: use_run(run, "encode-archive"))


@examples("weights")
@given(data=st.data())
def test_model_weights_fuzzed(run, data):
    path = run / "train-hash" / "bits-16" / "model.safetensors"
    with_file(path, data.draw(damaged(path.read_bytes())), lambda: load_heads(path, 16, 16, 16, 32))


def training_state() -> dict:
    """A state of the kinds a training checkpoint holds: weights, an optimizer's (int keys), tuples, numbers."""
    heads = DuchHeads(4, 4, 8, 16)
    opt = torch.optim.Adam(heads.parameters(), lr=1e-3)
    heads.image(torch.randn(3, 4)).sum().backward()
    opt.step()
    return {"heads": heads.state_dict(), "opt": opt.state_dict(), "betas": (0.5, 0.9), "log": [{"epoch": 1}]}


@pytest.mark.slow
@examples("checkpoint")
@given(part=st.sampled_from(["json", "json", "tensors"]), data=st.data())
def test_checkpoints_fuzzed(tmp_path_factory, part, data):
    folder = tmp_path_factory.mktemp("ckpt", numbered=True)
    tensors = save_checkpoint(folder, 3, "fp", training_state())
    index = folder / "checkpoint.json"
    if part == "json":
        index.write_bytes(data.draw(st.one_of(mutated_json(json.loads(index.read_text())).map(
            lambda doc: json.dumps(doc).encode()), damaged(index.read_bytes()))))
    else:
        tensors.write_bytes(data.draw(damaged(tensors.read_bytes())))
    with time_bound(30):
        epoch, state = load_checkpoint(folder, "fp")
    event("resumable" if epoch is not None else "not resumed")
    assert (epoch is None and isinstance(state, str) and "\n" not in state) or (epoch is not None and isinstance(
        state, dict))


@pytest.fixture(scope="module")
def crashed(tiny_extract_run, tmp_path_factory) -> Path:
    """A run whose training at 8 bits stopped after its last epoch, a checkpoint of epoch 2 on disk (the crash
    test_checkpoint.py makes)."""
    import duch.stages.train_hash as th

    run = tmp_path_factory.mktemp("crashed") / "run"
    shutil.copytree(tiny_extract_run, run)
    with pytest.MonkeyPatch.context() as m:
        crash_after_training(m)
        with pytest.raises(KeyboardInterrupt):
            th.train_hash(th.TrainConfig(run=str(run), **RESUME), progress=False, echo=lambda _: None)
    assert (run / "train-hash" / "bits-8" / "checkpoint.json").exists()
    return run


RESUME = dict(bits=(8,), epochs=4, hidden=32, batch_size=8, eval_every=2, device="cpu", checkpoint_every=2)


def _leaves(tree, kind: str) -> list[dict]:
    """The nodes {kind: ...} of a checkpoint's state tree (checkpoint.split_tensors writes it)."""
    if isinstance(tree, dict):
        return ([tree] if kind in tree else []) + [n for v in tree.values() for n in _leaves(v, kind)]
    if isinstance(tree, list):
        return [n for v in tree for n in _leaves(v, kind)]
    return []


@st.composite
def swapped_leaves(draw, tree):
    """The state tree with references to tensors pointed at other tensors of the file and plain values replaced:
    a tree that load_checkpoint's checks all pass (the tensor file is untouched) and that does not fit the run."""
    tree = json.loads(json.dumps(tree))
    tensors, values = _leaves(tree, "tensor"), _leaves(tree, "value")
    keys = [node["tensor"] for node in tensors]
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            draw(st.sampled_from(tensors))["tensor"] = draw(st.sampled_from(keys))
        else:
            draw(st.sampled_from(values))["value"] = draw(json_values)
    return tree


@pytest.mark.slow
@examples("checkpoint-resume")
@given(data=st.data())
def test_resuming_from_a_checkpoint_whose_state_was_edited_fuzzed(crashed, tmp_path_factory, data):
    """The checkpoint's JSON edited where no checksum guards it (the state tree, the epoch): training resumes, or
    starts over saying why, or stops in one line; never a traceback from restoring the state."""
    from duch.pipeline.config import TrainConfig
    from duch.stages.train_hash import train_hash

    run = tmp_path_factory.mktemp("resume", numbered=True) / "run"
    shutil.copytree(crashed, run)
    index = run / "train-hash" / "bits-8" / "checkpoint.json"
    meta = json.loads(index.read_text())
    meta["state"] = data.draw(st.one_of(mutated_json(meta["state"]), swapped_leaves(meta["state"])))
    meta["epoch"] = data.draw(st.one_of(st.just(meta["epoch"]), st.integers(-3, 9), json_values))
    index.write_text(json.dumps(meta))
    said = []
    try:
        with time_bound(60):
            train_hash(TrainConfig(run=str(run), **RESUME), progress=False, echo=said.append)
        event("resumed" if any(": resuming from" in s for s in said) else "trained from the start")
    except DuchError as e:
        event(f"refused: {one_line(e)[:30]}")
