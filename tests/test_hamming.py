import faiss
import numpy as np
import pytest
import torch

from duch.pipeline.model.coding import pack_codes, unpack_codes
from duch.pipeline.retrieval import hamming as hm


@pytest.mark.parametrize("bits", [8, 16, 24, 64, 128, 136])
def test_pack_unpack_round_trip_and_bit_order(bits):
    h = np.random.default_rng(bits).uniform(-1, 1, (7, bits)).astype(np.float32)
    packed = pack_codes(h)
    assert packed.dtype == np.uint8 and packed.shape == (7, bits // 8)
    assert (unpack_codes(packed, bits) == np.where(h >= 0, 1, -1)).all()
    first_bit_only = np.full((1, bits), -1.0)
    first_bit_only[0, 0] = 0.0  # h >= 0 is a 1 bit; big-endian: the first code bit is the byte's highest
    assert pack_codes(first_bit_only)[0, 0] == 0b1000_0000


@pytest.mark.parametrize("bits", [8, 16, 24, 32, 64, 128])
def test_exact_topk_equals_faiss_binary_flat(bits):
    rng = np.random.default_rng(bits)
    db = rng.integers(0, 256, (3000, bits // 8), dtype=np.uint8)
    queries = np.vstack([rng.integers(0, 256, (5, bits // 8), dtype=np.uint8), db[[7, 2999]]])
    distances, rows = hm.hamming_topk(queries, db, 40)
    index = faiss.IndexBinaryFlat(bits)
    index.add(db)
    faiss_d, faiss_rows = index.search(queries, 40)
    assert (distances == faiss_d).all()
    assert (rows == faiss_rows).all()  # faiss also keeps the lower row among equal distances
    full = hm.hamming(queries, db)
    assert (np.take_along_axis(full, rows, 1) == distances).all()
    # An archive code finds itself (or an identical code earlier in the archive) at distance 0.
    assert (distances[5:, 0] == 0).all() and (db[rows[5:, 0]] == db[[7, 2999]]).all() and rows[5, 0] <= 7


def test_ties_are_ordered_by_archive_row_on_numpy_and_torch():
    db = np.array([[0b1111_0000], [0b0000_0000], [0b1111_0000], [0b0000_0001], [0b1111_0000]], dtype=np.uint8)
    query = np.array([[0b1111_0000]], dtype=np.uint8)
    distances, rows = hm.hamming_topk(query, db, 5)
    assert rows.tolist() == [[0, 2, 4, 1, 3]] and distances.tolist() == [[0, 0, 0, 4, 5]]
    t_d, t_rows = hm.hamming_topk_torch(hm.to_int64_words(query), hm.to_int64_words(db), 5)
    assert t_rows.tolist() == rows.tolist() and t_d.tolist() == distances.tolist()


@pytest.mark.parametrize("bits, n, k", [(8, 50, 50), (24, 1000, 7), (64, 5000, 100), (128, 333, 1)])
def test_torch_path_and_chunked_scan_equal_a_stable_full_sort(bits, n, k, monkeypatch):
    rng = np.random.default_rng(n)
    db = rng.integers(0, 4, (n, bits // 8), dtype=np.uint8)  # few distinct bytes: many ties
    queries = rng.integers(0, 4, (4, bits // 8), dtype=np.uint8)
    expected = np.argsort(hm.hamming(queries, db), axis=1, kind="stable")[:, :k]
    monkeypatch.setattr(hm, "_CELLS_PER_CHUNK", 97 * 4)  # force many chunks and their merge
    _, rows = hm.hamming_topk(queries, db, k)
    t_d, t_rows = hm.hamming_topk_torch(hm.to_int64_words(queries), hm.to_int64_words(db), k)
    assert (rows == expected).all() and (t_rows.numpy() == expected).all()
    assert (t_d.numpy() == np.take_along_axis(hm.hamming(queries, db), expected, 1)).all()


def test_popcount64_counts_every_bit_including_the_sign_bit():
    words = torch.tensor([0, 1, -1, -(2 ** 63), 0x5555555555555555, 2 ** 62 + 3], dtype=torch.int64)
    assert hm.popcount64(words).tolist() == [0, 1, 64, 1, 32, 3]


def test_codes_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="codes of 16 and 8 bits"):
        hm.hamming(np.zeros((1, 2), np.uint8), np.zeros((3, 1), np.uint8))


TRITON_CHECK = """
import numpy as np
from duch.pipeline.retrieval.hamming import hamming_topk
from duch.pipeline.retrieval.hamming_gpu import hamming_topk_triton, to_int32_words
rng = np.random.default_rng(0)
for bits, n, k in ((64, 3000, 10), (24, 700, 7), (128, 1500, 20)):
    db = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
    db[100:300] = db[0]  # a tie of 200 rows at distance 0: overflows the buffer
    queries = np.vstack([db[:2], rng.integers(0, 256, (5, bits // 8), dtype=np.uint8)])
    d, rows = hamming_topk_triton(queries, to_int32_words(db, "cpu"), k, capacity=128, direct_below=64)
    expected_d, expected_rows = hamming_topk(queries, db, k)
    assert (d.numpy() == expected_d).all() and (rows.numpy() == expected_rows).all(), bits
    one_d, one_rows = hamming_topk_triton(queries[2:3], to_int32_words(db, "cpu"), k, direct_below=64)
    assert (one_rows.numpy() == expected_rows[2:3]).all(), bits  # one query: a one-row tile
print("ok")
"""


def test_triton_kernel_equals_the_numpy_scan_in_the_interpreter():
    """The GPU kernel's logic (threshold, prefix-sum placement, overflow fallback) run by Triton's CPU
    interpreter; on a GPU bench/search_speed.py checks the compiled kernel against the same scan."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", TRITON_CHECK], cwd=Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
