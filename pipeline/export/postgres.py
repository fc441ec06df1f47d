"""An archive's codes as a PostgreSQL table: `bit(K)` codes (XOR `#` and `bit_count` give the Hamming distance,
PostgreSQL 14+), a PostGIS `geometry(Polygon, 4326)` footprint with a GiST index when PostGIS is there (else the
WKB as bytea), loaded with COPY.

A table that exists with the same columns is brought to the archive's current generation in one transaction: the
rows COPYed into a temporary table, upserted by (modality, id), and the rows the archive no longer holds deleted;
readers see the old table or the new one. `to_sql_file` writes the same table as a psql script.
"""
from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from duch.pipeline import DuchError
from duch.pipeline.export.columns import WGS84_SRID, bit_strings, valid_corners, wkb_polygons
from duch.pipeline.export.parquet_file import file_metadata, need
from duch.pipeline.export.rows import Batch, ExportSource
from duch.pipeline.run.storage import publish, temp_path, write_errors

KEY = ("modality", "id")
BBOX = ("bbox_xmin", "bbox_ymin", "bbox_xmax", "bbox_ymax")  # xmin and xmax are PostgreSQL's system columns


def table_columns(source: ExportSource, include: tuple[str, ...], postgis: bool) -> list[tuple[str, str]]:
    """(name, type as PostgreSQL's format_type spells it) of the table, in order."""
    cols = [("id", "text"), ("modality", "text"), ("archive_row", "bigint"), ("image_id", "text"),
            ("caption_index", "integer"), ("caption", "text")]
    cols += [("captions", "text[]")] if "text" in source.modalities else []
    cols += [("label", "text"), ("path", "text"), ("segment", "text"), ("code", f"bit({source.bits})")]
    cols += [(name, "real[]") for flag, name in (("continuous", "continuous"), ("embeddings", "embedding"))
             if flag in include]
    if source.places:
        cols += [("geometry", f"geometry(Polygon,{WGS84_SRID})" if postgis else "bytea")]
        cols += [(name, "double precision") for name in BBOX]
        cols += [("date", "date"), ("scene", "text"), ("pixel_window", "bigint[]"), ("crs", "text")]
    return cols


def create_sql(table: str, cols: list[tuple[str, str]]) -> str:
    body = ",\n  ".join(f"{name} {kind}{' NOT NULL' if name in ('id', 'modality', 'archive_row', 'code') else ''}"
                        for name, kind in cols)
    return f"CREATE TABLE {table} (\n  {body},\n  PRIMARY KEY ({', '.join(KEY)})\n)"


def index_sql(table: str, cols: list[tuple[str, str]]) -> list[str]:
    """The GiST index on the footprints (PostGIS), and archive order per modality (the ORDER BY's tie-break)."""
    name = table.replace(".", "_")
    out = [f"CREATE INDEX IF NOT EXISTS {name}_order ON {table} (modality, archive_row)"]
    if ("geometry", f"geometry(Polygon,{WGS84_SRID})") in cols:
        out.append(f"CREATE INDEX IF NOT EXISTS {name}_geometry ON {table} USING GIST (geometry)")
    return out


# ------------------------------------------------------------------------------------- COPY's text format
def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _text(values) -> list[str]:
    """Strings (None: NULL) as COPY text fields: escaped as one string joined by NUL, which no PostgreSQL text
    holds (four replaces per column, not per value)."""
    values = list(values)
    if not values:
        return []
    out = _escape("\0".join("" if v is None else str(v) for v in values)).split("\0")
    return [("\\N" if v is None else e) for v, e in zip(values, out)]


def _text_array(lists) -> list[str]:
    quote = lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'  # noqa: E731
    return ["\\N" if items is None else _escape("{" + ",".join(map(quote, items)) + "}") for items in lists]


def _numbers(array: np.ndarray) -> list[str]:
    return ["{" + ",".join(map(repr, row)) + "}" for row in np.asarray(array).tolist()]


