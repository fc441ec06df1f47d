"""Every defect the fuzzers (tests/test_fuzz_*.py) found, or issue 24 reported, as a plain test with the failing
example pinned: the input, and the rule that now holds for it (docs/stages.md, "Bad input")."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from duch import cli
from duch.data import DatasetError, read_dataset
from duch.data.text import MAX_CAPTION_CHARS
from duch.pipeline.formats.features import load_features

from .conftest import ASSETS


def run_extract(data: Path, run: Path, spec: str):
    result = CliRunner().invoke(cli.main, ["extract", "--data", str(data), "--run", str(run), "--image-encoder", spec,
                                           "--text-encoder", spec, "--workers", "0", "--device", "cpu",
                                           "--no-progress"], prog_name="duch")
    assert "Traceback" not in result.output, result.output
    return result


def archive(root: Path, annotation: str, content: str | bytes, images=("1.jpg",)) -> Path:
    (root / "images").mkdir(parents=True)
    for name in images:
        shutil.copy(ASSETS / "102.jpg", root / "images" / name)
    path = root / annotation
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def refusal(path: Path, images: Path | None = None) -> str:
    with pytest.raises(DatasetError) as e:
        read_dataset(path, images)
    message = str(e.value)
    assert "\n" not in message and str(path.parent) in message
    return message


# ---------------------------------------------------------------------------------------------- issue 24, reported
def test_a_caption_holding_nul_is_cleaned_not_a_traceback_from_hdf5(tmp_path, tiny_clip_spec):
    """Was: `ValueError: VLEN strings do not support embedded NULLs` from h5py after the image shard was written,
    on every rerun. Rule: control characters are removed from captions (the encoders ignore them anyway)."""
    data = archive(tmp_path / "a", "pairs.csv", "image,caption\n1.jpg,hello\x00world\n")
    result = run_extract(data, tmp_path / "run", tiny_clip_spec)
    assert result.exit_code == 0, result.output
    assert list(load_features(tmp_path / "run").text[:1]) == ["helloworld"]
    manifest = json.loads((tmp_path / "run" / "extract" / "manifest.json").read_text())
    assert manifest["counts"]["cleaned_captions"] == 1
    assert "1 captions had control characters removed" in result.output


def test_a_caption_of_millions_of_characters_is_cut_before_the_tokenizer(tmp_path, tiny_clip_spec):
    """Was: 50 million characters took 77 s and 5.9 GB for one image (the tokenizer reads the whole string before
    it truncates). Rule: cut to MAX_CAPTION_CHARS first, counted (memory measured: bench/fuzz_bounds.py)."""
    huge = "many planes parked near the terminal " * 60_000  # 2.2 million characters
    entries = [{"filename": "1.jpg", "sentences": [{"raw": huge}, {"raw": "a short one"}]}]
    data = archive(tmp_path / "a", "dataset.json", json.dumps({"images": entries}))
    result = run_extract(data, tmp_path / "run", tiny_clip_spec)
    assert result.exit_code == 0, result.output
    text = load_features(tmp_path / "run").text
    assert len(text[0]) <= MAX_CAPTION_CHARS and huge.startswith(text[0])
    counts = json.loads((tmp_path / "run" / "extract" / "manifest.json").read_text())["counts"]
    assert (counts["capped_captions"], counts["truncated_captions"]) == (1, 1)


def test_captions_of_an_image_rejected_as_a_folder_or_a_symlink_loop_go_with_it(tmp_path, tiny_clip_spec):
    """Was: a directory named x.jpg, or a symlink loop, was rejected, and its captions still counted and embedded.
    Rule: a caption goes with its image, counted as dropped."""
    entries = [{"filename": name, "sentences": [{"raw": f"caption of {name}"}, {"raw": "another"}]}
               for name in ("1.jpg", "x.jpg", "loop.jpg")]
    data = archive(tmp_path / "a", "dataset.json", json.dumps({"images": entries}))
    (tmp_path / "a" / "images" / "x.jpg").mkdir()
    os.symlink("loop.jpg", tmp_path / "a" / "images" / "loop.jpg")
    result = run_extract(data, tmp_path / "run", tiny_clip_spec)
    assert result.exit_code == 0, result.output
    features = load_features(tmp_path / "run")
    assert list(features.ids) == ["1"] and set(features.text_image_id) == {"1"}
    manifest = json.loads((tmp_path / "run" / "extract" / "manifest.json").read_text())
    assert (manifest["counts"]["captions"], manifest["counts"]["dropped_captions"]) == (2, 4)
    assert {r["id"] for r in manifest["rejects"]} == {"x", "loop"}


# ---------------------------------------------------------------------------------------------- found by fuzzing
def test_json_nested_1988_levels_deep_is_refused_in_one_line(tmp_path):
    """test_caption_json_bytes_fuzzed: b"[" * 1988 ended in RecursionError from the json module."""
    path = archive(tmp_path, "dataset.json", "[" * 1988)
    assert refusal(path).endswith("JSON nested deeper than the parser goes (about 1000 levels); the caption format "
                                  "nests 5 levels: save the file in that form")


@pytest.mark.parametrize("annotation, content", [
    ("pairs.jsonl", '{"image": "\\u0000WiOxtdFWvtv", "caption": ""}\n'),  # test_jsonl_fuzzed
    ("rows.csv", "image,caption\n\x00\n"),  # test_csv_fuzzed
])
def test_an_image_path_holding_nul_is_refused_not_a_traceback_from_hdf5(tmp_path, annotation, content):
    """Rows naming an image path with a NUL got as far as writing the shard, where h5py refused the string."""
    path = archive(tmp_path, annotation, content)
    assert "holds a NUL character, which no file name can; correct the path" in refusal(path)
    assert f"{path}:" in refusal(path)  # the file named in full, and its line


def test_a_backslash_in_a_listed_file_name_is_part_of_the_name(tmp_path):
    """test_folder_listing_fuzzed: a file named `0\\.jpg` in a folder archive was read as `0/.jpg` (a Windows path
    converted), a file that does not exist, so the image was rejected as missing. Rule: a listing's names are exact;
    only annotations' paths take backslashes as separators. (So is `C:x.jpg`, which refused the whole folder.)"""
    folder = tmp_path / "tiles"
    folder.mkdir()
    for name in ("0\\.jpg", "C:x.jpg"):
        shutil.copy(ASSETS / "102.jpg", folder / name)
    items = read_dataset(folder).items
    assert sorted(i.image for i in items) == ["0\\.jpg", "C:x.jpg"]
    assert all((folder / i.image).is_file() for i in items)


