"""stac-geoparquet files as STAC items, read with pyarrow alone (record batches: flat memory in file size).

The stac-geoparquet layout: one row per item; columns `id`, `collection`, `bbox` (a struct xmin, ymin, xmax, ymax, or
a list), `geometry` (WKB), `links`, `assets` (a struct of assets, an asset absent from a row null), and the item's
properties as top-level columns (`datetime` a timestamp). Relative asset hrefs are resolved against the file.
"""
from __future__ import annotations

import datetime as dt
import os

from duch.data.records import DatasetError, Reject
from duch.data.stac import StacItem, parse_item

ITEM_COLUMNS = ("type", "stac_version", "stac_extensions", "id", "geometry", "bbox", "links", "assets", "collection")


def _plain(value):
    """Arrow's Python values as JSON's: timestamps as ISO 8601 (UTC 'Z'), bytes left out."""
    if isinstance(value, dt.datetime):
        stamp = value.astimezone(dt.timezone.utc) if value.tzinfo else value
        return stamp.strftime("%Y-%m-%dT%H:%M:%S") + (f".{stamp.microsecond:06d}" if stamp.microsecond else "") + "Z"
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def row_item(row: dict, where: str) -> dict:
    """One row as an Item document."""
    box = row.get("bbox")
    if isinstance(box, dict):
        box = [box.get("xmin"), box.get("ymin"), box.get("xmax"), box.get("ymax")]
    assets = {k: _plain(a) for k, a in (row.get("assets") or {}).items() if a}
    return {"type": "Feature", "id": row.get("id"), "bbox": box, "collection": row.get("collection"),
            "geometry": None, "assets": assets,
            "properties": {k: _plain(v) for k, v in row.items() if k not in ITEM_COLUMNS and v is not None}}


def read_stac_parquet(path: str) -> tuple[list[StacItem], list[Reject]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"{path}: reading stac-geoparquet needs pyarrow; pip install 'duch[stac]'") from None
    path = os.path.abspath(path.removeprefix("file://"))
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable stac-geoparquet file ({e})") from None
    names = parquet.schema_arrow.names
    if "id" not in names or "assets" not in names:
        raise DatasetError(f"{path}: not a stac-geoparquet file (it has no `id` and `assets` columns; it has "
                           f"{', '.join(names[:12])})")
    items, rejects = [], []
    row_number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            where = f"{path}#row{row_number}"
            row_number += 1
            try:
                items.append(parse_item(row_item(row, where), path))
            except ValueError as e:
                name = row.get("id") if isinstance(row.get("id"), str) and row.get("id") else where
                rejects.append(Reject(name, f"malformed STAC item: {e}"))
    return items, rejects
