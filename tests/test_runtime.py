"""The encoders' runtimes: ONNX Runtime against PyTorch on real tiles and captions, the export cache, the runtime in
the extract fingerprint, the `runtime` errors, faiss' threads per search, and a served query coded by ONNX Runtime."""
import json
import shutil

import httpx
import numpy as np
import pytest
import torch

from duch.data.images import load_image
from duch.pipeline import DuchError
from duch.pipeline.compute.device import available_cores
from duch.pipeline.config import EncodeConfig, ExtractConfig, ServeConfig, TrainConfig
from duch.pipeline.encoders import load_encoders, onnx_cache, onnx_encoders, parse_spec, runtime
from duch.pipeline.formats import faiss_index
from duch.pipeline.retrieval.search import Index
from duch.pipeline.serve.app import create_app
from duch.stages.encode_archive import encode_archive
from duch.stages.extract import extract
from duch.stages.train_hash import train_hash

from .conftest import ASSETS, REAL_JPEGS, write_caption_json
from .serving import running
from .test_bad_input import cli_error

CAPTIONS = ["many planes are parked next to a long building in an airport", "a harbor with boats",
            "tennis court", "", "word " * 400, "ünïcödé 東京 🚀 residential area"]
quiet = lambda _: None  # noqa: E731


def encoders(which: str):
    spec = lambda text, modality: parse_spec(text, modality).with_runtime(which, "cpu")  # noqa: E731
    return load_encoders(spec("efficientnet-lite0", "image"), spec("minilm-l6", "text"))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float())


def test_onnx_embeds_real_tiles_and_captions_as_torch_does():
    (image, text), (torch_image, torch_text) = encoders("onnx"), encoders("torch")
    assert (image.runtime, text.runtime, torch_image.runtime) == ("onnx", "onnx", "torch")
    pixels = torch.stack([image.transform(load_image(ASSETS / name)) for name in REAL_JPEGS])
    pixels = torch.cat([pixels, pixels.flip(-1), pixels[:1]])  # 11: a chunk of 16 and one of fewer, odd sizes
    got, want = image.encode(pixels), torch_image.encode(pixels)
    assert got.shape == want.shape == (11, 1280) and got.dtype == torch.float32
    assert cosine(got, want).min() >= 0.9999
    got, want = text.encode(CAPTIONS), torch_text.encode(CAPTIONS)  # empty, over-long (truncated), non-ASCII
    assert got.shape == want.shape == (6, 384) and cosine(got, want).min() >= 0.9999
    assert torch.allclose(got.norm(dim=1), torch.ones(6), atol=1e-4)
    assert cosine(text.encode(CAPTIONS[:1]), got[:1]) > 0.99999  # alone as in a batch (padding is masked out)


def test_auto_takes_onnx_on_a_cpu_for_the_exported_encoders_only(tiny_clip_spec):
    assert parse_spec("efficientnet-lite0", "image").with_runtime("auto", "cpu").runtime == "onnx"
    assert parse_spec("minilm-l6", "text").with_runtime("auto", "cuda").runtime == "torch"
    assert parse_spec(tiny_clip_spec, "image").with_runtime("auto", "cpu").runtime == "torch"
    assert parse_spec("minilm-l6", "text").with_runtime("torch", "cpu").runtime == "torch"


def test_runtime_errors_are_one_line(monkeypatch, tmp_path, tiny_clip_spec, caption_dataset):
    with pytest.raises(DuchError, match=r"unknown `runtime` 'tensorrt'; use one of auto, torch, onnx"):
        ExtractConfig(data="d", run="r", runtime="tensorrt").validate()
    with pytest.raises(DuchError, match="`runtime` onnx runs efficientnet-lite0 and minilm-l6, not open_clip"):
        parse_spec(tiny_clip_spec, "image").with_runtime("onnx", "cpu")
    with pytest.raises(DuchError, match="`runtime` onnx runs on the CPU, and the device is cuda"):
        parse_spec("efficientnet-lite0", "image").with_runtime("onnx", "cuda")
    # Not installed: a package name no environment has stands for a missing onnxruntime (the real find_spec check).
    monkeypatch.setattr(runtime, "ONNX_PACKAGES", ("onnxruntime_missing_for_this_test",))
    line = cli_error(["extract", "--data", str(caption_dataset), "--run", str(tmp_path / "r"), "--runtime", "onnx",
                      "--workers", "0", "--device", "cpu", "--no-progress"])
    assert line == ("error: --runtime onnx needs onnxruntime_missing_for_this_test, not installed: "
                    "pip install 'duch[onnx]'")
    assert parse_spec("efficientnet-lite0", "image").with_runtime("auto", "cpu").runtime == "torch"  # auto falls back