def test_an_image_a_decoder_fails_on_with_a_value_error_is_rejected_not_a_traceback(tmp_path):
    """test_image_headers_declaring_any_size_fuzzed: a palette PNG whose IHDR says 0 x 0, 1-bit greyscale made PIL
    raise ValueError("Truncated tRNS chunk"), which load_image let through (a traceback in `search --image`; extract
    caught it under another name). Rule: whatever a decoder raises is an ImageLoadError, one line."""
    import io
    import struct
    import zlib

    from PIL import Image

    from duch.data.images import ImageLoadError, load_image

    buffer = io.BytesIO()
    Image.open(ASSETS / "102.jpg").convert("P").resize((24, 16)).save(buffer, format="PNG", transparency=0)
    body = struct.pack(">IIBBBBB", 0, 0, 1, 0, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + b"IHDR" + body + struct.pack(">I", zlib.crc32(b"IHDR" + body))
    path = tmp_path / "x.png"
    path.write_bytes(buffer.getvalue()[:8] + ihdr + buffer.getvalue()[33:])
    with pytest.raises(ImageLoadError, match="^cannot decode image: Truncated tRNS chunk$"):
        load_image(path)


@pytest.mark.parametrize("item, message", [
    ("alpha\n", "`overrides` 'alpha\\n': TrainConfig has no such setting"),  # test_set_values_fuzzed
    ("batch_size=\n", "`overrides` 'batch_size=\\n': use `batch_size` instead"),
    ("disc_betas=0", "disc_betas are Adam's two betas, each from 0 to below 1 (like 0.5,0.9); got (0,)"),
    ("disc_betas=1,0", "disc_betas are Adam's two betas, each from 0 to below 1 (like 0.5,0.9); got (1, 0)"),
    ("lr=-1", "lr must be positive, got -1.0"),
    ("lr_step=0", "lr_step must be at least 1, got 0"),
    ("w_inter=1e309", "w_inter must be a finite number, got inf"),
    ("beta=-0.5", "beta is a loss weight: 0 or more, got -0.5"),
    ("split_seed=-1", "split_seed must be 0 or more, got -1"),
])
def test_set_values_outside_their_range_are_one_line_naming_the_setting(item, message):
    """test_set_values_fuzzed and test_accepted_set_values_train_to_the_end: an item holding a line break made a
    two-line error; disc_betas=0 ended in IndexError, disc_betas=1,0 in Adam's ValueError, lr=-1 in Adam's, and
    an infinite weight trained to a NaN loss before it was refused. Rule: every --set value is checked against its
    range first."""
    from duch.pipeline import DuchError
    from duch.pipeline.config import TrainConfig, parse_overrides

    with pytest.raises(DuchError) as e:
        TrainConfig(run="r", **parse_overrides([item], TrainConfig, reserved=("batch_size",))).validate()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_negative_seeds_and_no_evaluation_interval_are_refused_before_any_work(tmp_path, tiny_extract_run):
    """`extract --seed -1` rejected every image ('cannot process image: ValueError: expected non-negative integer',
    numpy's generators of the augmented views take no negative seed); `train-hash --eval-every 0` divided by zero
    at the first epoch. Rule: both refused at once, naming the option."""
    from .test_bad_input import cli_error

    data = archive(tmp_path / "a", "pairs.csv", "image,caption\n1.jpg,a field\n")
    assert cli_error(["extract", "--data", str(data), "--run", str(tmp_path / "r"), "--seed", "-1"]) == (
        "error: --seed must be 0 or more, got -1")
    assert not (tmp_path / "r").exists()
    assert cli_error(["train-hash", "--run", str(tiny_extract_run), "--eval-every", "0"]) == (
        "error: eval_every must be at least 1, got 0")


def test_a_caption_query_follows_the_caption_rules(encoded_run):
    """The same rules as extract's captions on the search path (Index.embed_text, which the search service calls):
    a query of millions of characters is cut before the tokenizer (answered, in bounded memory: bench/fuzz_bounds.py),
    control characters are removed, and one left empty or not valid Unicode is one line."""
    from duch.pipeline import DuchError
    from duch.pipeline.retrieval.search import Index

    index = Index.load(encoded_run, bits=16, device="cpu")
    base = "many planes parked near the terminal"
    long = index.search(text=base * 100_000, k=5)  # 3.6 million characters
    assert [h.id for h in long] == [h.id for h in index.search(text=(base * 100_000)[:MAX_CAPTION_CHARS], k=5)]
    assert [h.id for h in index.search(text="a har\x00bor\x1b", k=5)] == [h.id for h in index.search(text="a harbor",
                                                                                                   k=5)]
    for text, reason in [("\x00\x01 \t", "empty caption"), ("a \ud800 b", "caption not valid Unicode text")]:
        with pytest.raises(DuchError) as e:
            index.search(text=text)
        assert str(e.value).startswith(f"query text {text!r}: {reason}") and "\n" not in str(e.value)


def test_index_search_refuses_k_below_one(encoded_run):
    """test_caption_queries_fuzzed, test_image_queries_fuzzed, test_id_queries_fuzzed: Index.search(k=0) answered
    with no hits and k=-1 with every hit but one, or, with ties="order", ended in an AssertionError from faiss (the
    CLI checks -k; the Python API, which the search service calls, did not). Rule: k >= 1 and rerank_top >= 0."""
    from duch.pipeline import DuchError
    from duch.pipeline.retrieval.search import Index

    index = Index.load(encoded_run, bits=16, device="cpu")
    for k, rerank in ((0, 0), (-1, 0), (5, -1)):
        with pytest.raises(DuchError, match=f"^`k` must be at least 1 and `rerank_top` 0 or more, got k={k}, "
                                            f"rerank_top={rerank}$"):
            index.search(id="0", k=k, rerank_top=rerank)


@pytest.fixture
def legacy_copy(tmp_path) -> Path:
    """The committed run of tests/fixtures/legacy_run (its files are stable bytes), copied."""
    run = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "fixtures" / "legacy_run" / "run", run)
    return run


