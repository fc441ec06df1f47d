"""Opening a user's annotation file as text, within bounds set before it is parsed (docs/stages.md, "Bad input").

- Encoding: UTF-8, with or without a byte-order mark. A file in another encoding is refused by name where its
  first bytes tell it (a UTF-16 or UTF-32 byte-order mark, or NUL bytes between its first characters), else at its
  first byte that is not UTF-8, with line and column.
- A caption JSON is parsed whole, which holds 7 to 18 times its size in memory (measured: docs/results.md, 11), so a
  file over MAX_JSON_BYTES is refused before it is read; an archive that large is written as JSONL or CSV rows,
  read one row at a time. JSON nested deeper than the parser goes (about 1000 levels) is refused when the parser
  reaches that depth, before anything of it is used.
- JSONL and CSV are read row by row; a row longer than MAX_ROW_BYTES is never held whole (a JSONL row is skipped
  as a reject, a CSV file is refused naming the line, since a CSV reader cannot find the next row reliably).
"""
from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

from duch.data.records import DatasetError
from duch.data.text import MAX_CAPTION_CHARS

MAX_JSON_BYTES = 128 * 2**20  # ~240,000 UCM-like images; parsing one holds at most ~2.5 GB
MAX_ROW_BYTES = 2**20
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
         (codecs.BOM_UTF16_BE, "UTF-16"))  # UTF-32 first: its little-endian mark begins with UTF-16's


def other_encoding(head: bytes) -> str | None:
    """The encoding other than UTF-8 that a file's first bytes show, worded for a message, or None."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return f"{name} text (it starts with a {name} byte-order mark)"
    if len(head) >= 4 and ((head[1] == 0 and head[3] == 0) or (head[0] == 0 and head[2] == 0)):
        return "UTF-16 or UTF-32 text (NUL bytes between its first characters)"
    return None


def refuse_other_encoding(path: Path, head: bytes) -> None:
    found = other_encoding(head)
    if found:
        raise DatasetError(f"{path}: {found}; save the file as UTF-8")


def not_utf8(path: Path, data: bytes, e: UnicodeDecodeError) -> DatasetError:
    """Where the first byte that is not UTF-8 sits, as a text editor counts it."""
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return DatasetError(f"{path}: not UTF-8 text at line {line}, column {column} (byte 0x{data[e.start]:02x}); "
                        "save the file as UTF-8")


def read_json_file(path: Path):
    """The parsed content of a caption JSON, or the one-line refusal."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise DatasetError(f"{path}: {size:,} bytes, over the {MAX_JSON_BYTES:,} a caption JSON may hold (it is "
                           "parsed whole, in several times its size of memory); write the archive as JSONL or CSV "
                           "rows (image, caption), which are read one row at a time")
    with open(path, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    refuse_other_encoding(path, data[:4])
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, data, e) from None
    del data
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise DatasetError(f"{path}: JSON nested deeper than the parser goes (about 1000 levels); the caption "
                           "format nests 5 levels: save the file in that form") from None


def json_row(line: str) -> tuple[object, str | None]:
    """(the value of one JSONL row, None), or (None, why it is rejected)."""
    try:
        return json.loads(line), None
    except json.JSONDecodeError as e:
        return None, f"not valid JSON (column {e.colno}: {e.msg})"
    except RecursionError:
        return None, "JSON nested deeper than the parser goes (about 1000 levels)"


def jsonl_rows(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """(line number, the line's bytes) for every line of a JSONL file, the byte-order mark of the first removed;
    (line number, None) for a line longer than MAX_ROW_BYTES, which is skipped without being held whole."""
    with open(path, "rb") as f:
        refuse_other_encoding(path, f.peek(4)[:4])
        n = 0
        while raw := f.readline(MAX_ROW_BYTES + 1):
            n += 1
            if n == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if len(raw) > MAX_ROW_BYTES:
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(MAX_ROW_BYTES)
                yield n, None
                continue
            yield n, raw


class CsvLines:
    """A CSV file's lines as csv.reader wants them, UTF-8 with or without a byte-order mark, each line bounded;
    csv's own limit on a field (a quoted one spans lines) raised to the same bound while the file is read."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb")
        refuse_other_encoding(path, self.file.peek(4)[:4])
        self.text = io.TextIOWrapper(self.file, encoding="utf-8-sig", newline="")
        self.line = 0

    def __iter__(self) -> Iterator[str]:
        while line := self.text.readline(MAX_ROW_BYTES + 1):
            self.line += 1
            if len(line) > MAX_ROW_BYTES:
                raise DatasetError(f"{self.path}: line {self.line} is longer than {MAX_ROW_BYTES:,} characters; "
                                   f"captions are cut at {MAX_CAPTION_CHARS:,} characters anyway: shorten it")
            yield line

    def __enter__(self) -> CsvLines:
        self.limit = csv.field_size_limit(MAX_ROW_BYTES)
        return self

    def __exit__(self, *exc) -> None:
        csv.field_size_limit(self.limit)
        self.text.close()