def test_a_damaged_or_foreign_export_is_never_used_as_it_is(tmp_path, monkeypatch):
    encoders("onnx")  # the session's exports exist
    record = onnx_cache.export_record("efficientnet-lite0")
    source = next(onnx_cache.cache_dir().glob("efficientnet-lite0-*.onnx"))
    assert onnx_cache.check_cached(source, record) is None
    monkeypatch.setenv("DUCH_CACHE_DIR", str(tmp_path))
    path = onnx_cache.cache_dir() / source.name
    path.parent.mkdir(parents=True)
    shutil.copy(source.with_suffix(".json"), path.with_suffix(".json"))
    kept = json.loads(path.with_suffix(".json").read_text())
    # Foreign: made by another torch, or for another encoder (a file copied under this name).
    for field, value in (("versions", {**kept["versions"], "torch": "1.0.0"}), ("encoder", "minilm-l6")):
        shutil.copy(source, path)
        path.with_suffix(".json").write_text(json.dumps({**kept, field: value}))
        assert onnx_cache.check_cached(path, record) == "it was made for another encoder or by other versions"
    path.with_suffix(".json").write_text(json.dumps(kept))
    assert onnx_cache.check_cached(path, record) is None
    path.with_suffix(".json").write_text("{")
    assert onnx_cache.check_cached(path, record) == "its record is missing or unreadable"
    path.with_suffix(".json").write_text(json.dumps(kept))
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights: the same size, another checksum
    path.write_bytes(bytes(data))
    assert onnx_cache.check_cached(path, record) == "its bytes do not match its record (damaged)"


@pytest.mark.slow  # an export of efficientnet-lite0 (10 s on an idle 2-core CPU); check_cached is tested above
def test_a_damaged_export_is_exported_again(tmp_path, monkeypatch):
    encoders("onnx")
    source = next(onnx_cache.cache_dir().glob("efficientnet-lite0-*.onnx"))
    record = onnx_cache.export_record("efficientnet-lite0")
    monkeypatch.setenv("DUCH_CACHE_DIR", str(tmp_path))
    path = onnx_cache.cache_dir() / source.name
    path.parent.mkdir(parents=True)
    shutil.copy(source.with_suffix(".json"), path.with_suffix(".json"))
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    # Loading the encoder exports it again, over the damaged file; the new file checks out.
    image = onnx_encoders.OnnxEfficientNetLite0()
    assert onnx_encoders.LAST["efficientnet-lite0"] == "exported (its bytes do not match its record (damaged))"
    assert onnx_cache.check_cached(path, record) is None and path.read_bytes() != bytes(data)
    pixels = image.transform(load_image(ASSETS / "102.jpg"))[None]
    assert cosine(image.encode(pixels), encoders("torch")[0].encode(pixels)).min() >= 0.9999
    onnx_encoders.OnnxEfficientNetLite0()
    assert onnx_encoders.LAST["efficientnet-lite0"] == "cached"


