"""Readers for the archive forms duch accepts.

- caption JSON (UCM-captions, RSICD, Sydney-captions, RSITMD): ``{"images": [{"filename", "sentences": [{"raw"}],
  "split"?, "classname"? | "classcode"?}]}``; without a class field the class is the name prefix of files
  like ``airport_12.jpg``;
- JSONL or CSV rows ``image,caption`` (optional ``split``, ``label``), several rows per image allowed;
- a bare folder of images (no captions; the class is the first sub-folder, as in UC Merced's own layout).

A file that cannot be parsed fails at once, naming the line or key. Bad *items* (an empty caption, a
malformed JSONL row) are collected as rejects and the rest goes on. Captions, labels and splits follow the rules
of data/text.py; how a file is opened (encodings, size and row bounds) is data/files.py's.
"""
from __future__ import annotations

import codecs
import csv
import os
import re
from collections import OrderedDict
from pathlib import Path, PurePosixPath

from duch.data.files import CsvLines, json_row, jsonl_rows, not_utf8, read_json_file
from duch.data.records import Dataset, DatasetError, Item, Reject
from duch.data.text import CaptionCounts, clean_caption, clean_field, unicode_problem

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
ANNOTATION_SUFFIXES = (".json", ".jsonl", ".csv")
_CLASS_PREFIX = re.compile(r"^([A-Za-z][A-Za-z _-]*?)[_ -]?\d+$")


def read_dataset(path: str | os.PathLike, images: str | os.PathLike | None = None) -> Dataset:
    """Read an archive from an annotation file or a folder.

    `path` may be an annotation file (.json, .jsonl, .csv), a folder holding exactly one annotation file
    (images then in its ``images/`` sub-folder, or beside it), or a folder of images with no annotation.
    `images` overrides where image paths are resolved.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder; give an annotation file or a folder of images")
    if path.is_dir():
        annotations = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in ANNOTATION_SUFFIXES)
        if len(annotations) > 1:
            names = ", ".join(p.name for p in annotations)
            raise DatasetError(f"{path}: several annotation files ({names}); pass the one to use as the path")
        if not annotations:
            return read_image_folder(Path(images) if images else path)
        path = annotations[0]
    images_dir = Path(images) if images else _default_images_dir(path)
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: images folder not found; pass it as `images`")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return read_caption_json(path, images_dir)
    if suffix == ".jsonl":
        return read_pairs_jsonl(path, images_dir)
    if suffix == ".csv":
        return read_pairs_csv(path, images_dir)
    raise DatasetError(f"{path}: unknown annotation format {suffix!r}; use .json, .jsonl or .csv")


def _default_images_dir(annotation: Path) -> Path:
    beside = annotation.parent / "images"
    return beside if beside.is_dir() else annotation.parent


class ImagesFolder:
    """Turns the image paths an archive names into paths relative to its images folder, refusing any that would
    leave it. Real paths are compared (a symlink inside the folder may point outside), each parent folder resolved
    once per reading: an archive's files share a few folders, and per-file `realpath` was most of a large
    archive's listing time."""

    def __init__(self, images_dir: Path):
        self.images_dir = images_dir
        real_root = os.path.realpath(images_dir)
        self.prefix = real_root if real_root.endswith(os.sep) else real_root + os.sep
        self.real_root = real_root
        self._real_dirs: dict[str, str] = {}

    def relative(self, name: str, where: str) -> str:
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{where}: image path must be a non-empty string, got {name!r}")
        problem = unicode_problem(name)
        if problem:
            raise DatasetError(f"{where}: image path {name!r} is {problem}")
        if "\0" in name:
            raise DatasetError(f"{where}: image path {name!r} holds a NUL character, which no file name can; "
                               "correct the path")
        posix = name.replace("\\", "/")
        parts = posix.split("/")
        if not all(parts) or "." in parts:  # not already in normal form ("a//b", "./a", "a/"): let pathlib say
            parts = list(PurePosixPath(posix).parts)
        if posix.startswith("/") or re.match(r"^[A-Za-z]:", name):
            raise DatasetError(f"{where}: image path {name!r} is absolute; paths must be relative to "
                               f"{self.images_dir}")
        if ".." in parts:
            raise DatasetError(f"{where}: image path {name!r} leaves the images folder {self.images_dir}")
        if not parts:
            raise DatasetError(f"{where}: image path {name!r} names the images folder itself, not an image")
        relative = "/".join(parts)
        if not self.inside(relative):
            raise DatasetError(f"{where}: image path {name!r} resolves outside the images folder {self.images_dir}")
        return relative

    def listed(self, relative: str) -> str:
        """A path from the folder's own listing, exact already: a backslash or a leading "C:" is part of a POSIX file
        name there, not a Windows path to convert. Only where a symlink leads is checked."""
        if not self.inside(relative):
            raise DatasetError(f"{self.images_dir / relative}: image path {relative!r} resolves outside the images "
                               f"folder {self.images_dir}; remove the link or point `data` at the folder it leads to")
        return relative

    def inside(self, relative: str) -> bool:
        parent, _, leaf = relative.rpartition("/")
        real_parent = self._real_dirs.get(parent)
        if real_parent is None:
            real_parent = self._real_dirs[parent] = os.path.realpath(os.path.join(self.images_dir, parent))
        real = os.path.join(real_parent, leaf)
        if os.path.islink(real):  # the leaf itself may point anywhere
            real = os.path.realpath(real)
        return real == self.real_root or real.startswith(self.prefix)