def copy_rows(batch: Batch, cols: list[tuple[str, str]]) -> str:
    """One batch as lines of COPY's text format, in the table's column order."""
    n, c, image = len(batch), batch.columns, batch.modality == "image"
    null = ["\\N"] * n
    values = {"id": _text(batch.ids), "modality": [batch.modality] * n,
              "archive_row": list(map(str, batch.archive_row)), "image_id": _text(batch.image_ids),
              "caption_index": null if image else list(map(str, c["caption_index"])),
              "caption": null if image else _text(c["text"]),
              "captions": _text_array(batch.captions) if batch.captions is not None else null,
              "label": _text(c["label"]) if image else null, "path": _text(c["path"]) if image else null,
              "segment": [_escape(batch.segment)] * n, "code": bit_strings(c["codes"])}
    if batch.continuous is not None:
        values["continuous"] = _numbers(np.asarray(batch.continuous, np.float32))
    if batch.embedding is not None:
        values["embedding"] = _numbers(np.asarray(batch.embedding, np.float32))
    if image and "lonlat" in c:
        valid = valid_corners(c["lonlat"])
        corners = np.where(valid[:, None, None], c["lonlat"], 0.0)
        postgis = dict(cols).get("geometry") != "bytea"
        wkb = wkb_polygons(corners, WGS84_SRID if postgis else None)
        hexes = [row.tobytes().hex() for row in wkb]
        values["geometry"] = [(h if postgis else "\\\\x" + h) if ok else "\\N" for h, ok in zip(hexes, valid)]
        bounds = np.asarray(c["bounds"], np.float64)
        for i, name in enumerate(BBOX):
            values[name] = [repr(v) if ok else "\\N" for v, ok in zip(bounds[:, i].tolist(), valid)]
        values["date"] = [d or "\\N" for d in c["date"]]
        values["scene"], values["crs"] = _text(c["scene"]), _text(c["crs"])
        values["pixel_window"] = _numbers(np.asarray(c["window"], np.int64))
    columns = [values.get(name, null) for name, _ in cols]
    return "".join("\t".join(row) + "\n" for row in zip(*columns))