def test_one_runs_shards_come_from_one_runtime(caption_dataset, tmp_path):
    kw = dict(data=str(caption_dataset), image_views=0, shard_size=2, workers=0, device="cpu")
    done = extract(ExtractConfig(run=str(tmp_path / "a"), runtime="onnx", **kw), progress=False, echo=quiet)
    assert done.manifest["runtime"] == {"image": "onnx", "text": "onnx"}
    settings = done.manifest["basis"]["settings"]
    assert settings["image_encoder"] == {"spec": "efficientnet-lite0", "runtime": "onnx"}
    # A torch run keeps the digest it had before runtimes were recorded: no runtime key.
    torch_run = extract(ExtractConfig(run=str(tmp_path / "t"), runtime="torch", text_encoder=None, **kw),
                        progress=False, echo=quiet)
    assert torch_run.manifest["basis"]["settings"]["image_encoder"] == {"spec": "efficientnet-lite0"}
    # auto keeps the runtime a run was made with: the torch run stays up to date with ONNX Runtime installed, and
    # a killed torch run resumes with torch; --force makes it anew with auto's choice.
    lines = []
    kept = extract(ExtractConfig(run=str(tmp_path / "t"), runtime="auto", text_encoder=None, **kw), progress=False,
                   echo=lines.append)
    assert not kept.did_work and "up to date" in lines[-1]
    (tmp_path / "t" / "extract" / "manifest.json").unlink()
    resumed = extract(ExtractConfig(run=str(tmp_path / "t"), runtime="auto", text_encoder=None, **kw),
                      progress=False, echo=quiet)
    assert resumed.manifest["runtime"] == {"image": "torch"}
    anew = extract(ExtractConfig(run=str(tmp_path / "t"), runtime="auto", text_encoder=None, **kw), force=True,
                   progress=False, echo=quiet)
    assert anew.manifest["runtime"] == {"image": "onnx"}
    # A finished onnx run asked again with torch: refused, naming the runtime.
    with pytest.raises(DuchError, match=r"image_encoder.runtime: 'onnx' -> None"):
        extract(ExtractConfig(run=str(tmp_path / "a"), runtime="torch", **kw), progress=False, echo=quiet)
    # A killed one (no manifest, some shards): resumed with another runtime, refused; with its own, finished.
    (tmp_path / "a" / "extract" / "manifest.json").unlink()
    for shard in sorted((tmp_path / "a" / "extract").glob("*.h5"))[1:]:
        shard.unlink()
    with pytest.raises(DuchError, match="holds image shards embedded with the onnx runtime, and this run would embed "
                                        "the rest with torch; .* resume with `runtime` onnx"):
        extract(ExtractConfig(run=str(tmp_path / "a"), runtime="torch", **kw), progress=False, echo=quiet)
    again = extract(ExtractConfig(run=str(tmp_path / "a"), runtime="auto", **kw), progress=False, echo=quiet)
    assert again.manifest["fingerprint"] == done.manifest["fingerprint"]


def test_faiss_searches_on_one_thread_for_one_query_and_more_for_a_batch():
    import faiss

    codes = np.random.default_rng(0).integers(0, 256, (5000, 8), dtype=np.uint8)
    index = faiss_index.build(codes, "flat")
    before = faiss.omp_get_max_threads()
    seen = []

    class Watched:  # the real index, its search seeing the thread count it runs with
        def search(self, packed, k):
            seen.append(faiss.omp_get_max_threads())
            return index.search(packed, k)

    d1, rows1 = faiss_index.search(Watched(), codes[:1], 5)
    d8, rows8 = faiss_index.search(Watched(), codes[:8], 5)
    assert seen == [1, min(8, available_cores())] and faiss.omp_get_max_threads() == before
    assert rows1[0, 0] == 0 and d1[0, 0] == 0 and (rows8[:, 0] == np.arange(8)).all()


@pytest.fixture(scope="module")
def default_encoder_run(tmp_path_factory) -> str:
    """24 real tiles with captions extracted by the default encoders in ONNX Runtime (1 view), 8-bit heads."""
    root = tmp_path_factory.mktemp("rt-archive")
    (root / "images").mkdir()
    entries = []
    for i in range(24):
        shutil.copy(ASSETS / REAL_JPEGS[i % len(REAL_JPEGS)], root / "images" / f"{i}.jpg")
        cls = ["airplane", "harbor", "court"][i % 3]
        entries.append({"filename": f"{i}.jpg", "classname": cls, "sentences": [{"raw": f"a {cls} number {i}"}]})
    write_caption_json(root, entries)
    run = tmp_path_factory.mktemp("rt-run") / "run"
    extract(ExtractConfig(data=str(root), run=str(run), image_views=1, workers=0, device="cpu", runtime="onnx"),
            progress=False, echo=quiet)
    train_hash(TrainConfig(run=str(run), bits=(8,), epochs=2, hidden=16, batch_size=8, eval_every=2, device="cpu"),
               progress=False, echo=quiet)
    encode_archive(EncodeConfig(run=str(run), continuous=True, device="cpu"), progress=False, echo=quiet)
    return str(run)


