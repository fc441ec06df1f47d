"""The batched decode + preprocess path (nvJPEG on a GPU) checked on CPU against the PIL path.

torchvision decodes JPEGs on CPU with libjpeg-turbo, as PIL does, so these tests run the batched code itself
(header check, batched resize / crop / normalise, the pipeline's threads, the per-file fallback to PIL) on any
machine; only the nvJPEG call differs on a GPU, and bench/extract_speed.py compares the two paths there.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import duch.pipeline.embed.sources as sources
from duch import cli
from duch.data.images import load_image
from duch.pipeline import DuchError
from duch.pipeline.config import ExtractConfig
from duch.pipeline.encoders import load_encoders, parse_spec
from duch.pipeline.encoders.gpu_decode import TensorPreprocess, decode_and_preprocess, sniff_jpeg
from duch.pipeline.formats.shards import read_shard
from duch.stages.extract import extract

from .conftest import ASSETS, REAL_JPEGS

CPU = torch.device("cpu")


def quiet(_):
    pass


def read_bytes(path):
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


def batched(paths, transform):
    datas = [read_bytes(p) for p in paths]
    sizes = [sniff_jpeg(bytes(d.numpy())) for d in datas]
    assert None not in sizes
    pixels, ok, failed = decode_and_preprocess(datas, sizes, TensorPreprocess.from_transform(transform), CPU)
    assert ok == list(range(len(paths))) and failed == []
    return pixels


@pytest.fixture
def odd_jpegs(tmp_path):
    """JPEGs the batched decoder must leave to PIL: progressive, CMYK, grey, EXIF-rotated, cut short."""
    src = Image.open(ASSETS / "102.jpg")
    out = {}
    src.save(tmp_path / "progressive.jpg", progressive=True)
    src.convert("CMYK").save(tmp_path / "cmyk.jpg")
    src.convert("L").save(tmp_path / "grey.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    src.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    exif[0x0112] = 1
    src.save(tmp_path / "upright.jpg", exif=exif.tobytes())
    (tmp_path / "cut.jpg").write_bytes((ASSETS / "102.jpg").read_bytes()[:3000])
    src.save(tmp_path / "image.png")
    for name in ("progressive", "cmyk", "grey", "rotated", "upright", "cut"):
        out[name] = tmp_path / f"{name}.jpg"
    out["png"] = tmp_path / "image.png"
    return out


def test_header_check_takes_plain_jpegs_only(odd_jpegs):
    sizes = {name: sniff_jpeg((ASSETS / name).read_bytes()) for name in REAL_JPEGS}
    assert sizes["102.jpg"] == (256, 256) and sizes["156.jpg"] == (256, 253) and sizes["497.jpg"] == (247, 247)
    verdict = {name: sniff_jpeg(path.read_bytes()) for name, path in odd_jpegs.items()}
    assert verdict == {"progressive": None, "cmyk": None, "grey": None, "rotated": None, "upright": (256, 256),
                       "cut": None, "png": None}
    assert sniff_jpeg(b"") is None and sniff_jpeg(b"\xff\xd8\xff") is None


@pytest.mark.parametrize("spec", ["efficientnet-lite0", "open_clip:RN50:none"])
def test_batched_preprocess_matches_pil_path(spec):
    encoder, _ = load_encoders(parse_spec(spec, "image"), None, "cpu")
    paths = [ASSETS / name for name in REAL_JPEGS]  # 256 x 256, 253 x 256 and 247 x 247 tiles
    fast = batched(paths, encoder.transform)
    reference = torch.stack([encoder.transform(load_image(p)) for p in paths])
    # Pixels: PIL's two uint8 resampling passes replayed in float32, so within 2 grey levels (scaled by
    # 1 / std after normalising) and on average far under one.
    scale = 255 * torch.tensor(TensorPreprocess.from_transform(encoder.transform).std).view(1, 3, 1, 1)
    assert ((fast - reference) * scale).abs().max() <= 2.01
    assert ((fast - reference) * scale).abs().mean() < 0.05
    # Embeddings: cosine > 0.9999 (measured >= 0.99998 for efficientnet-lite0's ImageNet weights). That is
    # below the noise of the bf16 autocast the encoders run under on a GPU (relative error ~1e-2).
    a, b = encoder.encode(fast), encoder.encode(reference)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.9999


def test_decoder_failure_falls_back_per_file(monkeypatch):
    import torchvision.io

    real = torchvision.io.decode_jpeg
    bad = read_bytes(ASSETS / "1003.jpg")

    def picky(data, **kw):  # a decoder that fails any call holding one particular file, as nvJPEG fails a batch
        items = data if isinstance(data, list) else [data]
        if any(d.data_ptr() == bad.data_ptr() for d in items):
            raise RuntimeError("Error while decoding JPEG images")
        return real(data, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    encoder, _ = load_encoders(parse_spec("efficientnet-lite0", "image"), None, "cpu")
    datas = [read_bytes(ASSETS / n) for n in ("102.jpg", "2001.jpg")] + [bad, read_bytes(ASSETS / "156.jpg")]
    sizes = [sniff_jpeg(bytes(d.numpy())) for d in datas]
    pixels, ok, failed = decode_and_preprocess(datas, sizes, TensorPreprocess.from_transform(encoder.transform), CPU)
    assert ok == [0, 1, 3] and failed == [2] and pixels.shape == (3, 3, 224, 224)


def test_unsupported_transform_is_left_to_pil():
    import torchvision.transforms as T

    assert TensorPreprocess.from_transform(T.Compose([T.RandomCrop(8), T.ToTensor()])) is None
    assert TensorPreprocess.from_transform(T.Compose([T.Resize(8), T.ToTensor()])) is None  # sizes would vary
    assert TensorPreprocess.from_transform(T.Compose([T.Resize((8, 8)), T.ToTensor()])) is not None


def archive(tmp_path, odd_jpegs):
    """Real tiles plus every kind of file the batched decoder hands to PIL, and unusable ones."""
    folder = tmp_path / "archive"
    (folder / "tiles").mkdir(parents=True)
    for name in REAL_JPEGS:
        shutil.copy(ASSETS / name, folder / "tiles" / name)
    for path in odd_jpegs.values():
        shutil.copy(path, folder / "tiles" / path.name)
    (folder / "tiles" / "fake.jpg").write_text("not an image")
    (folder / "tiles" / "empty.jpg").write_bytes(b"")
    shutil.copy(ASSETS / "1.tif", folder / "tiles" / "scene.tif")
    return folder


def test_batched_pipeline_writes_what_the_pil_path_writes(tmp_path, odd_jpegs, tiny_clip_spec, monkeypatch):
    data = archive(tmp_path, odd_jpegs)
    kw = dict(image_encoder="efficientnet-lite0", text_encoder=None, image_views=0, shard_size=4,
              batch_size=3, workers=0, device="cpu")
    slow = extract(ExtractConfig(data=str(data), run=str(tmp_path / "pil"), decode="cpu", **kw),
                   progress=False, echo=quiet)
    monkeypatch.setattr(sources, "BATCHED_ON_CPU", True)
    fast = extract(ExtractConfig(data=str(data), run=str(tmp_path / "batched"), decode="gpu", **kw),
                   progress=False, echo=quiet)
    assert fast.manifest["fingerprint"] == slow.manifest["fingerprint"]  # --decode is no output setting
    assert slow.manifest["image_decode"] == {"path": "cpu", "why": "--decode cpu"}
    # 5 real tiles and the upright one go the batched way; the 9 others (odd, unusable, TIFF) to PIL.
    assert fast.manifest["image_decode"] == {"path": "gpu", "batched": 6, "pil": 9}
    assert fast.manifest["rejects"] == slow.manifest["rejects"]
    assert {r["id"]: r["reason"] for r in fast.manifest["rejects"]} == {
        "tiles/cut": "truncated image file", "tiles/empty": "empty file (0 bytes)",
        "tiles/fake": "not a recognised image (expected JPEG, PNG or TIFF)"}
    for name in sorted(p.name for p in (tmp_path / "pil" / "extract").glob("image-*.h5")):
        a = read_shard(tmp_path / "pil" / "extract" / name)
        b = read_shard(tmp_path / "batched" / "extract" / name)
        assert list(a["ids"]) == list(b["ids"]) and list(a["reject_id"]) == list(b["reject_id"])
        ea, eb = a["emb"].astype(np.float32), b["emb"].astype(np.float32)
        cos = (ea * eb).sum(1) / np.linalg.norm(ea, axis=1) / np.linalg.norm(eb, axis=1)
        assert cos.min() > 0.9999, name

    # Same settings and inputs: the other decode path finds the run up to date.
    said = []
    again = extract(ExtractConfig(data=str(data), run=str(tmp_path / "batched"), decode="cpu", **kw),
                    progress=False, echo=said.append)
    assert not again.did_work and "up to date" in said[0]


def test_decode_choice(tmp_path, tiny_clip_spec, caption_dataset, monkeypatch):
    base = dict(data=str(caption_dataset), run=str(tmp_path / "run"), image_encoder=tiny_clip_spec,
                text_encoder=tiny_clip_spec, workers=0, device="cpu")
    with pytest.raises(DuchError, match="decode.? gpu: the device is not a CUDA GPU; augmented views"):
        extract(ExtractConfig(decode="gpu", **base), progress=False, echo=quiet)
    with pytest.raises(DuchError, match="`decode` must be auto, gpu or cpu"):
        extract(ExtractConfig(decode="nvjpeg", **base), progress=False, echo=quiet)
    said = CliRunner().invoke(cli.main, ["extract", "--data", str(caption_dataset), "--run", str(tmp_path / "c"),
                                         "--device", "cpu", "--decode", "gpu"])
    assert said.exit_code == 2 and said.output.startswith("error: --decode gpu: the device is not a CUDA GPU")
    result = extract(ExtractConfig(**base), progress=False, echo=quiet)
    assert result.manifest["image_decode"] == {
        "path": "cpu", "why": "the device is not a CUDA GPU; augmented views (--image-views > 0) are made with PIL"}
    # The batched path runs text the same way: captions tokenised in worker processes ahead of the model.
    monkeypatch.setattr(sources, "BATCHED_ON_CPU", True)
    both = extract(ExtractConfig(**(base | {"run": str(tmp_path / "r2"), "image_views": 0, "workers": 2,
                                            "text_batch_size": 3})), progress=False, echo=quiet)
    assert both.manifest["image_decode"] == {"path": "gpu", "batched": 5, "pil": 0}
    texts = [read_shard(p) for p in sorted((tmp_path / "r2" / "extract").glob("text-*.h5"))]
    reference = [read_shard(p) for p in sorted((tmp_path / "run" / "extract").glob("text-*.h5"))]
    assert np.allclose(np.concatenate([t["emb"] for t in texts]).astype(np.float32),
                       np.concatenate([t["emb"] for t in reference]).astype(np.float32), atol=2e-3)
    manifest = json.loads((tmp_path / "r2" / "extract" / "manifest.json").read_text())
    assert manifest["config"]["decode"] == "auto"
