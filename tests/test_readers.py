import json
import os
import shutil

import pytest

from duch.data import DatasetError, read_dataset
from duch.data.readers import class_from_name

from .conftest import ASSETS, write_caption_json


def test_caption_json_reads_items_classes_splits_and_empty_captions(tmp_path):
    (tmp_path / "images").mkdir()
    write_caption_json(tmp_path, [
        {"filename": "a.jpg", "classcode": 1, "split": "train",
         "sentences": [{"raw": " two planes . "}, {"raw": "  "}]},
        {"filename": "airport_12.jpg", "sentences": [{"tokens": ["an", "airport"]}]},
        {"filename": "b.jpg", "classname": "beach", "sentences": []},
    ])
    doc = json.loads((tmp_path / "dataset.json").read_text())
    doc["classes"] = {"1": "airplane"}
    (tmp_path / "dataset.json").write_text(json.dumps(doc))

    ds = read_dataset(tmp_path)
    assert ds.kind == "caption-json" and ds.images_dir == tmp_path / "images"
    assert [i.id for i in ds.items] == ["a", "airport_12", "b"]
    assert ds.items[0].captions == ("two planes .",) and ds.items[0].label == "airplane"
    assert ds.items[0].split == "train"
    assert ds.items[1].captions == ("an airport",) and ds.items[1].label == "airport"
    assert ds.items[2].label == "beach" and ds.items[2].captions == ()
    assert [(r.id, r.reason) for r in ds.rejects] == [("a#1", "empty caption")]
    assert ds.n_captions == 2


def test_malformed_json_names_line_and_column(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "dataset.json").write_text('{"images": [\n  {"filename": "a.jpg",}\n]}')
    with pytest.raises(DatasetError,
                       match=r"dataset.json: not valid JSON at line 2, column 24: Expecting property name"):
        read_dataset(tmp_path / "dataset.json")


@pytest.mark.parametrize("entry, message", [
    ({"sentences": []}, r"images\[0\]: missing key 'filename'"),
    ({"filename": "a.jpg", "sentences": "one caption"}, r"images\[0\].sentences: expected a list"),
    ({"filename": "a.jpg", "sentences": [{"raw": 3}]}, r"images\[0\].sentences\[0\].raw: expected a string"),
    ({"filename": "a.jpg", "split": 1, "sentences": []}, r"images\[0\].split: expected a string"),
    ({"filename": "../../etc/passwd", "sentences": []}, r"leaves the images folder"),
    ({"filename": "/etc/passwd", "sentences": []}, r"is absolute"),
])
def test_bad_entries_fail_naming_the_key(tmp_path, entry, message):
    (tmp_path / "images").mkdir()
    write_caption_json(tmp_path, [entry])
    with pytest.raises(DatasetError, match=message):
        read_dataset(tmp_path)


