"""Shared fixtures: a tiny open_clip config with random weights, and small real datasets on disk."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest


def _import_this_checkout() -> None:
    """The checkout these tests sit in is the duch under test, whatever its folder's name and whether or not duch
    is installed (an editable install of another checkout included): a temporary folder holding a `duch` link to
    it goes first on sys.path, and on PYTHONPATH for the processes the tests start (a path entry is found before
    an editable install's finder)."""
    root = Path(__file__).resolve().parents[1]
    links = Path(tempfile.mkdtemp(prefix="duch-checkout-"))
    links.chmod(0o755)  # readable by the tests' children run as another user (faultkit.as_unprivileged_prefix)
    (links / "duch").symlink_to(root, target_is_directory=True)
    atexit.register(shutil.rmtree, links, ignore_errors=True)
    sys.path.insert(0, str(links))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(links), os.environ.get("PYTHONPATH")) if p)
    loaded = sys.modules.get("duch")
    if loaded is not None and Path(getattr(loaded, "__file__", None) or "/").resolve().parent != root:
        for name in [m for m in sys.modules if m == "duch" or m.startswith("duch.")]:
            del sys.modules[name]  # a duch imported before (a plugin's), from elsewhere
    # (A checkout in a folder named duch is imported as duch already: pytest names its tests duch.tests.*.)
    import duch

    assert Path(duch.__file__).resolve().parent == root, f"duch imports from {duch.__file__}, not {root}"


_import_this_checkout()

# The ONNX exports of the default encoders (pipeline/encoders/onnx_cache.py) go to a folder of this session, made
# once per session by the first test that needs them: tests never read or write the user's cache.
if "DUCH_CACHE_DIR" not in os.environ:
    os.environ["DUCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="duch-test-cache-")
    os.chmod(os.environ["DUCH_CACHE_DIR"], 0o777)  # shared with the tests' children run as another user
    atexit.register(shutil.rmtree, os.environ["DUCH_CACHE_DIR"], ignore_errors=True)

ASSETS = Path(__file__).parent / "assets"
# Real UC Merced images (USGS National Map imagery): 102 airplane, 1003 harbor, 2001 tennis court,
# 156 (253 x 256) and 497 (247 x 247) odd sizes; 1.tif an original TIFF.
REAL_JPEGS = ["102.jpg", "1003.jpg", "2001.jpg", "156.jpg", "497.jpg"]

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip_spec(tmp_path_factory) -> str:
    """open_clip spec for a one-layer ViT/text transformer with random weights: builds in milliseconds."""
    path = tmp_path_factory.mktemp("clipcfg") / "duch-tiny-test.json"
    path.write_text(json.dumps(TINY_CLIP))
    return f"open_clip:{path}:none"


def write_caption_json(root: Path, entries: list[dict], name: str = "dataset.json") -> Path:
    path = root / name
    path.write_text(json.dumps({"dataset": "test", "images": entries}))
    return path


@pytest.fixture
def caption_dataset(tmp_path) -> Path:
    """UCM-style caption JSON with 5 real images (two of odd size), one single-caption image."""
    images = tmp_path / "images"
    images.mkdir()
    entries = []
    for i, name in enumerate(REAL_JPEGS):
        shutil.copy(ASSETS / name, images / name)
        n_captions = 1 if i == 2 else 3
        entries.append({
            "filename": name, "imgid": i, "split": "train" if i < 3 else "test",
            "classcode": i % 2,
            "sentences": [{"raw": f"caption {k} of image {name} with many planes"} for k in range(n_captions)],
        })
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"classes": {"0": "airplane", "1": "harbor"}, "images": entries}))
    return tmp_path


@pytest.fixture(scope="session")
def tiny_extract_run(tmp_path_factory, tiny_clip_spec) -> Path:
    """A finished extract stage over 24 real tiles in 3 classes, tiny open_clip, 2 views: copy it before use."""
    from duch.pipeline.config import ExtractConfig
    from duch.stages.extract import extract

    root = tmp_path_factory.mktemp("archive24")
    (root / "images").mkdir()
    classes = ["airplane", "harbor", "court"]
    entries = []
    for i in range(24):
        shutil.copy(ASSETS / REAL_JPEGS[i % len(REAL_JPEGS)], root / "images" / f"{i}.jpg")
        cls = classes[i % 3]
        entries.append({"filename": f"{i}.jpg", "classname": cls, "split": ["train", "val", "test"][i % 3],
                        "sentences": [{"raw": f"a {cls} scene number {i}"}, {"raw": f"{cls} seen from above"}]})
    write_caption_json(root, entries)
    run = tmp_path_factory.mktemp("run24")
    extract(ExtractConfig(data=str(root), run=str(run), image_encoder=tiny_clip_spec, text_encoder=tiny_clip_spec,
                          shard_size=10, workers=0, device="cpu"), progress=False, echo=lambda _: None)
    return run


@pytest.fixture(scope="session")
def encoded_run(tmp_path_factory, tiny_extract_run) -> Path:
    """tiny_extract_run trained at 8 and 16 bits (a few epochs) and encoded with continuous outputs: copy it
    before changing it."""
    from duch.pipeline.config import EncodeConfig, TrainConfig
    from duch.stages.encode_archive import encode_archive
    from duch.stages.train_hash import train_hash

    run = tmp_path_factory.mktemp("encoded") / "run"
    shutil.copytree(tiny_extract_run, run)
    quiet = lambda _: None  # noqa: E731
    train_hash(TrainConfig(run=str(run), bits=(8, 16), epochs=3, hidden=32, batch_size=8, eval_every=3,
                           device="cpu"), progress=False, echo=quiet)
    encode_archive(EncodeConfig(run=str(run), continuous=True, device="cpu"), progress=False, echo=quiet)
    return run


@pytest.fixture(scope="session")
def scenes(tmp_path_factory, tiny_extract_run, tiny_clip_spec) -> dict:
    """A scene archive: an 8 x 8 mosaic of real UCM tiles as one GeoTIFF in UTM 11N near Merced (tests/scenekit.py)
    extracted as 64 tiles, coded by 64-bit heads trained on the 24-tile captioned archive (the model); read it
    only (copy it before serving it: the service caches thumbnails in it)."""
    from duch.pipeline.config import EncodeConfig, ExtractConfig, TrainConfig
    from duch.stages.encode_archive import encode_archive
    from duch.stages.extract import extract
    from duch.stages.train_hash import train_hash

    from .scenekit import write_mosaic

    quiet = lambda _: None  # noqa: E731
    root = tmp_path_factory.mktemp("scenes")
    model = root / "model"
    shutil.copytree(tiny_extract_run, model)
    train_hash(TrainConfig(run=str(model), bits=(64,), epochs=3, hidden=32, batch_size=8, eval_every=3,
                           device="cpu"), progress=False, echo=quiet)
    path, tiles = write_mosaic(root / "data" / "merced.tif")
    archive = root / "archive"
    # Without augmented views (their PIL work is most of extract's time here; test_scenes.py covers them).
    extract(ExtractConfig(data=str(root / "data"), run=str(archive), image_encoder=tiny_clip_spec,
                          text_encoder=tiny_clip_spec, tile=256, image_views=0, workers=0, device="cpu"),
            progress=False, echo=quiet)
    encode_archive(EncodeConfig(run=str(model), archive=str(archive), continuous=True, device="cpu"), progress=False,
                   echo=quiet)
    return {"model": model, "archive": archive, "scene": path, "tiles": tiles}
