"""A scene's acquisition date, from the most specific source that has one:

1. a JSON sidecar beside the scene, `NAME.json` for `NAME.tif`, with a "date" (or "datetime", "acquired") value;
2. `dates.csv` in the scenes folder, rows `scene,date` (the scene as its path under the folder, with or without
   the suffix);
3. the file's own metadata: an acquisition key (ACQUISITIONDATETIME, DATE_ACQUIRED, SENSING_TIME, ...);
4. `--date`, the default for scenes that carry none of the above;
5. TIFFTAG_DATETIME, last: by the TIFF standard it is when the file was made, often the processing date.

Dates are kept as YYYY-MM-DD. A sidecar that cannot be read, or a date that is not one, fails at once, naming the
file and the value.
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import re
from pathlib import Path, PurePosixPath

from duch.data.files import CsvLines
from duch.data.records import DatasetError

DATES_CSV = "dates.csv"
SIDECAR_KEYS = ("date", "datetime", "acquired")
ACQUISITION_KEYS = ("ACQUISITIONDATETIME", "ACQUISITION_DATE", "ACQUISITIONDATE", "DATE_ACQUIRED", "SENSING_TIME",
                    "SENSING_START", "DATATAKE_1_DATATAKE_SENSING_START", "PRODUCT_START_TIME", "DATETIME")
FILE_TIME_KEY = "TIFFTAG_DATETIME"
_DATE = re.compile(r"^\s*(\d{4})[-:/]?(\d{2})[-:/]?(\d{2})(?:$|[T\s_])")


def parse_date(text) -> str | None:
    """"2021-06-03", "2021:06:03 10:22:01" (TIFF), "2021-06-03T10:22:01.5Z", "20210603" -> "2021-06-03"; None
    for anything else (a date that does not exist included)."""
    if not isinstance(text, str):
        return None
    found = _DATE.match(text)
    if not found:
        return None
    try:
        return dt.date(*(int(g) for g in found.groups())).isoformat()
    except ValueError:
        return None


def read_dates_csv(folder: Path) -> dict[str, str]:
    """{scene path or name: date} from the folder's dates.csv, {} when there is none."""
    path = folder / DATES_CSV
    if not path.is_file():
        return {}
    out = {}
    try:
        with CsvLines(path) as lines:  # UTF-8 with or without a byte-order mark, as every CSV duch reads
            reader = csv.DictReader(lines)
            if not {"scene", "date"} <= set(reader.fieldnames or []):
                raise DatasetError(f"{path}: the header must name the columns 'scene' and 'date'")
            for row in reader:
                date = parse_date(row["date"])
                if date is None:
                    raise DatasetError(f"{path}:{reader.line_num}: {row['date']!r} is not a date; write YYYY-MM-DD")
                out[row["scene"].strip().replace("\\", "/")] = date
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except csv.Error as e:
        raise DatasetError(f"{path}: malformed CSV: {e}") from None
    return out


def _sidecar_date(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: not a JSON object of UTF-8 text ({e}); write "
                           '{"date": "YYYY-MM-DD"}') from None
    value = next((doc[k] for k in SIDECAR_KEYS if isinstance(doc, dict) and k in doc), None)
    date = parse_date(value)
    if date is None:
        raise DatasetError(f"{path}: {value!r} is not a date; write {{\"date\": \"YYYY-MM-DD\"}}")
    return date


def scene_date(folder: Path, file: str, tags: dict, csv_dates: dict[str, str],
               default: str | None) -> tuple[str | None, str | None]:
    """(date, where it came from) of the scene `file` (relative to `folder`) whose metadata is `tags`."""
    sidecar = PurePosixPath(file).with_suffix(".json")
    date = _sidecar_date(folder / sidecar)
    if date:
        return date, f"sidecar {sidecar}"
    for key in (file, str(PurePosixPath(file).with_suffix(""))):
        if key in csv_dates:
            return csv_dates[key], f"sidecar {DATES_CSV}"
    upper = {str(k).upper(): v for k, v in tags.items()}
    for key in ACQUISITION_KEYS:
        date = parse_date(upper.get(key))
        if date:
            return date, f"metadata {key}"
    if default:
        return default, "--date"
    date = parse_date(upper.get(FILE_TIME_KEY))
    return (date, f"metadata {FILE_TIME_KEY}") if date else (None, None)
