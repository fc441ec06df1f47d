import csv
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import cli
from pipeline import DuchError
from pipeline.config import TrainConfig
from pipeline.features import load_features
from stages.train_hash import load_heads, prepare, sample_views, train_hash

FAST = dict(bits=(8, 16), epochs=3, hidden=32, batch_size=8, eval_every=2, device="cpu")


def quiet(_):
    pass


@pytest.fixture
def run(tiny_extract_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(tiny_extract_run, target)
    return target


def test_outputs_table_and_rerun(run):
    said = []
    result = train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=said.append)
    stage = run / "train-hash"
    assert result.did_work
    for bits in (8, 16):
        folder = stage / f"bits-{bits}"
        tensors = load_file(folder / "model.safetensors")
        assert tensors["image_head.net.3.weight"].shape == (bits, 32)
        assert "discriminator.net.0.weight" in tensors
        heads = load_heads(folder / "model.safetensors", image_dim=16, text_dim=16, bits=bits, hidden=32)
        assert torch.equal(heads.text.net[3].weight, tensors["text_head.net.3.weight"]) and not heads.training
        rows = list(csv.DictReader(open(folder / "losses.csv")))
        assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
        assert {"inter", "image", "text", "adversarial", "quantization", "balance", "discriminator"} <= rows[0].keys()
        history = json.loads((folder / "history.json").read_text())
        assert [e["epoch"] for e in history["validation"]] == [2, 3]
        assert (folder / "losses.png").read_bytes()[:4] == b"\x89PNG"
    split = json.loads((stage / "split.json").read_text())
    assert (len(split["train"]), len(split["query"]), len(split["database"])) == (12, 2, 10)
    assert not set(split["train"]) & set(split["query"] + split["database"])
    manifest = json.loads((stage / "manifest.json").read_text())
    value = manifest["results"]["16"]["map"]["I->T"]
    assert set(value) == {"reference", "textbook"} and 0 <= value["reference"] <= 1
    assert any(line.startswith("mAP@20 (reference)") for line in said)
    again = []
    assert not train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=again.append).did_work
    assert "up to date" in again[0]


def test_same_command_gives_bit_identical_weights(run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    for r in (run, other):
        train_hash(TrainConfig(run=str(r), **FAST), progress=False, echo=quiet)
    for bits in (8, 16):
        a = load_file(run / "train-hash" / f"bits-{bits}" / "model.safetensors")
        b = load_file(other / "train-hash" / f"bits-{bits}" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    seeded = train_hash(TrainConfig(run=str(other), **(FAST | {"seed": 1})), progress=False, echo=quiet)
    c = load_file(seeded.stage_dir / "bits-8" / "model.safetensors")
    a = load_file(run / "train-hash" / "bits-8" / "model.safetensors")
    assert not torch.equal(a["image_head.net.0.weight"], c["image_head.net.0.weight"])


def test_views_are_distinct_captions_unless_reference_quirks(run):
    data = prepare(load_features(run), torch.device("cpu"))
    items = torch.arange(24)
    _, xa, t1, t2 = sample_views(data, items, torch.Generator().manual_seed(0), quirks=False)
    assert not torch.equal(t1, t2) and (t1 != t2).any(dim=1).all()  # every item: two different captions
    assert not torch.equal(xa, data.image)
    _, _, q1, q2 = sample_views(data, items, torch.Generator().manual_seed(0), quirks=True)
    assert torch.equal(q1, q2)
    # augment_anchor: two distinct embeddings of {original, view 1, view 2} for every item.
    x, xa, _, _ = sample_views(data, items, torch.Generator().manual_seed(0), quirks=False, augment_anchor=True)
    candidates = torch.cat([data.image[:, None], data.views], dim=1)  # [24, 3, D]
    for picked in (x, xa):
        assert ((candidates == picked[:, None]).all(dim=2).any(dim=1)).all()
    assert (x != xa).any(dim=1).all()
    assert (x != data.image).any()  # the anchor is not always the original


@pytest.mark.parametrize("change, message", [
    (dict(bits=(12,)), "--bits 12: code lengths must be positive multiples of 8"),
    (dict(split="dataset"), None),
    (dict(precision="fp8"), "--precision must be auto, bf16 or fp32"),
])
def test_config_errors(run, change, message):
    if message is None:  # the dataset's own split works: train+val to train, test to query and database
        result = train_hash(TrainConfig(run=str(run), **(FAST | change)), progress=False, echo=quiet)
        assert result.manifest["split"] == {"mode": "dataset", "train": 16, "query": 8, "database": 8}
        return
    with pytest.raises(DuchError, match=message):
        train_hash(TrainConfig(run=str(run), **(FAST | change)), progress=False, echo=quiet)


def test_nan_features_and_missing_extract_are_refused(run, tmp_path):
    with h5py.File(run / "extract" / "image-00001.h5", "r+") as f:
        emb = f["emb"][()]
        emb[3, 0] = np.nan
        f["emb"][...] = emb
    with pytest.raises(DuchError, match=r"image embeddings hold NaN or Inf \(1 rows, e.g. items 13\)"):
        train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=quiet)
    assert not (run / "train-hash").exists()  # refused before any training
    with pytest.raises(DuchError, match="no finished extract stage"):
        train_hash(TrainConfig(run=str(tmp_path / "empty"), **FAST), progress=False, echo=quiet)


def test_cli_train_hash(run):
    result = CliRunner().invoke(cli.main, ["train-hash", "--run", str(run), "--bits", "8", "--epochs", "2",
                                           "--hidden", "32", "--batch-size", "8", "--device", "cpu",
                                           "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "train-hash: 8 bits in" in result.output and "mAP@20 (reference)" in result.output
    bad = CliRunner().invoke(cli.main, ["train-hash", "--run", str(run), "--bits", "8,20"])
    assert bad.exit_code == 2 and bad.output.strip() == \
        "error: --bits 20: code lengths must be positive multiples of 8 (e.g. 16,32,64,128)"


def test_shards_of_different_dimensions_are_refused(run):
    path = run / "extract" / "image-00001.h5"
    with h5py.File(path, "r+") as f:
        emb = f["emb"][()]
        del f["emb"]
        f["emb"] = np.zeros((len(emb), emb.shape[1] + 1), emb.dtype)
    with pytest.raises(DuchError, match=r"image-00001.h5: embeddings of shape \(17, 2, 16\) do not match"):
        train_hash(TrainConfig(run=str(run), **FAST), progress=False, echo=quiet)


@pytest.mark.parametrize("option", [
    dict(w_inter_second=1.0), dict(w_inter_views=1.0), dict(w_bank=0.5), dict(drop_last=True, batch_size=5),
    dict(augment_anchor=True), dict(reference_quirks=True), dict(precision="fp32"),
])
def test_training_options_run_and_report_their_terms(run, option):
    result = train_hash(TrainConfig(run=str(run), **(FAST | dict(bits=(8,), epochs=2) | option)), progress=False,
                        echo=quiet)
    losses = result.manifest["results"]["8"]["final_losses"]
    extra_on = any(option.get(k) for k in ("w_inter_second", "w_inter_views", "w_bank"))
    assert (losses["inter_extra"] > 0) == bool(extra_on)
    assert all(np.isfinite(v) for v in losses.values())
