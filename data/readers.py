"""Readers for the archive forms duch accepts.

- caption JSON (UCM-captions, RSICD, Sydney-captions, RSITMD): ``{"images": [{"filename", "sentences": [{"raw"}],
  "split"?, "classname"? | "classcode"?}]}``; without a class field the class is the name prefix of files
  like ``airport_12.jpg``;
- JSONL or CSV rows ``image,caption`` (optional ``split``, ``label``), several rows per image allowed;
- a bare folder of images (no captions; the class is the first sub-folder, as in UC Merced's own layout).

A file that cannot be parsed fails at once, naming the line or key. Bad *items* (an empty caption, a
malformed JSONL row) are collected as rejects and the rest goes on.
"""
from __future__ import annotations

import csv
import json
import os
import re
from collections import OrderedDict
from pathlib import Path, PurePosixPath

from duch.data.records import Dataset, DatasetError, Item, Reject

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
        raise DatasetError(f"{images_dir}: images folder not found; pass it with --images")
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
        problem = _unicode_problem(name)
        if problem:
            raise DatasetError(f"{where}: image path {name!r} is {problem}")
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


def _not_utf8(path: Path, data: bytes, e: UnicodeDecodeError) -> DatasetError:
    """Where the first byte that is not UTF-8 sits, as a text editor counts it."""
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return DatasetError(f"{path}: not UTF-8 text at line {line}, column {column} (byte 0x{data[e.start]:02x}); "
                        "save the file as UTF-8")


def _unicode_problem(text: str) -> str | None:
    """A reason to reject text that holds no valid Unicode (JSON's "\\ud800" escapes decode to lone surrogates,
    which no UTF-8 writer, HDF5's included, can store)."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return f"not valid Unicode text (unpaired surrogate {text[e.start]!r} at character {e.start})"


def read_caption_json(path: Path, images_dir: Path) -> Dataset:
    data = b""
    try:
        with open(path, "rb") as f:
            data = f.read()
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _not_utf8(path, data, e) from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DatasetError(f"{path}: expected an object with an 'images' list (the UCM/RSICD caption format)")
    classes = doc.get("classes") if isinstance(doc.get("classes"), dict) else {}
    folder = ImagesFolder(images_dir)
    items: list[Item] = []
    rejects: list[Reject] = []
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
            if not raw.strip():
                rejects.append(Reject(f"{item_id}#{k}", "empty caption"))
                continue
            problem = _unicode_problem(raw)
            if problem:
                rejects.append(Reject(f"{item_id}#{k}", f"caption {problem}"))
                continue
            captions.append(raw.strip())
        split = entry.get("split")
        if split is not None and not isinstance(split, str):
            raise DatasetError(f"{where}.split: expected a string, got {type(split).__name__}")
        items.append(Item(item_id, relative, tuple(captions), split, _label_of(entry, classes, relative, where)))
    _check_unique(items, path)
    return Dataset("caption-json", path, images_dir, items, rejects)


def _label_of(entry: dict, classes: dict, relative: str, where: str) -> str | None:
    if "classname" in entry:
        if not isinstance(entry["classname"], str):
            raise DatasetError(f"{where}.classname: expected a string, got {type(entry['classname']).__name__}")
        return entry["classname"]
    if "classcode" in entry:
        code = entry["classcode"]
        if not isinstance(code, (int, str)) or isinstance(code, bool):
            raise DatasetError(f"{where}.classcode: expected an integer or string, got {type(code).__name__}")
        return str(classes.get(str(code), code))
    return class_from_name(relative)


class _Grouper:
    """Collects (image, caption) rows into items, in the order images first appear."""

    def __init__(self, images_dir: Path):
        self.images_dir = images_dir
        self.folder = ImagesFolder(images_dir)
        self.rows: OrderedDict[str, dict] = OrderedDict()
        self.rejects: list[Reject] = []

    def add(self, where: str, image, caption, split=None, label=None) -> None:
        if not isinstance(image, str) or not image.strip():
            self.rejects.append(Reject(where, "missing or non-string 'image'"))
            return
        relative = self.folder.relative(image.strip(), where)
        row = self.rows.setdefault(relative, {"captions": [], "split": split or None, "label": label or None})
        if not isinstance(caption, str):
            self.rejects.append(Reject(where, "missing or non-string 'caption'"))
        elif not caption.strip():
            self.rejects.append(Reject(where, "empty caption"))
        elif _unicode_problem(caption):
            self.rejects.append(Reject(where, f"caption {_unicode_problem(caption)}"))
        else:
            row["captions"].append(caption.strip())

    def dataset(self, kind: str, source: Path) -> Dataset:
        items = [
            Item(_item_id(rel), rel, tuple(r["captions"]), r["split"], r["label"] or class_from_name(rel))
            for rel, r in self.rows.items()
        ]
        _check_unique(items, source)
        return Dataset(kind, source, self.images_dir, items, self.rejects)


def read_pairs_jsonl(path: Path, images_dir: Path) -> Dataset:
    grouper = _Grouper(images_dir)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path.name}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                grouper.rejects.append(Reject(where, "not UTF-8"))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                grouper.rejects.append(Reject(where, f"not valid JSON (column {e.colno}: {e.msg})"))
                continue
            if not isinstance(row, dict):
                grouper.rejects.append(Reject(where, "not a JSON object"))
                continue
            grouper.add(where, row.get("image"), row.get("caption"), row.get("split"), row.get("label"))
    return grouper.dataset("pairs-jsonl", path)


def read_pairs_csv(path: Path, images_dir: Path) -> Dataset:
    grouper = _Grouper(images_dir)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"image", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise DatasetError(
                    f"{path}: header must name the columns 'image' and 'caption' (missing {', '.join(sorted(missing))})"
                )
            for row in reader:
                where = f"{path.name}:{reader.line_num}"
                grouper.add(where, row.get("image"), row.get("caption"), row.get("split"), row.get("label"))
    except UnicodeDecodeError:
        # The decoder's position counts from the chunk it was reading: decode the whole file to find the byte.
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(path, data, e) from None
        raise
    except csv.Error as e:
        raise DatasetError(f"{path}: malformed CSV: {e}") from None
    return grouper.dataset("pairs-csv", path)


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
        problem = _unicode_problem(rel)
        if problem:  # a file name in another encoding: Python hands it over with surrogates standing for bytes
            rejects.append(Reject(rel.encode("utf-8", "backslashreplace").decode(), f"file name is {problem}"))
            continue
        top, _, rest = rel.partition("/")
        label = top if rest else class_from_name(rel)
        items.append(Item(_item_id(rel), images.relative(rel, rel), (), None, label))
    _check_unique(items, folder)
    return Dataset("image-folder", folder, folder, items, rejects)
