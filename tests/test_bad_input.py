"""Bad input, each with the exact message a user sees.

Images: one extract run over an archive holding every kind of bad or unusual file; each is either skipped with
its reason in the manifest's rejects or converted by the documented rules (docs/stages.md), and the run goes on.
Dataset files and the command line: one `error: ...` line on stderr and exit code 2, never a traceback.
(test_images.py and test_readers.py pin the conversion rules and the readers' messages one by one; this file runs
them end to end.)
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from duch import cli
from duch.data import read_dataset
from duch.data.images import load_image
from duch.pipeline.encoders import parse_spec
from duch.pipeline.encoders.context import count_truncated
from duch.pipeline.formats.features import load_features

from .conftest import ASSETS, write_caption_json

LONG_CAPTION = ("many planes parked near the terminal " * 300)[:10_000]


def png_bomb(path: Path, side: int = 30000) -> None:
    """A 30000 x 30000 one-bit PNG of 110 KB: 900 Mpx once decoded. Written row by row, never held whole."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    packer = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def tiff_bomb(path: Path, side: int = 30000) -> None:
    """The same as a tiled, deflated one-bit TIFF (140 KB): tifffile has no bomb check of its own."""
    tile = np.zeros((1024, 1024), bool)
    per_side = (side + 1023) // 1024
    tiles = (tile for _ in range(per_side * per_side))
    tifffile.imwrite(path, data=tiles, shape=(side, side), dtype=bool, tile=(1024, 1024), compression="zlib")