# ------------------------------------------------------------------------------------- a live database
def where_is(url: str) -> str:
    """HOST:PORT of a database URL (never its password), for messages."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}"


def connect(url: str):
    psycopg = need("psycopg")
    try:
        return psycopg.connect(url, connect_timeout=10)
    except psycopg.Error as e:
        password = urlsplit(url).password
        reason = " ".join(str(e).split())
        if password:
            reason = reason.replace(password, "***")
        raise DuchError(f"cannot reach the database at {where_is(url)} ({reason[:300]}); check the host, port, "
                        "user and database of `to`, and that the server runs") from None


def has_postgis(conn) -> bool:
    """PostGIS in the database, created here where it is installed and this user may."""
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'postgis'").fetchone():
        return True
    if not conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'postgis'").fetchone():
        return False
    psycopg = need("psycopg")
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS postgis")
        return True
    except psycopg.Error:
        return False


def existing_columns(conn, table: str) -> list[tuple[str, str]] | None:
    row = conn.execute("SELECT to_regclass(%s)::oid", (table,)).fetchone()
    if row is None or row[0] is None:
        return None
    return [(name, kind) for name, kind in conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attnum", (row[0],)).fetchall()]


def _copy(cur, table: str, cols: list[tuple[str, str]], source: ExportSource, include: tuple[str, ...],
          row_group: int) -> dict[str, int]:
    rows = dict.fromkeys(source.modalities, 0)
    with cur.copy(f"COPY {table} ({', '.join(n for n, _ in cols)}) FROM STDIN") as copy:
        for batch in source.batches(row_group, include):
            copy.write(copy_rows(batch, cols))
            rows[batch.modality] += len(batch)
    return rows


def to_database(source: ExportSource, url: str, table: str, include: tuple[str, ...], replace: bool,
                row_group: int) -> tuple[dict[str, int], str, bool]:
    """Create (or bring up to date) `table` in one transaction: (rows per modality, HOST:PORT/DATABASE, PostGIS)."""
    psycopg = need("psycopg")
    try:
        return _to_database(source, url, table, include, replace, row_group)
    except psycopg.Error as e:  # a refusal by the server (permissions, space...): nothing was changed
        raise DuchError(f"the database at {where_is(url)} refused the export to table {table}: "
                        f"{' '.join(str(e).split())[:300]}; nothing was changed") from None


def _to_database(source: ExportSource, url: str, table: str, include: tuple[str, ...], replace: bool,
                 row_group: int) -> tuple[dict[str, int], str, bool]:
    with connect(url) as conn:
        postgis = source.places and has_postgis(conn)
        cols = table_columns(source, include, postgis)
        found = existing_columns(conn, table)
        if found is not None and found != cols and not replace:
            raise DuchError(f"table {table} at {where_is(url)} exists with other columns than this export's "
                            f"({', '.join(f'{n} {k}' for n, k in found)[:300]}); give `replace` to drop it and make "
                            "it again, or another `table`")
        with conn.transaction(), conn.cursor() as cur:
            if found is not None and found != cols:
                cur.execute(f"DROP TABLE {table}")
            if found is None or found != cols:
                cur.execute(create_sql(table, cols))
                rows = _copy(cur, table, cols, source, include, row_group)
            else:
                rows = _update(cur, table, cols, source, include, row_group)
            for sql in index_sql(table, cols):
                cur.execute(sql)
            cur.execute(f"COMMENT ON TABLE {table} IS " + _literal(json.dumps(file_metadata(source, rows, include))))
            cur.execute(f"ANALYZE {table}")
    return rows, f"{where_is(url)}/{urlsplit(url).path.lstrip('/')} table {table}", postgis


def _update(cur, table: str, cols: list[tuple[str, str]], source: ExportSource, include: tuple[str, ...],
            row_group: int) -> dict[str, int]:
    """The table made equal to the archive: new and changed rows upserted, rows no longer there deleted."""
    cur.execute(f"CREATE TEMP TABLE duch_export_rows (LIKE {table}) ON COMMIT DROP")
    rows = _copy(cur, "duch_export_rows", cols, source, include, row_group)
    names = [n for n, _ in cols]
    changed = [n for n in names if n not in KEY]
    cur.execute(f"INSERT INTO {table} SELECT * FROM duch_export_rows ON CONFLICT ({', '.join(KEY)}) DO UPDATE SET "
                + ", ".join(f"{n} = EXCLUDED.{n}" for n in changed)
                + f" WHERE ({', '.join(f'{table}.{n}' for n in changed)}) IS DISTINCT FROM "
                + f"({', '.join(f'EXCLUDED.{n}' for n in changed)})")
    cur.execute(f"DELETE FROM {table} t WHERE NOT EXISTS (SELECT 1 FROM duch_export_rows s "
                f"WHERE s.modality = t.modality AND s.id = t.id)")
    return rows


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# ------------------------------------------------------------------------------------- a psql script
def to_sql_file(source: ExportSource, path: Path, table: str, include: tuple[str, ...], force: bool,
                row_group: int) -> tuple[dict[str, int], bool]:
    """A psql script (`psql -f FILE.sql`) that makes the table afresh in one transaction (PostGIS footprints for
    scene tiles: the script creates the extension)."""
    path = Path(path)
    if path.exists() and not force:
        raise DuchError(f"{path} exists; give `force` to write over it")
    cols = table_columns(source, include, postgis=source.places)
    rows = dict.fromkeys(source.modalities, 0)
    tmp = temp_path(path)
    try:
        with write_errors(path), open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(f"-- duch export of {source.run}, {source.bits} bits, generation {source.generation}\n"
                    "\\set ON_ERROR_STOP on\nBEGIN;\n")
            if source.places:
                f.write("CREATE EXTENSION IF NOT EXISTS postgis;\n")
            f.write(f"DROP TABLE IF EXISTS {table};\n{create_sql(table, cols)};\n")
            f.write(f"COPY {table} ({', '.join(n for n, _ in cols)}) FROM stdin;\n")
            for batch in source.batches(row_group, include):
                f.write(copy_rows(batch, cols))
                rows[batch.modality] += len(batch)
            f.write("\\.\n" + "".join(f"{sql};\n" for sql in index_sql(table, cols)))
            f.write(f"COMMENT ON TABLE {table} IS {_literal(json.dumps(file_metadata(source, rows, include)))};\n"
                    f"ANALYZE {table};\nCOMMIT;\n")
        with write_errors(path):
            publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows, source.places