@pytest.mark.parametrize("stage, edit, problem", [
    ("extract", lambda m: b"[" * 1985, "JSON nested deeper than the parser goes"),  # was RecursionError
    ("encode-archive", lambda m: json.dumps({k: v for k, v in m.items() if k != "archive_run"}).encode(),
     "no archive_run"),  # was KeyError: 'archive_run'
    ("encode-archive", lambda m: json.dumps({**m, "archive_run": None}).encode(),
     "archive_run holds NoneType 'None'"),  # was TypeError: unsupported operand type(s) for /
    ("train-hash", lambda m: json.dumps({**m, "outputs": 7}).encode(), "outputs holds int '7'"),
])
def test_a_manifest_nested_too_deep_or_lacking_what_a_stage_reads_is_one_line(legacy_copy, stage, edit, problem):
    """test_manifests_fuzzed: manifests edited by hand or cut short by another tool ended in a traceback deep in a
    later stage. Rule: read_manifest checks the fields the stages read (pipeline/run/manifest.REQUIRED)."""
    from duch.pipeline import DuchError
    from duch.pipeline.run.manifest import read_manifest

    path = legacy_copy / stage / "manifest.json"
    path.write_bytes(edit(json.loads(path.read_text())))
    with pytest.raises(DuchError) as e:
        read_manifest(path.parent)
    assert str(e.value) == f"{path}: unreadable manifest ({problem}); redo the stage with `force`"