def bad_images(images: Path) -> dict[str, str | None]:
    """Every kind of file (by file name), and the reject reason each must get (None: converted and kept)."""
    real = (ASSETS / "102.jpg").read_bytes()
    (images / "good.jpg").write_bytes(real)
    (images / "empty.jpg").write_bytes(b"")
    (images / "truncated.jpg").write_bytes(real[: len(real) // 2])
    (images / "text.jpg").write_text("this is not a picture\n")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(images / "one-pixel.png")
    png_bomb(images / "bomb.png")
    tiff_bomb(images / "bomb-tiff.tif")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(images / "cmyk.jpg")
    rng = np.random.default_rng(0)
    tifffile.imwrite(images / "rgb16.tif", rng.integers(0, 65535, (30, 40, 3), dtype=np.uint16))
    tifffile.imwrite(images / "rgbn8.tif", rng.integers(0, 255, (30, 40, 4), dtype=np.uint8))
    tifffile.imwrite(images / "rgbn16.tif", rng.integers(0, 4000, (30, 40, 4), dtype=np.uint16))
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)  # index 0, transparent red
    palette.save(images / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    Image.new("RGB", (60, 20), "white").save(images / "exif.jpg", exif=exif)
    too_large = "image too large (900000000 pixels; the limit against decompression bombs is 89478485 pixels)"
    return {"good.jpg": None, "missing.jpg": "missing file", "empty.jpg": "empty file (0 bytes)",
            "truncated.jpg": "truncated image file", "text.jpg": "not a recognised image (expected JPEG, PNG or TIFF)",
            "one-pixel.png": None, "bomb.png": too_large, "bomb-tiff.tif": too_large, "cmyk.jpg": None,
            "rgb16.tif": None, "rgbn8.tif": None, "rgbn16.tif": None, "palette.png": None, "exif.jpg": None}


def test_one_extract_over_every_bad_input_rejects_or_converts_each_and_goes_on(tmp_path, tiny_clip_spec):
    images = tmp_path / "archive" / "images"
    images.mkdir(parents=True)
    expected = {Path(name).stem: reason for name, reason in bad_images(images).items()}  # by item id
    entries = [{"filename": name, "classname": "test",
                "sentences": [{"raw": f"tile {Path(name).stem} from above"}, {"raw": f"the {Path(name).stem} tile"}]}
               for name in bad_images(images)]
    entries[0]["sentences"] += [{"raw": LONG_CAPTION}, {"raw": "   "}, {"raw": "bad \ud800 caption"}]
    write_caption_json(images.parent, entries)
    run = tmp_path / "run"
    result = CliRunner().invoke(cli.main, ["extract", "--data", str(images.parent), "--run", str(run),
                                           "--image-encoder", tiny_clip_spec, "--text-encoder", tiny_clip_spec,
                                           "--workers", "0", "--device", "cpu", "--no-progress"], prog_name="duch")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output

    manifest = json.loads((run / "extract" / "manifest.json").read_text())
    rejected = {name: reason for name, reason in expected.items() if reason}
    assert manifest["rejects"] == [
        {"id": "good#3", "reason": "empty caption"},
        {"id": "good#4", "reason": "caption not valid Unicode text (unpaired surrogate '\\ud800' at character 4)"},
        *({"id": name, "reason": reason} for name, reason in rejected.items())]
    kept = [name for name, reason in expected.items() if reason is None]
    counts = manifest["counts"]
    assert (counts["items"], counts["images"], counts["rejects"]) == (14, len(kept), 2 + len(rejected))
    assert (f"warning: {2 + len(rejected)} items skipped (and the {2 * len(rejected)} captions of the rejected "
            "images)") in result.output
    # The 10,000-character caption is kept (and truncated); the rejected images' captions go with them.
    assert counts["captions"] == 2 * len(kept) + 1 and counts["dropped_captions"] == 2 * len(rejected)
    features = load_features(run)
    assert sorted(features.ids) == sorted(kept) and np.isfinite(features.image.astype(np.float32)).all()
    assert LONG_CAPTION in set(features.text)
    # The tokenizer cuts it at its context; the count for the manifest (tiny CLIP reads 16 tokens):
    assert count_truncated(parse_spec(tiny_clip_spec, "text"), features.text) == 1
    assert counts["truncated_captions"] == 1
    assert f"extract: note: 1 of {2 * len(kept) + 1} captions are longer than the text encoder reads" in result.output

    # Conversion rules, as docs/stages.md states them, on what the run kept.
    assert load_image(images / "one-pixel.png").size == (1, 1)  # any size: the encoder's transform resizes it
    assert load_image(images / "exif.jpg").size == (20, 60)  # EXIF orientation applied
    palette = np.asarray(load_image(images / "palette.png"))
    assert tuple(palette[0, 0]) == (0, 0, 0) and tuple(palette[1, 1]) == (0, 255, 0)  # transparent -> black
    for name in ("rgb16", "rgbn8", "rgbn16"):
        rgb = np.asarray(load_image(images / f"{name}.tif"))
        assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8  # bands 1-3; > 8 bits: 2-98% stretch


def test_jsonl_and_csv_rows_that_are_not_utf8(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "pairs.jsonl").write_bytes(b'{"image": "a.jpg", "caption": "a field"}\n'
                                           b'{"image": "b.jpg", "caption": "caf\xe9"}\n')
    ds = read_dataset(tmp_path / "pairs.jsonl")
    assert [i.id for i in ds.items] == ["a"] and [(r.id, r.reason) for r in ds.rejects] == [
        ("pairs.jsonl:2", "not UTF-8")]
    (tmp_path / "rows.csv").write_bytes(b"image,caption\na.jpg,a field\nb.jpg,caf\xe9 au lait\n")
    with pytest.raises(Exception) as e:
        read_dataset(tmp_path / "rows.csv")
    assert str(e.value) == (f"{tmp_path / 'rows.csv'}: not UTF-8 text at line 3, column 10 (byte 0xe9); save the "
                            "file as UTF-8")


# ---------------------------------------------------------------------------------------------- one-line errors
def cli_error(args: list[str]) -> str:
    """Run the real command line; it must fail with exit code 2 and exactly one line, `error: ...`."""
    result = CliRunner().invoke(cli.main, args, prog_name="duch")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def extract_args(data: Path, run: Path, spec: str = "efficientnet-lite0", text: str = "minilm-l6") -> list[str]:
    return ["extract", "--data", str(data), "--run", str(run), "--image-encoder", spec, "--text-encoder", text,
            "--workers", "0", "--device", "cpu", "--no-progress"]


def dataset_with(tmp_path: Path, text: str | bytes) -> Path:
    (tmp_path / "images").mkdir(parents=True, exist_ok=True)
    shutil.copy(ASSETS / "102.jpg", tmp_path / "images" / "a.jpg")
    path = tmp_path / "dataset.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("text, message", [
    ('{"images": [\n  {"filename": "a.jpg",}\n]}',
     "not valid JSON at line 2, column 24: Expecting property name enclosed in double quotes"),
    (b'{"images": [\n  {"filename": "a.jpg",\n   "sentences": [{"raw": "caf\xe9"}]}]}',
     "not UTF-8 text at line 3, column 30 (byte 0xe9); save the file as UTF-8"),
    ('{"images": {"filename": "a.jpg"}}',
     "expected an object with an 'images' list (the UCM/RSICD caption format)"),
    ('{"images": [{"filename": 3}]}', "images[0].filename: image path must be a non-empty string, got 3"),
    ('{"images": [{"filename": "a.jpg", "sentences": [{"raw": 7}]}]}',
     "images[0].sentences[0].raw: expected a string, got int"),
    ('{"images": [{"filename": "a.jpg", "sentences": {"raw": "x"}}]}',
     "images[0].sentences: expected a list, got dict"),
    ('{"images": [{"filename": "a.jpg", "classname": 4}]}', "images[0].classname: expected a string, got int"),
    ('{"images": [{"filename": "a.jpg"}, {"filename": "a.jpg"}]}',
     "duplicate image id 'a' ('a.jpg' and 'a.jpg'); each image may appear once"),
    ('{"images": [{"filename": "../../etc/passwd"}]}',
     "images[0].filename: image path '../../etc/passwd' leaves the images folder {images}"),
    ('{"images": [{"filename": "/etc/passwd"}]}',
     "images[0].filename: image path '/etc/passwd' is absolute; paths must be relative to {images}"),
    ('{"images": [{"filename": "link.jpg"}]}',
     "images[0].filename: image path 'link.jpg' resolves outside the images folder {images}"),
    ('{"images": [{"filename": "a\\ud800.jpg"}]}',
     "images[0].filename: image path 'a\\ud800.jpg' is not valid Unicode text (unpaired surrogate '\\ud800' at "
     "character 1)"),
])
def test_dataset_files_that_cannot_be_read_fail_at_once_naming_the_place(tmp_path, text, message):
    path = dataset_with(tmp_path, text)
    os.symlink(ASSETS / "102.jpg", tmp_path / "images" / "link.jpg")  # a symlink leading out of images/
    line = cli_error(extract_args(path, tmp_path / "run"))
    assert line == f"error: {path}: " + message.format(images=tmp_path / "images")
    assert not (tmp_path / "run" / "extract").exists()  # refused before anything is written


