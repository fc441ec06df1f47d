"""Fuzzing every reader a user's annotation reaches: caption JSON, JSONL, CSV and folder listings (tests/fuzzkit.py
states the property). What a reader accepts must be storable as extract stores it (HDF5 strings, read back
equal), follow the caption rules of data/text.py, and plan into text rows; what it refuses is one line naming
the file. Every defect these found is pinned in tests/test_fuzz_regressions.py."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from duch.data import DatasetError, read_dataset
from duch.data.text import MAX_CAPTION_CHARS, control_characters
from duch.pipeline.config import ExtractConfig
from duch.pipeline.embed.plan import text_rows
from duch.pipeline.formats.shards import read_shard, write_shard

from .conftest import ASSETS
from .fuzzkit import caption_text, examples, json_values, one_line, time_bound, words

pytestmark = pytest.mark.fuzz

ON_DISK = ["a.jpg", "b.png", "sub/c.tif", "with space.jpg", "new\nline.jpg"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """An images folder holding real files, a folder named like an image and a symlink loop."""
    root = tmp_path_factory.mktemp("fuzz-archive")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for name in ON_DISK:
        shutil.copy(ASSETS / "102.jpg", images / name)
    (images / "dir.jpg").mkdir()
    os.symlink("loop.jpg", images / "loop.jpg")
    return root


def check_accepted(dataset, where: Path) -> None:
    """What extract does with a dataset before any encoder: plan its text rows and store every string field."""
    for item in dataset.items:
        for caption in item.captions:
            assert caption and caption == caption.strip() and len(caption) <= MAX_CAPTION_CHARS, repr(caption[:80])
            assert not control_characters(caption), repr(caption[:80])
    rows = text_rows(dataset, ExtractConfig(data="", run=""))
    arrays = {"ids": [i.id for i in dataset.items], "path": [i.image for i in dataset.items],
              "label": [i.label or "" for i in dataset.items], "split": [i.split or "" for i in dataset.items],
              "text": [r.text for r in rows], "image_id": [r.image_id for r in rows],
              "reject_id": [r.id for r in dataset.rejects], "reject_reason": [r.reason for r in dataset.rejects]}
    shard = where / "shard.h5"
    write_shard(shard, arrays, {"fingerprint": "x"})
    back = read_shard(shard)
    for name, values in arrays.items():
        assert list(back[name]) == values, name


def read_or_refuse(path: Path, images: Path | None = None):
    """The dataset, or None for a refusal that is one line naming the file."""
    try:
        with time_bound(20):
            dataset = read_dataset(path, images)
    except DatasetError as e:
        message = one_line(e, str(path))
        event("refused: " + re.sub(r"[\'\"(].*", "", message[len(str(path)):])[:48])
        return None
    event("accepted, captions kept" if dataset.n_captions else "accepted, no captions" if dataset.items
          else "accepted, no items")
    return dataset


# ---------------------------------------------------------------------------------------------- caption JSON
odd_names = st.one_of(st.sampled_from(["dir.jpg", "loop.jpg", "missing.jpg", "./a.jpg", "sub//c.tif", "../a.jpg",
                                      "/etc/passwd", "C:\\x.jpg", "a.jpg/", ".", ""]), caption_text, json_values)
good_names = st.sampled_from(ON_DISK)
names = st.one_of(good_names, good_names, good_names, good_names, odd_names)
# Well-typed documents with fuzzed content (most examples), then documents whose structure is fuzzed too.
raw = st.fixed_dictionaries({"raw": caption_text})
sentence = st.one_of(raw, raw, raw, st.fixed_dictionaries({"tokens": st.lists(words, max_size=4)}))
text_label = st.one_of(st.sampled_from(["airport", "harbor", "", " "]), caption_text)
typed_entry = st.fixed_dictionaries(
    {"filename": names.filter(lambda v: isinstance(v, str)), "sentences": st.lists(sentence, max_size=4)},
    optional={"split": text_label, "classname": text_label, "classcode": st.integers(0, 2),
              "filepath": st.sampled_from(["", "sub", ".", "../x"]), "imgid": st.integers()})
noisy_entry = st.one_of(st.fixed_dictionaries(
    {"filename": names}, optional={"sentences": st.one_of(st.lists(st.one_of(
        sentence, st.fixed_dictionaries({"raw": json_values}), json_values), max_size=3), json_values),
        "split": json_values, "classname": json_values, "classcode": json_values, "filepath": json_values}),
    json_values)


def unique_files(entry):
    return repr(entry.get("filename")) if isinstance(entry, dict) else repr(entry)


document = st.one_of(
    st.fixed_dictionaries({"images": st.lists(typed_entry, max_size=5, unique_by=unique_files)},
                          optional={"classes": st.dictionaries(st.sampled_from(["0", "1", "2"]), text_label)}),
    st.fixed_dictionaries({"images": st.lists(typed_entry, max_size=5, unique_by=unique_files)}),
    st.fixed_dictionaries({"images": st.lists(st.one_of(typed_entry, noisy_entry), max_size=4,
                                              unique_by=unique_files)},
                          optional={"classes": json_values}),
    json_values)
# Text encodings a user's file may come in: UTF-8 with or without a byte-order mark is read; anything else is
# refused by name (a BOM tells UTF-16 and UTF-32) or at its first byte that is not UTF-8.
encodings = st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-16-le",
                             "utf-16-be", "utf-32", "latin-1",
                             "cp1252"])


def encode(text: str, encoding: str) -> bytes:
    return text.encode(encoding, errors="surrogatepass" if encoding.startswith("utf") else "replace")


@examples("caption-json")
@given(doc=document, ascii_only=st.booleans(), encoding=encodings)
def test_caption_json_fuzzed(root, doc, ascii_only, encoding):
    with tempfile.TemporaryDirectory(dir=root) as where:
        path = Path(where) / "dataset.json"
        path.write_bytes(encode(json.dumps(doc, ensure_ascii=ascii_only), encoding))
        dataset = read_or_refuse(path, root / "images")
        if dataset is not None:
            check_accepted(dataset, Path(where))


@examples("caption-json-bytes")
@given(data=st.one_of(
    st.binary(max_size=200),
    st.builds(lambda doc, at, cut, insert: (lambda b: b[:at % (len(b) + 1)] + insert + b[at % (len(b) + 1) + cut:])(
        json.dumps(doc).encode()), document, st.integers(0, 10**6), st.integers(0, 3), st.binary(max_size=3)),
    st.builds(lambda head, n, tail: head * n + tail, st.sampled_from([b"[", b"{\"a\":", b"[{\"images\":"]),
              st.integers(1, 200_000), st.binary(max_size=10))))
def test_caption_json_bytes_fuzzed(root, data):
    with tempfile.TemporaryDirectory(dir=root) as where:
        path = Path(where) / "dataset.json"
        path.write_bytes(data)
        dataset = read_or_refuse(path, root / "images")
        if dataset is not None:
            check_accepted(dataset, Path(where))


# ---------------------------------------------------------------------------------------------- JSONL
row = st.one_of(st.fixed_dictionaries({"image": names, "caption": st.one_of(caption_text, json_values)},
                                      optional={"split": text_label, "label": st.one_of(text_label, json_values)}),
                json_values)
line_end = st.sampled_from(["\n", "\r\n", "\r", "\n\n"])


@examples("jsonl")
@given(rows=st.lists(st.tuples(row, st.booleans(), line_end), max_size=6), encoding=encodings,
       junk=st.lists(st.binary(max_size=20), max_size=2))
def test_jsonl_fuzzed(root, rows, encoding, junk):
    text = "".join(json.dumps(r, ensure_ascii=a) + end for r, a, end in rows)
    with tempfile.TemporaryDirectory(dir=root) as where:
        path = Path(where) / "pairs.jsonl"
        path.write_bytes(encode(text, encoding) + b"\n".join(junk))
        dataset = read_or_refuse(path, root / "images")
        if dataset is not None:
            check_accepted(dataset, Path(where))


# ---------------------------------------------------------------------------------------------- CSV
cell = st.one_of(names.filter(lambda v: isinstance(v, str)), caption_text, st.just(""))


@examples("csv")
@given(header=st.one_of(st.just(["image", "caption"]), st.just(["image", "caption", "split", "label"]),
                        st.just(["caption", "image"]), st.lists(st.sampled_from(["image", "caption", "x", "", "image"]),
                                                                 max_size=4)),
       rows=st.lists(st.lists(cell, min_size=0, max_size=5), max_size=5),
       delimiter=st.sampled_from([",", ",", ";", "\t", "|"]), quoting=st.sampled_from([0, 1, 2, 3]),
       line_end=line_end, encoding=encodings, tail=st.binary(max_size=12))
def test_csv_fuzzed(root, header, rows, delimiter, quoting, line_end, encoding, tail):
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, quoting=quoting, lineterminator=line_end, escapechar="\\")
    try:
        writer.writerows([header, *rows])
    except csv.Error:  # a value the chosen quoting cannot write (QUOTE_NONE with a delimiter inside)
        return
    with tempfile.TemporaryDirectory(dir=root) as where:
        path = Path(where) / "rows.csv"
        path.write_bytes(encode(out.getvalue(), encoding) + tail)
        dataset = read_or_refuse(path, root / "images")
        if dataset is not None:
            check_accepted(dataset, Path(where))


# ---------------------------------------------------------------------------------------------- folder listings
file_name = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=30),
    st.sampled_from(["with space", "new\nline", "tab\there", " lead", "trail ", "-dash", "#hash", "ünï", "日本"]),
    st.integers(1, 250).map(lambda n: "x" * n),
)
raw_name = st.one_of(file_name.map(os.fsencode), st.binary(min_size=1, max_size=20).filter(
    lambda b: b"/" not in b and b"\x00" not in b and b not in (b".", b"..")))
suffix = st.sampled_from([b".jpg", b".JPG", b".png", b".tif", b".tiff", b".jpeg", b".txt", b""])


@examples("folder")
@given(files=st.lists(st.tuples(st.lists(raw_name, max_size=2), raw_name, suffix), min_size=1, max_size=6))
def test_folder_listing_fuzzed(root, files):
    with tempfile.TemporaryDirectory(dir=root) as where:
        folder = Path(where) / "archive"
        folder.mkdir()
        made = 0
        for dirs, name, ext in files:
            base = os.path.join(os.fsencode(folder), *dirs)
            full = os.path.join(base, (name + ext)[:255])
            try:
                os.makedirs(base, exist_ok=True)
                with open(full, "xb") as f:
                    f.write(b"not read by the listing")
                made += 1
            except OSError:  # a name the filesystem refuses, or one a folder already holds
                continue
        dataset = read_or_refuse(folder)
        if dataset is not None:
            check_accepted(dataset, Path(where))
            for item in dataset.items:
                assert (folder / item.image).is_file()


# ---------------------------------------------------------------------------------------------- end to end
@examples("extract")
@given(rows=st.lists(st.tuples(st.one_of(good_names, st.sampled_from(["dir.jpg", "loop.jpg", "missing.jpg",
                                                                        "fake.jpg"])), caption_text),
                     min_size=1, max_size=5),
       form=st.sampled_from(["csv", "jsonl"]))
def test_extract_end_to_end_fuzzed(root, tiny_clip_spec, rows, form):
    """The whole property on a few examples: `duch extract` over a fuzzed archive exits 0 with shards the later
    stages read back (every caption with its image), or exits 2 with one line; never a traceback."""
    from click.testing import CliRunner

    from duch import cli
    from duch.pipeline.formats.features import load_features

    with tempfile.TemporaryDirectory(dir=root) as where:
        data = Path(where) / "archive"
        shutil.copytree(root / "images", data / "images", symlinks=True)
        (data / "images" / "fake.jpg").write_text("not an image")
        if form == "csv":
            import csv
            import io

            out = io.StringIO()
            csv.writer(out).writerows([("image", "caption"), *rows])
            (data / "rows.csv").write_text(out.getvalue(), encoding="utf-8", errors="surrogatepass")
        else:
            (data / "rows.jsonl").write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in rows))
        run = Path(where) / "run"
        with time_bound(120):
            result = CliRunner().invoke(cli.main, ["extract", "--data", str(data), "--run", str(run), "--image-encoder",
                                                   tiny_clip_spec, "--text-encoder", tiny_clip_spec, "--image-views",
                                                   "1", "--workers", "0", "--device", "cpu", "--no-progress"])
        assert result.exit_code in (0, 2), (result.output, result.exception)  # an exception escaping would be 1
        if result.exit_code == 2:
            event("refused")
            assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error: ")
            return
        assert result.exit_code == 0, result.output
        event("extracted")
        features = load_features(run)
        assert set(features.text_image_id) <= set(features.ids)
        counts = json.loads((run / "extract" / "manifest.json").read_text())["counts"]
        assert counts["images"] == len(features.ids) and counts["captions"] == int((~features.text_augmented).sum())