def test_a_code_file_damaged_in_place_is_one_line_when_read_without_its_checksum(legacy_copy):
    """test_code_files_read_without_their_checksum_fuzzed: `search --no-verify` checks sizes only, and a code file
    damaged in place (here its strings' heap) ended in h5py's OSError; other damage in KeyError 'image' or a
    TypeError from faiss on codes no longer uint8. Rule: open_codes refuses what it cannot read as codes."""
    import h5py

    from duch.pipeline import DuchError
    from duch.pipeline.formats.codes import open_codes
    from duch.pipeline.retrieval.search import Index

    path = legacy_copy / "encode-archive" / "codes-16.h5"
    data = bytearray(path.read_bytes())
    heap = data.find(b"GCOL")
    data[heap + 16:heap + 40] = b"\xff" * 24
    path.write_bytes(data)
    with pytest.raises(DuchError, match=r"codes-16.h5: unreadable code file \(OSError: Can't synchronously read data"
                                        r".*\); redo the encode-archive stage of its run with `force` to make it "
                                        r"again$"):
        Index.load(legacy_copy, bits=16, device="cpu", verify=False)
    other = legacy_copy / "encode-archive" / "codes-32.h5"
    with h5py.File(other, "a") as f:
        f.move("image", "imagf")
    with pytest.raises(DuchError, match=r"unreadable code file \(KeyError: 'no image codes'\)"):
        open_codes(other)


def _lr_node(tree: dict) -> dict:
    """The node of the heads' optimizer's learning rate in a checkpoint's state tree."""
    opt = dict(tree["dict"])["opt"]
    group = dict(opt["dict"])["param_groups"]["list"][0]
    return dict(group["dict"])["lr"]