def test_the_service_codes_captions_and_uploads_in_onnx_runtime(default_encoder_run):
    onnx_index = Index.load(default_encoder_run, bits=8, device="cpu", runtime="onnx")
    torch_index = Index.load(default_encoder_run, bits=8, device="cpu", runtime="torch")
    tile = ASSETS / "1003.jpg"
    # The query's continuous code through either runtime: the same within the encoders' parity.
    caption = ["a harbor number 4"]
    for a, b in ((onnx_index.coder.embed_text(caption), torch_index.coder.embed_text(caption)),
                 (onnx_index.coder.embed_image([tile]), torch_index.coder.embed_image([tile]))):
        assert float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.999
    assert {m: e.runtime for m, e in onnx_index.coder._encoders.items()} == {"text": "onnx", "image": "onnx"}
    app = create_app(ServeConfig(run=default_encoder_run, bits=8, device="cpu", runtime="onnx"))
    with running(app) as base:
        answer = httpx.post(f"{base}/api/search", json={"text": "a harbor number 4", "k": 5}, timeout=60).json()
        expected = onnx_index.search(text="a harbor number 4", k=5)
        assert [(h["id"], h["distance"]) for h in answer["hits"]] == [(h.id, h.distance) for h in expected]
        upload = httpx.post(f"{base}/api/search", files={"image": ("1003.jpg", tile.read_bytes(), "image/jpeg")},
                            data={"k": "5"}, timeout=60)
        assert upload.status_code == 200, upload.text
        expected = onnx_index.search(image=str(tile), k=5)
        assert [(h["id"], h["distance"]) for h in upload.json()["hits"]] == [(h.id, h.distance) for h in expected]
    coder = app.state.service.archives[app.state.service.default].index.coder
    assert {m: e.runtime for m, e in coder._encoders.items()} == {"text": "onnx", "image": "onnx"}


@pytest.mark.slow  # a dask LocalCluster's start and a worker's imports
def test_a_dask_worker_embeds_with_the_runtime_the_driver_chose(caption_dataset, tmp_path):
    from duch.pipeline.formats.shards import read_attrs, read_shard

    kw = dict(data=str(caption_dataset), image_views=1, shard_size=3, workers=0, device="cpu", runtime="onnx",
              threads=1)
    here = extract(ExtractConfig(run=str(tmp_path / "here"), **kw), progress=False, echo=quiet)
    there = extract(ExtractConfig(run=str(tmp_path / "there"), scheduler="local:1", **kw), progress=False, echo=quiet)
    assert there.manifest["fingerprint"] == here.manifest["fingerprint"]
    assert there.manifest["runtime"] == {"image": "onnx", "text": "onnx"}
    for shard in sorted((tmp_path / "here" / "extract").glob("*.h5")):
        assert read_attrs(tmp_path / "there" / "extract" / shard.name)["runtime"] == "onnx"
        a, b = read_shard(shard)["emb"], read_shard(tmp_path / "there" / "extract" / shard.name)["emb"]
        assert np.array_equal(a, b), shard.name  # one thread each: the same sums in the same order


def test_add_with_auto_embeds_new_items_with_the_archives_runtime(default_encoder_run, tmp_path):
    from duch.pipeline.config import AddConfig
    from duch.stages.add import add

    run = tmp_path / "run"
    shutil.copytree(default_encoder_run, run)
    (tmp_path / "new" / "images").mkdir(parents=True)
    for name in ("102.jpg", "2001.jpg"):
        shutil.copy(ASSETS / name, tmp_path / "new" / "images" / f"new-{name}")
    write_caption_json(tmp_path / "new", [{"filename": f"new-{n}", "sentences": [{"raw": "a new tile"}]}
                                          for n in ("102.jpg", "2001.jpg")])
    result = add(AddConfig(run=str(run), data=str(tmp_path / "new"), device="cpu", workers=0), progress=False,
                 echo=quiet)
    segment = json.loads((run / result.manifest["segment"] / "extract" / "manifest.json").read_text())
    assert segment["runtime"] == {"image": "onnx", "text": "onnx"}
    assert segment["config"]["runtime"] == "onnx"  # auto took the archive's own
