"""GPU code paths, run where a CUDA device exists (skipped elsewhere, so CI never needs one):
python -m pytest -q tests/test_gpu.py on the GPU machine."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_compiled_kernel_equals_the_numpy_scan():
    from duch.pipeline.retrieval.hamming import hamming_topk
    from duch.pipeline.retrieval.hamming_gpu import hamming_topk_triton, to_int32_words

    rng = np.random.default_rng(0)
    for bits, n, k, q in ((64, 300_000, 20, 100), (128, 200_000, 10, 3), (32, 100_000, 50, 1), (64, 100_000, 5, 40)):
        db = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
        db[1000:30_000] = db[5]  # a tie far larger than the candidate buffer
        queries = np.vstack([db[5:6], rng.integers(0, 256, (q - 1, bits // 8), dtype=np.uint8)])
        d, rows = hamming_topk_triton(queries, to_int32_words(db, "cuda"), k)
        want_d, want_rows = hamming_topk(queries, db, k)
        assert (d.cpu().numpy() == want_d).all() and (rows.cpu().numpy() == want_rows).all(), (bits, n, k, q)


def test_index_on_gpu_returns_the_cpu_rows(tmp_path):
    from bench.synthetic import make_extract_run
    from duch.pipeline.config import EncodeConfig, TrainConfig
    from duch.pipeline.retrieval.search import Index
    from duch.stages.encode_archive import encode_archive
    from duch.stages.train_hash import train_hash

    run = tmp_path / "run"
    make_extract_run(run, 100_000, 64, captions=1, views=1)  # past the plain-scan size: the kernel runs
    train_hash(TrainConfig(run=str(run), bits=(64,), epochs=2, split="all", hidden=256, device="cuda"),
               progress=False, echo=lambda _: None)
    encode_archive(EncodeConfig(run=str(run), device="cuda"), progress=False, echo=lambda _: None)
    gpu = Index.load(run, bits=64, device="cuda")
    cpu = Index.load(run, bits=64, device="cpu", backend="numpy")
    queries = np.asarray(cpu.tables["text"].codes[:200])
    for k in (1, 10, 500):
        a, b = gpu.scan.topk(queries, "image", k), cpu.scan.topk(queries, "image", k)
        assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