@pytest.mark.slow
@pytest.mark.parametrize("edit, why", [
    (lambda tree: {"dict": []}, "ValueError: it holds []"),  # was KeyError: 'heads'
    (lambda tree: _lr_node(tree).update(value=None) or tree, "ValueError: opt.lr holds NoneType None, not float"),
])  # was TypeError: unsupported operand type(s) for /: 'NoneType' and 'float', in the first step after resuming
def test_a_checkpoint_whose_state_was_edited_trains_from_the_start(tiny_extract_run, tmp_path, edit, why):
    """test_resuming_from_a_checkpoint_whose_state_was_edited_fuzzed: checkpoint.json's state tree has no checksum
    (only the tensor file has); edited, it passed every check and broke the restore or a later step. Rule: a state
    not of this training's form is not resumed from; training starts over and ends with the uninterrupted weights."""
    from duch.pipeline.config import TrainConfig
    from duch.stages.train_hash import train_hash

    from .test_fuzz_run_files import RESUME, crash_after_training

    clean, run = tmp_path / "clean", tmp_path / "run"
    for target in (clean, run):
        shutil.copytree(tiny_extract_run, target)
    train_hash(TrainConfig(run=str(clean), **RESUME), progress=False, echo=lambda _: None)
    with pytest.MonkeyPatch.context() as m:
        crash_after_training(m)
        with pytest.raises(KeyboardInterrupt):
            train_hash(TrainConfig(run=str(run), **RESUME), progress=False, echo=lambda _: None)
    index = run / "train-hash" / "bits-8" / "checkpoint.json"
    meta = json.loads(index.read_text())
    meta["state"] = edit(meta["state"])
    index.write_text(json.dumps(meta))
    said = []
    train_hash(TrainConfig(run=str(run), **RESUME), progress=False, echo=said.append)
    assert f"train-hash: 8 bits: not resuming (the checkpoint's state does not fit this training: {why}); training " \
           "from the start" in said
    for name in ("model.safetensors", "history.json"):
        assert (run / "train-hash" / "bits-8" / name).read_bytes() == (clean / "train-hash" / "bits-8" / name
                                                                        ).read_bytes()


def test_a_tiff_decoding_to_no_pixels_is_rejected(tmp_path, encoded_run):
    """test_image_files_fuzzed (DUCH_FUZZ_SCALE=15, a random seed): a TIFF seed with bytes overwritten in its
    tags (tests/assets/fuzzed/zero-pixels.tif, the example as found) decoded to a 0 x 0 image, which load_image
    returned: extract rejected it later under another name, `search --image` ended in a ZeroDivisionError from the
    encoder's resize (and tifffile logged 30 lines on the way). Rule: an image of no pixels is an ImageLoadError,
    quietly."""
    from duch.data.images import ImageLoadError, load_image
    from duch.pipeline import DuchError
    from duch.pipeline.retrieval.search import Index

    path = ASSETS / "fuzzed" / "zero-pixels.tif"
    with pytest.raises(ImageLoadError, match=r"^image has no pixels \(0 x 0\)$"):
        load_image(path)
    with pytest.raises(DuchError, match=r"zero-pixels.tif: image has no pixels \(0 x 0\)$"):
        Index.load(encoded_run, bits=16, device="cpu").search(image=path)


def test_safetensors_holding_other_tensors_than_the_heads_are_one_line(tmp_path, encoded_run):
    """test_model_weights_fuzzed (DUCH_FUZZ_SCALE=15): model.safetensors with a byte of a key's name changed still
    parsed as safetensors, and loading it into the heads raised torch's RuntimeError (missing key). Rule: weights
    that are not these heads' are refused in one line (Model.load finds them first by their checksum)."""
    from safetensors.torch import load_file, save_file

    from duch.pipeline import DuchError
    from duch.pipeline.formats.weights import load_heads

    tensors = load_file(str(encoded_run / "train-hash" / "bits-16" / "model.safetensors"))
    tensors["image_head.net.1.weighs"] = tensors.pop("image_head.net.1.weight")
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(DuchError, match=r"model.safetensors: not the weights of 16-bit heads on 16/16-d features "
                                        r"\(Error\(s\) in loading state_dict for HashHead: Missing key\(s\) in "
                                        r"state_dict: \"net.1.weight\". .*\); redo the train-hash stage with `force`"):
        load_heads(path, 16, 16, 16, 32)