@pytest.fixture
def extracted(tiny_extract_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_extract_run, run)
    return run


def test_cli_mistakes_are_one_line(extracted, tmp_path, tiny_clip_spec):
    run = extracted
    data = dataset_with(tmp_path / "data", '{"images": [{"filename": "a.jpg", "sentences": [{"raw": "x"}]}]}')
    cases = [
        (["train-hash", "--run", str(run), "--bits", "12"],
         "error: --bits 12: code lengths must be positive multiples of 8 (e.g. 16,32,64,128)"),
        (["train-hash", "--run", str(run), "--bits", "0,16"],
         "error: --bits 0: code lengths must be positive multiples of 8 (e.g. 16,32,64,128)"),
        (["train-hash", "--run", str(run), "--bits", "sixteen"],
         "error: Invalid value for '--bits': expected comma-separated integers such as 16,32,64,128, got 'sixteen' "
         "(see duch train-hash --help)"),
        (["encode-archive", "--run", str(run), "--bits", "7"], "error: --bits 7: code lengths are positive "
                                                               "multiples of 8"),
        (["train-hash", "--run", str(run), "--split", "random"],
         "error: Invalid value for '--split': 'random' is not one of 'paper', 'dataset', 'all'. "
         "(see duch train-hash --help)"),
        (["train-hash", "--run", str(run), "--epochs", "0"],
         "error: --epochs must be at least 1 and --batch-size at least 2 (BatchNorm needs 2 items)"),
        (extract_args(data, tmp_path / "r1", spec="resnet9"),
         "error: unknown image encoder 'resnet9'; use efficientnet-lite0 or open_clip:ARCH:WEIGHTS (e.g. "
         "open_clip:ViT-B-32:/path/RemoteCLIP-ViT-B-32.pt)"),
        (extract_args(data, tmp_path / "r2", text="efficientnet-lite0"),
         "error: encoder 'efficientnet-lite0' has no text tower; use one of minilm-l6 or open_clip:ARCH:WEIGHTS"),
        (extract_args(data, tmp_path / "r3", spec="open_clip:ViT-B-32"),
         "error: encoder spec 'open_clip:ViT-B-32': write open_clip:ARCH:WEIGHTS, WEIGHTS being a pretrained tag, "
         "a checkpoint path, or 'none' for random weights"),
        (extract_args(data, tmp_path / "r4", spec="open_clip:NoSuchNet:none", text="none"),
         "error: open_clip knows no model 'NoSuchNet'; see open_clip.list_models(), or give a model-config .json"),
        (extract_args(data, tmp_path / "r5", spec="open_clip:ViT-B-32:/nowhere/weights.pt", text="none"),
         "error: open_clip checkpoint /nowhere/weights.pt not found"),
        # A run directory from another stage, or none at all.
        (["train-hash", "--run", str(tmp_path / "empty")],
         f"error: {tmp_path / 'empty'}: no finished extract stage; run the extract stage on it first"),
        (["train-hash", "--run", str(run / "extract")],
         f"error: {run / 'extract'}: no finished extract stage; run the extract stage on it first"),
        (["encode-archive", "--run", str(run)],
         f"error: {run.resolve()}: no finished train-hash stage; run the train-hash stage on it first"),
        (["evaluate", "--run", str(run)],
         f"error: {run.resolve()}: no finished train-hash stage; run the train-hash stage on it first"),
        (extract_args(data, Path(tmp_path / "data" / "dataset.json")),
         f"error: cannot write {tmp_path / 'data' / 'dataset.json'}: a file stands where a folder is needed; give "
         "a folder as --run"),
    ]
    for args, expected in cases:
        assert cli_error(args) == expected, args


def test_a_manifest_of_a_newer_schema_is_refused_with_upgrade(extracted):
    from duch.pipeline.run.manifest import SCHEMA_VERSION, own_version

    path = extracted / "extract" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(manifest))
    line = cli_error(["train-hash", "--run", str(extracted), "--bits", "8", "--epochs", "1", "--no-progress"])
    assert line == (f"error: {path} was written by a newer duch (manifest schema {SCHEMA_VERSION + 1}; this duch "
                    f"{own_version()} reads schema {SCHEMA_VERSION} and older); upgrade duch to use this run")
    path.write_text("[1, 2]")
    assert cli_error(["train-hash", "--run", str(extracted)]) == (
        f"error: {path}: unreadable manifest (a JSON list, not an object); redo the stage with --force")