def _item_id(relative: str) -> str:
    return os.path.splitext(relative)[0]  # the last component's suffix, as PurePosixPath.with_suffix("")


def class_from_name(relative: str) -> str | None:
    """`airport_12.jpg` -> `airport`; `00012.jpg` -> None."""
    match = _CLASS_PREFIX.match(PurePosixPath(relative).stem)
    return match.group(1) if match else None


def _check_unique(items: list[Item], source: Path) -> None:
    seen: dict[str, str] = {}
    for item in items:
        if item.id in seen:
            raise DatasetError(
                f"{source}: duplicate image id {item.id!r} ({seen[item.id]!r} and {item.image!r}); "
                "each image may appear once"
            )
        seen[item.id] = item.image


def read_caption_json(path: Path, images_dir: Path) -> Dataset:
    doc = read_json_file(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DatasetError(f"{path}: expected an object with an 'images' list (the UCM/RSICD caption format)")
    classes = doc.get("classes") if isinstance(doc.get("classes"), dict) else {}
    folder = ImagesFolder(images_dir)
    items: list[Item] = []
    rejects: list[Reject] = []
    counts = CaptionCounts()
    for i, entry in enumerate(doc["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}")
        if "filename" not in entry:
            raise DatasetError(f"{where}: missing key 'filename'")
        name = entry["filename"]
        if isinstance(entry.get("filepath"), str) and entry["filepath"]:
            name = f"{entry['filepath']}/{name}"
        relative = folder.relative(name, f"{where}.filename")
        item_id = _item_id(relative)
        sentences = entry.get("sentences", [])
        if not isinstance(sentences, list):
            raise DatasetError(f"{where}.sentences: expected a list, got {type(sentences).__name__}")
        captions = []
        for k, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if raw is None and isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
                raw = " ".join(map(str, sentence["tokens"]))
            if not isinstance(raw, str):
                raise DatasetError(f"{where}.sentences[{k}].raw: expected a string, got {type(raw).__name__}")
            caption = clean_caption(raw)
            counts.add(caption)
            if caption.text is None:
                rejects.append(Reject(f"{item_id}#{k}", caption.reason))
            else:
                captions.append(caption.text)
        split = _text_field(entry.get("split"), f"{where}.split")
        items.append(Item(item_id, relative, tuple(captions), split, _label_of(entry, classes, relative, where)))
    _check_unique(items, path)
    return Dataset("caption-json", path, images_dir, items, rejects, caption_counts=counts.as_counts())


def _text_field(value, where: str) -> str | None:
    """A split or label an annotation gives: a string (or None), valid Unicode, control characters removed."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise DatasetError(f"{where}: expected a string, got {type(value).__name__}")
    problem = unicode_problem(value)
    if problem:
        raise DatasetError(f"{where}: {value!r} is {problem}; correct it in the file")
    return clean_field(value)


def _label_of(entry: dict, classes: dict, relative: str, where: str) -> str | None:
    if "classname" in entry:
        return _text_field(entry["classname"], f"{where}.classname")
    if "classcode" in entry:
        code = entry["classcode"]
        if not isinstance(code, (int, str)) or isinstance(code, bool):
            raise DatasetError(f"{where}.classcode: expected an integer or string, got {type(code).__name__}")
        return _text_field(str(classes.get(str(code), code)), f"{where}.classcode")
    return class_from_name(relative)


class _Grouper:
    """Collects (image, caption) rows into items, in the order images first appear."""

    def __init__(self, images_dir: Path, source: Path):
        self.images_dir = images_dir
        self.source = source
        self.folder = ImagesFolder(images_dir)
        self.rows: OrderedDict[str, dict] = OrderedDict()
        self.rejects: list[Reject] = []
        self.counts = CaptionCounts()

    def add(self, where: str, image, caption, split=None, label=None) -> None:
        if not isinstance(image, str) or not image.strip():
            self.rejects.append(Reject(where, "missing or non-string 'image'"))
            return
        fields = {}
        for key, value in (("split", split), ("label", label)):
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)  # a class number, as a caption JSON's classcode
            if value is not None and not isinstance(value, str):
                self.rejects.append(Reject(where, f"'{key}' is a {type(value).__name__}, not a string"))
                return
            if value and unicode_problem(value):
                self.rejects.append(Reject(where, f"'{key}' is {unicode_problem(value)}"))
                return
            fields[key] = clean_field(value) if value else None
        # A path that cannot be an image refuses the file, naming it whole (rejects name rows by file name)
        relative = self.folder.relative(image.strip(), str(self.source.parent / where))
        row = self.rows.setdefault(relative, {"captions": [], **fields})
        if not isinstance(caption, str):
            self.rejects.append(Reject(where, "missing or non-string 'caption'"))
            return
        cleaned = clean_caption(caption)
        self.counts.add(cleaned)
        if cleaned.text is None:
            self.rejects.append(Reject(where, cleaned.reason))
        else:
            row["captions"].append(cleaned.text)

    def dataset(self, kind: str) -> Dataset:
        source = self.source
        items = [
            Item(_item_id(rel), rel, tuple(r["captions"]), r["split"], r["label"] or class_from_name(rel))
            for rel, r in self.rows.items()
        ]
        _check_unique(items, source)
        return Dataset(kind, source, self.images_dir, items, self.rejects, caption_counts=self.counts.as_counts())


def read_pairs_jsonl(path: Path, images_dir: Path) -> Dataset:
    grouper = _Grouper(images_dir, path)
    for n, raw in jsonl_rows(path):
        where = f"{path.name}:{n}"
        if raw is None:
            grouper.rejects.append(Reject(where, "row longer than 1 MiB"))
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            grouper.rejects.append(Reject(where, "not UTF-8"))
            continue
        if not line.strip():
            continue
        row, problem = json_row(line)
        if problem:
            grouper.rejects.append(Reject(where, problem))
        elif not isinstance(row, dict):
            grouper.rejects.append(Reject(where, "not a JSON object"))
        else:
            grouper.add(where, row.get("image"), row.get("caption"), row.get("split"), row.get("label"))
    return grouper.dataset("pairs-jsonl")


def read_pairs_csv(path: Path, images_dir: Path) -> Dataset:
    grouper = _Grouper(images_dir, path)
    try:
        with CsvLines(path) as lines:
            reader = csv.DictReader(lines)
            missing = {"image", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise DatasetError(f"{path}: header must name the columns 'image' and 'caption' (missing "
                                   f"{', '.join(sorted(missing))}){_delimiter_hint(reader.fieldnames)}")
            for row in reader:
                where = f"{path.name}:{reader.line_num}"
                grouper.add(where, row.get("image"), row.get("caption"), row.get("split"), row.get("label"))
    except UnicodeDecodeError:
        # The decoder's position counts from the chunk it was reading: decode the whole file to find the byte.
        data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise not_utf8(path, data, e) from None
        raise
    except csv.Error as e:
        raise DatasetError(f"{path}: malformed CSV at line {lines.line}: {e}; quote fields holding commas, quotes "
                           "or line breaks with double quotes (RFC 4180)") from None
    return grouper.dataset("pairs-csv")


def _delimiter_hint(header: list[str] | None) -> str:
    """Rows are split at commas; a header that holds another usual delimiter names it."""
    for name, delimiter in (("semicolons", ";"), ("tabs", "\t"), ("bars", "|")):
        if header and len(header) == 1 and delimiter in header[0]:
            return f"; the file seems to separate its columns with {name}: save it with commas"
    return ""


def _image_files(folder: Path) -> list[str]:
    """Image files under `folder` (POSIX paths relative to it), from directory entries: their types come with
    the listing, so a folder of millions costs no stat per file. Symlinked folders are not descended into (nor
    were they by pathlib's rglob); where a symlinked file leads is checked afterwards by ImagesFolder."""
    out = []
    stack = [("", os.fspath(folder))]
    while stack:
        prefix, path = stack.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((f"{prefix}{entry.name}/", entry.path))
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file():
                    out.append(prefix + entry.name)
    return out


def read_image_folder(folder: Path) -> Dataset:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder of images")
    relatives = sorted(_image_files(folder))
    if not relatives:
        raise DatasetError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    images = ImagesFolder(folder)
    items, rejects = [], []
    for rel in relatives:
        problem = unicode_problem(rel)
        if problem:  # a file name in another encoding: Python hands it over with surrogates standing for bytes
            rejects.append(Reject(rel.encode("utf-8", "backslashreplace").decode(), f"file name is {problem}"))
            continue
        top, _, rest = rel.partition("/")
        label = top if rest else class_from_name(rel)
        items.append(Item(_item_id(rel), images.listed(rel), (), None, label))
    _check_unique(items, folder)
    return Dataset("image-folder", folder, folder, items, rejects)