def test_symlink_out_of_images_folder_is_refused(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    outside = tmp_path / "secret.jpg"
    shutil.copy(ASSETS / "102.jpg", outside)
    os.symlink(outside, images / "link.jpg")
    write_caption_json(tmp_path, [{"filename": "link.jpg", "sentences": []}])
    with pytest.raises(DatasetError, match="resolves outside the images folder"):
        read_dataset(tmp_path)


def test_symlinks_in_a_folder_archive_and_its_subfolders(tmp_path):
    """A folder archive is listed from directory entries and parent folders are resolved once: a symlinked folder
    leading out is refused, so is a symlinked file in a real subfolder leading out; links that stay inside, and
    odd but harmless spellings in a caption file, are kept."""
    images = tmp_path / "images"
    (images / "beach").mkdir(parents=True)
    shutil.copy(ASSETS / "102.jpg", images / "beach" / "1.jpg")
    os.symlink(images / "beach" / "1.jpg", images / "beach" / "2.jpg")  # inside: fine
    assert [i.image for i in read_dataset(images).items] == ["beach/1.jpg", "beach/2.jpg"]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(ASSETS / "102.jpg", outside / "3.jpg")
    os.symlink(outside / "3.jpg", images / "beach" / "3.jpg")
    with pytest.raises(DatasetError, match=r"beach/3.jpg: image path 'beach/3.jpg' resolves outside"):
        read_dataset(images)
    (images / "beach" / "3.jpg").unlink()
    os.symlink(outside, images / "harbor")  # a symlinked folder is not walked into
    assert [i.image for i in read_dataset(images).items] == ["beach/1.jpg", "beach/2.jpg"]
    write_caption_json(tmp_path, [{"filename": "./beach//1.jpg", "sentences": []},
                                  {"filename": "harbor/3.jpg", "sentences": []}])
    with pytest.raises(DatasetError, match=r"images\[1\].filename: image path 'harbor/3.jpg' resolves outside"):
        read_dataset(tmp_path)
    write_caption_json(tmp_path, [{"filename": "./beach//1.jpg", "sentences": []}])
    assert [i.image for i in read_dataset(tmp_path).items] == ["beach/1.jpg"]
    write_caption_json(tmp_path, [{"filename": ".", "sentences": []}])
    with pytest.raises(DatasetError, match="names the images folder itself"):
        read_dataset(tmp_path)


def test_duplicate_image_ids_are_refused(tmp_path):
    (tmp_path / "images").mkdir()
    write_caption_json(tmp_path, [{"filename": "a.jpg", "sentences": []}, {"filename": "a.jpg", "sentences": []}])
    with pytest.raises(DatasetError, match="duplicate image id 'a'"):
        read_dataset(tmp_path)


def test_missing_top_level_images_list(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "dataset.json").write_text('{"annotations": []}')
    with pytest.raises(DatasetError, match="expected an object with an 'images' list"):
        read_dataset(tmp_path)


def test_jsonl_groups_rows_and_rejects_bad_rows(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "pairs.jsonl").write_text("\n".join([
        json.dumps({"image": "x/1.png", "caption": "a river", "split": "test"}),
        json.dumps({"image": "x/2.png", "caption": "a road", "label": "road"}),
        "{not json",
        json.dumps({"image": "x/1.png", "caption": "water flowing"}),
        json.dumps({"image": "x/2.png", "caption": ""}),
        json.dumps(["a list"]),
        json.dumps({"caption": "no image"}),
        "",
    ]))
    ds = read_dataset(tmp_path)
    assert ds.kind == "pairs-jsonl"
    assert [(i.id, i.captions, i.split, i.label) for i in ds.items] == [
        ("x/1", ("a river", "water flowing"), "test", None),
        ("x/2", ("a road",), None, "road"),
    ]
    assert [(r.id, r.reason.split(" (")[0]) for r in ds.rejects] == [
        ("pairs.jsonl:3", "not valid JSON"),
        ("pairs.jsonl:5", "empty caption"),
        ("pairs.jsonl:6", "not a JSON object"),
        ("pairs.jsonl:7", "missing or non-string 'image'"),
    ]


def test_csv_rows_with_quotes_and_several_captions(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "captions.csv").write_text(
        'image,caption,label\nfarm_1.jpg,"fields, green and brown",\nfarm_1.jpg,crops,\nport_3.jpg,ships,harbor\n'
    )
    ds = read_dataset(tmp_path / "captions.csv")
    assert [(i.id, i.captions, i.label) for i in ds.items] == [
        ("farm_1", ("fields, green and brown", "crops"), "farm"),
        ("port_3", ("ships",), "harbor"),
    ]


def test_csv_without_the_required_columns(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "captions.csv").write_text("file,text\na.jpg,b\n")
    with pytest.raises(DatasetError, match="missing caption, image"):
        read_dataset(tmp_path)


def test_image_folder_takes_labels_from_subfolders(tmp_path):
    for cls in ("beach", "forest"):
        (tmp_path / cls).mkdir()
        shutil.copy(ASSETS / "102.jpg", tmp_path / cls / f"{cls}00.jpg")
    shutil.copy(ASSETS / "1.tif", tmp_path / "forest" / "forest01.TIF")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = read_dataset(tmp_path)
    assert ds.kind == "image-folder" and not ds.has_captions
    assert [(i.id, i.image, i.label) for i in ds.items] == [
        ("beach/beach00", "beach/beach00.jpg", "beach"),
        ("forest/forest00", "forest/forest00.jpg", "forest"),
        ("forest/forest01", "forest/forest01.TIF", "forest"),
    ]


def test_folder_with_several_annotations_asks_which(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b.csv").write_text("image,caption\n")
    with pytest.raises(DatasetError, match=r"several annotation files \(a.json, b.csv\)"):
        read_dataset(tmp_path)


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(DatasetError, match="no such file or folder"):
        read_dataset(tmp_path / "nope.json")
    (tmp_path / "d.json").write_text('{"images": []}')
    with pytest.raises(DatasetError, match="images folder not found"):
        read_dataset(tmp_path / "d.json", images=tmp_path / "imgs")


@pytest.mark.parametrize("name, label", [
    ("airport_12.jpg", "airport"), ("dense residential 3.tif", "dense residential"), ("00012.jpg", None),
    ("agricultural00.tif", "agricultural"), ("12.jpg", None),
])
def test_class_from_name(name, label):
    assert class_from_name(name) == label
