"""A run made by duch before its code was regrouped (tests/fixtures/legacy_run, commit fb11154) is still up to
date: no stage redoes anything, evaluate gives the same metrics and search the same answers."""
import json
import os
import shutil
from pathlib import Path

import pytest

from duch.pipeline.config import EncodeConfig, EvaluateConfig, ExtractConfig, TrainConfig
from duch.pipeline.retrieval.search import Index
from duch.stages.encode_archive import encode_archive
from duch.stages.evaluate import evaluate
from duch.stages.extract import extract
from duch.stages.train_hash import train_hash

from .conftest import ASSETS, REAL_JPEGS

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_run"
MTIME_NS = 1_700_000_000_000_000_000
SPEC = "open_clip:tiny-clip.json:none"  # relative: the spec (and its fingerprint) name the file as given


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> Path:
    """The fixture's inputs rebuilt as they were when the run was made, and a copy of the run beside them."""
    root = tmp_path / "legacy"
    (root / "images").mkdir(parents=True)
    for name in ("dataset.json", "tiny-clip.json"):
        shutil.copy(FIXTURE / name, root / name)
    shutil.copytree(FIXTURE / "run", root / "run")
    for i in range(24):
        shutil.copy(ASSETS / REAL_JPEGS[i % 5], root / "images" / f"{i}.jpg")
        os.utime(root / "images" / f"{i}.jpg", ns=(MTIME_NS, MTIME_NS))
    os.utime(root / "tiny-clip.json", ns=(MTIME_NS, MTIME_NS))
    monkeypatch.chdir(root)
    return root


def test_a_run_made_before_the_redesign_is_up_to_date(legacy):
    said = []
    quiet = dict(progress=False, echo=said.append)
    assert not extract(ExtractConfig(data="dataset.json", run="run", image_encoder=SPEC, text_encoder=SPEC,
                                     shard_size=10, workers=0, device="cpu"), **quiet).did_work
    assert not train_hash(TrainConfig(run="run", bits=(16, 32), epochs=4, hidden=64, batch_size=8, checkpoint_every=2,
                                      eval_every=2, precision="fp32", device="cpu"), **quiet).did_work
    assert not encode_archive(EncodeConfig(run="run", continuous=True, index="flat", device="cpu"), **quiet).did_work
    assert [s.split(":")[0] for s in said if ": up to date" in s] == ["extract", "train-hash", "encode-archive"]

    before = json.loads((FIXTURE / "run" / "evaluate" / "metrics.json").read_text())
    metrics = evaluate(EvaluateConfig(run="run"), progress=False, echo=lambda _: None).metrics
    assert json.loads(json.dumps(metrics)) == before  # as metrics.json holds them (its keys strings)


@pytest.mark.parametrize("name, bits, query", [
    ("search-id-0.json", 32, dict(id="0", k=8)),
    ("search-id-4-1.json", 16, dict(id="4#1", k=8, modality="image")),
    ("search-id-7-rerank.json", 32, dict(id="7", k=5, ties="order", rerank_top=6)),
])
def test_a_run_made_before_the_redesign_answers_the_same(legacy, name, bits, query):
    hits = Index.load("run", bits=bits, device="cpu").search(**query)
    assert [h.to_dict() for h in hits] == json.loads((FIXTURE / name).read_text())
