import pytest
import torch

from duch.data.images import load_image
from duch.pipeline import DuchError
from duch.pipeline.encoders import EncoderSpec, load_encoders, parse_spec

from .conftest import ASSETS

AIRLINER = 404  # ImageNet-1k class index


def test_efficientnet_lite0_really_loads_imagenet_weights():
    image, _ = load_encoders(parse_spec("efficientnet-lite0", "image"), None)
    pixels = torch.stack([image.transform(load_image(ASSETS / "102.jpg"))])
    probs = image.classify(pixels)[0]
    # A UC Merced airplane tile: random weights would give ~0.001 to every class.
    assert int(probs.argmax()) == AIRLINER and float(probs[AIRLINER]) > 0.2
    emb = image.encode(pixels)
    assert emb.shape == (1, 1280) and emb.dtype == torch.float32
    # Micro-batching on CPU must not change the result.
    many = image.encode(pixels.repeat(20, 1, 1, 1))
    assert torch.allclose(many, emb.expand(20, -1), atol=1e-4)


def test_minilm_really_loads_sentence_weights():
    _, text = load_encoders(None, parse_spec("minilm-l6", "text"))
    a, b, c = text.encode(["many airplanes are parked at the airport", "lots of planes stand at an airport",
                           "a green golf course with a pond"])
    assert text.dim == 384 and torch.allclose(a.norm(), torch.tensor(1.0), atol=1e-4)
    assert float(a @ b) > 0.6 and float(a @ c) < 0.3


def test_spec_parsing():
    assert parse_spec("open_clip:ViT-B-32:laion2b_s34b_b79k", "image") == \
        EncoderSpec("open_clip", "ViT-B-32", "laion2b_s34b_b79k")
    assert parse_spec("open_clip:ViT-B-32:/m/RemoteCLIP-ViT-B-32.pt", "text").weights == "/m/RemoteCLIP-ViT-B-32.pt"
    assert parse_spec("open_clip:RN50:none", "image").weights is None
    assert parse_spec("open_clip:RN50:none", "image").text == "open_clip:RN50:none"
    with pytest.raises(DuchError, match="has no text tower"):
        parse_spec("efficientnet-lite0", "text")
    with pytest.raises(DuchError, match="write open_clip:ARCH:WEIGHTS"):
        parse_spec("open_clip:ViT-B-32", "image")
    with pytest.raises(DuchError, match="unknown image encoder 'resnet9'"):
        parse_spec("resnet9", "image")


def test_open_clip_one_model_serves_both_towers(tiny_clip_spec):
    spec = parse_spec(tiny_clip_spec, "image")
    image, text = load_encoders(spec, parse_spec(tiny_clip_spec, "text"))
    assert image.shared is text.shared  # loaded once
    assert image.dim == text.dim == 16
    pixels = torch.stack([image.transform(load_image(ASSETS / "156.jpg"))])
    assert pixels.shape == (1, 3, 32, 32)
    assert image.encode(pixels).shape == (1, 16)
    assert text.encode(["a harbor", "boats"]).shape == (2, 16)


def test_open_clip_local_checkpoint_loads_its_weights(tiny_clip_spec, tmp_path):
    random, _ = load_encoders(parse_spec(tiny_clip_spec, "image"), None)
    trained = {k: v * 1.5 + 0.01 if v.is_floating_point() else v
               for k, v in random.shared.model.state_dict().items()}
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": trained}, ckpt)
    arch = tiny_clip_spec.split(":")[1]
    loaded, _ = load_encoders(parse_spec(f"open_clip:{arch}:{ckpt}", "image"), None)
    random.shared.model.load_state_dict(trained)
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.encode(pixels), random.encode(pixels))


def test_open_clip_random_weights_are_the_same_every_load(tiny_clip_spec):
    a, _ = load_encoders(parse_spec(tiny_clip_spec, "image"), None)
    b, _ = load_encoders(parse_spec(tiny_clip_spec, "image"), None)
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.equal(a.encode(pixels), b.encode(pixels))


def test_open_clip_errors_are_clear(tiny_clip_spec, tmp_path):
    with pytest.raises(DuchError, match="open_clip knows no model 'ViT-Z-99'"):
        load_encoders(parse_spec("open_clip:ViT-Z-99:none", "image"), None)
    arch = tiny_clip_spec.split(":")[1]
    with pytest.raises(DuchError, match="checkpoint .*missing.pt not found"):
        load_encoders(parse_spec(f"open_clip:{arch}:{tmp_path}/missing.pt", "image"), None)
